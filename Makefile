# Two commands: `make demo` and `make test`. Both create (or reuse) the project venv .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	CLIPFORGET_BUILD_CPP=1 $(PY) setup.py -q build_ext --inplace || echo "C++ CPU kernel not built: the torch path is used"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m clipforget_fast.demo --out results/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_e2e.py

clean-venv:
	rm -rf $(VENV)
