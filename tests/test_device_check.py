"""bench/device_check.py --quick: the GPU check's logic at toy sizes on CPU, in a subprocess
(it needs TRITON_INTERPRET=1 set before Triton is imported)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_quick_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("open_clip")
    out = tmp_path / "device_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("CLIPFORGET_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("matmul_tflops", "kernels", "apply", "synth", "nullspace", "edit_toy"):
        assert key in res and "error" not in res[key], (key, res.get(key))
    assert all(row["pass"] for row in res["kernels"]), res["kernels"]
    assert {r["kernel"] for r in res["kernels"]} == {"lowrank_update", "synth_update"}
    assert res["apply"]["backend"] == "triton"
    assert set(res["edit_toy"]["timings"]) >= {"synthesis", "capture", "nullspace"}
    assert res["edit_toy"]["apply"]["restored_max_err"] < 1e-5
    assert all(row["max_angle_rad"] < 1e-3 for row in res["nullspace"])
    # the same network as a transformers CLIPModel: the projection edit and the domain gate
    hf = [res.get(k) for k in ("edit_hf:toy", "gate_hf:toy")]
    if importlib.util.find_spec("transformers") is None:
        assert all("skipped" in r for r in hf), hf
        return
    for row in hf:
        assert row is not None and "error" not in row and "skipped" not in row, row
        assert row["apply"]["restored_max_err"] < 1e-5
    assert hf[0]["edit"] == "project" and hf[1]["edit"] == "domain-gate"
    assert hf[1]["gate_units"] > 0 and set(hf[1]["timings"]) >= {"synthesis", "translate", "examples", "gate"}
    assert hf[1]["examples"] == {"photo": 5, "sketch": 5}
