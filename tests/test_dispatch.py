"""Backend dispatch: CLIPFORGET_BACKEND parsing, fallbacks, and the errors of impossible choices."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clipforget_fast import _cpp, dispatch, reference

ROOT = Path(__file__).resolve().parent.parent


def _apply_inputs():
    ws = [torch.randn(9, 14), torch.randn(20, 5).half()]
    lefts = [torch.randn(9, 3), torch.randn(20, 2)]
    rights = [torch.randn(14, 3), torch.randn(5, 2)]
    return ws, lefts, rights


def _synth_kw():
    return dict(lr=0.1, decay=0.01, lo=-torch.ones(3), hi=torch.ones(3), in_shift=(1, -2),
                out_shift=(0, 3), blur=True)


@pytest.mark.parametrize("value,want", [(None, "auto"), ("", "auto"), ("torch", "torch"),
                                        (" Triton ", "triton"), ("CPP", "cpp"), ("auto", "auto")])
def test_requested_backend_parses(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("CLIPFORGET_BACKEND", raising=False)
    else:
        monkeypatch.setenv("CLIPFORGET_BACKEND", value)
    assert dispatch.requested_backend() == want


def test_unknown_backend_raises_value_error(monkeypatch):
    monkeypatch.setenv("CLIPFORGET_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        dispatch.backend_for(torch.zeros(1))


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("CLIPFORGET_BACKEND", "auto")
    x = torch.zeros(2, 3)
    # The C++ kernel only when built at install time: auto never compiles.
    assert dispatch.backend_for(x, "lowrank_update_") == ("cpp" if _cpp.prebuilt() else "torch")
    assert dispatch.backend_for(x, "synth_update") == "torch"
    ws, lefts, rights = _apply_inputs()
    want = [w.clone() for w in ws]
    reference.lowrank_update_(want, lefts, rights, 0.3)
    dispatch.lowrank_update_(ws, lefts, rights, 0.3)
    for w, v in zip(ws, want):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-3 if w.dtype == torch.float16 else 1e-5)
    x, g, act = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7), torch.tensor([True, False])
    for a, b in zip(dispatch.synth_update(x, g, act, **_synth_kw()),
                    reference.synth_update(x, g, act, **_synth_kw())):
        assert torch.equal(a, b)


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("CLIPFORGET_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        dispatch.backend_for(torch.zeros(1))
    ws, lefts, rights = _apply_inputs()
    with pytest.raises(RuntimeError):
        dispatch.lowrank_update_(ws, lefts, rights)


def test_cpp_backend_only_for_its_ops(monkeypatch):
    monkeypatch.setenv("CLIPFORGET_BACKEND", "cpp")
    assert dispatch.backend_for(torch.zeros(1), "synth_update") == "torch"


def test_cpp_backend_without_compiler_warns_and_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFORGET_BACKEND", "cpp")
    monkeypatch.setattr(_cpp, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(_cpp, "prebuilt", lambda: None)      # as on an install without the build
    _cpp.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="torch reference"):
            assert _cpp.load() is None
        with pytest.raises(RuntimeError, match="C\\+\\+"):
            dispatch.backend_for(torch.zeros(1), "lowrank_update_")
    finally:
        _cpp.load.cache_clear()


@pytest.mark.slow
def test_cpp_kernel_matches_reference(monkeypatch):
    """Builds the C++ kernel (a minute the first time, then cached) and checks it."""
    if _cpp.load() is None:
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("CLIPFORGET_BACKEND", "cpp")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in (1, 5, 32):
            ws = [torch.randn(s).to(dtype) for s in [(7, 33), (70, 130), (131, 64), (1, 5), (9, 1)]]
            lefts = [torch.randn(w.shape[0], k) for w in ws]
            rights = [torch.randn(w.shape[1], k) for w in ws]
            exact = [w.to(torch.float32, copy=True) for w in ws]
            ref = [w.clone() for w in ws]
            reference.lowrank_update_(exact, lefts, rights, 0.5)
            reference.lowrank_update_(ref, lefts, rights, 0.5)
            versions = [w._version for w in ws]
            dispatch.lowrank_update_(ws, lefts, rights, 0.5)
            assert all(w._version > v for w, v in zip(ws, versions))     # the write is seen
            for w, e, r in zip(ws, exact, ref):
                err = float((w.float() - e).abs().max())
                bound = float((r.float() - e).abs().max())
                assert err <= 2 * bound + 1e-5 * float(e.abs().max())


def test_kernel_write_under_a_saved_graph_is_refused_by_backward(monkeypatch):
    """A weight a graph saved for backward and a kernel then wrote: backward raises, as after any in-place
    op, instead of computing gradients from the new values."""
    if _cpp.load() is None:
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("CLIPFORGET_BACKEND", "cpp")
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    with torch.no_grad():
        weight = w.detach()                 # shares storage and version counter with w
    y = (x @ w).sum()                       # saves w for x's gradient
    dispatch.lowrank_update_([weight], [torch.randn(6, 1)], [torch.randn(4, 1)], 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_explicit_triton_on_cpu_with_interpreter_runs_kernels():
    """A fresh process with TRITON_INTERPRET=1 set first: dispatch runs the Triton kernels on CPU."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from clipforget_fast import dispatch, reference
        torch.manual_seed(0)
        assert dispatch.backend_for(torch.zeros(1), "lowrank_update_") == "triton"
        ws = [torch.randn(9, 14), torch.randn(20, 5)]
        ls = [torch.randn(9, 2), torch.randn(20, 2)]
        rs = [torch.randn(14, 2), torch.randn(5, 2)]
        want = [w.clone() for w in ws]
        reference.lowrank_update_(want, ls, rs, 0.3)
        versions = [w._version for w in ws]
        dispatch.lowrank_update_(ws, ls, rs, 0.3)
        for w, v in zip(ws, want):
            torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-5)
        # the kernel's write counts in the version counters, as an in-place op's does
        assert all(w._version > v for w, v in zip(ws, versions)), [w._version for w in ws]
        # weights with strided columns (a transposed view, and one row of it) take the reference
        views = [torch.randn(6, 9).t(), torch.randn(6, 9).t()[2:3]]
        ls, rs = [torch.randn(9, 2), torch.randn(1, 2)], [torch.randn(6, 2), torch.randn(6, 2)]
        want = [v.clone() for v in views]
        reference.lowrank_update_(want, ls, rs, 0.3)
        dispatch.lowrank_update_(views, ls, rs, 0.3)
        for w, v in zip(views, want):
            torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-5)
        x, g = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
        act = torch.tensor([True, False])
        kw = dict(lr=0.1, decay=0.01, lo=-torch.ones(3), hi=torch.ones(3), in_shift=(1, -2),
                  out_shift=(0, 3), blur=True)
        for a, b in zip(dispatch.synth_update(x, g, act, **kw), reference.synth_update(x, g, act, **kw)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", CLIPFORGET_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
