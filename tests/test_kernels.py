"""Triton kernels against their torch references (clipforget_fast.reference).

Without a GPU the kernels run under Triton's interpreter at small odd shapes. Triton picks the
interpreter when it is imported and when a kernel is decorated, so on a machine without CUDA
conftest.py sets ``TRITON_INTERPRET=1`` before any test module is collected (whichever imports Triton
first, directly or through open_clip, then gets the interpreter; the setting holds for the whole
session, where nothing else runs Triton on CPU), and the fixture ``interp`` loads private copies of
the kernel modules under it. With a GPU the interpreter
tests skip and the ``gpu`` tests run the compiled ``clipforget_fast.kernels`` at real sizes.

Tolerances: fp32 within 1e-5 relative; 16-bit weights: error against an fp32 reference at most twice
the error of the torch reference run in the same dtype (it rounds once, like the kernel).
"""
from __future__ import annotations

import importlib.util
import math
import os
import types

import pytest
import torch

# Must run before anything imports Triton (see the module docstring). conftest.py sets TRITON_INTERPRET
# before any test module is collected, so Triton imported since (open_clip imports it) already reads
# it; only an import before conftest (a plugin) would not.
from conftest import TRITON_BEFORE_CONFTEST  # noqa: E402

_INTERPRETER = (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
                and not TRITON_BEFORE_CONFTEST)
if _INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        _INTERPRETER = False

from clipforget_fast import reference  # noqa: E402

FP32_EPS = torch.finfo(torch.float32).eps


def _kernel_dir() -> str:
    spec = importlib.util.find_spec("clipforget_fast.kernels")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clipforget_fast.kernels is not installed (pip install -e .)")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def interp():
    """The two launchers, decorated under Triton's CPU interpreter."""
    pytest.importorskip("triton")
    if not _INTERPRETER:
        pytest.skip("interpreter tests need a machine without CUDA where this module imports Triton "
                    "first; the gpu tests cover the kernels here")
    folder = _kernel_dir()
    mods = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for name in ("lowrank_update", "synth_update"):
            spec = importlib.util.spec_from_file_location(f"_interpreted_{name}",
                                                          os.path.join(folder, f"{name}.py"))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods[name] = mod
        yield types.SimpleNamespace(lowrank=mods["lowrank_update"].lowrank_update_triton,
                                    synth=mods["synth_update"].synth_update_triton)


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------- multi-layer apply
SHAPES = [(7, 33), (70, 150), (1, 5), (131, 17), (65, 129)]


def _layers(shapes, k, dtype, pad=3):
    """Weights as row-strided views into NaN-padded buffers (padding columns must stay NaN)."""
    bufs, ws = [], []
    for m, n in shapes:
        buf = torch.full((m, n + pad), float("nan"), dtype=dtype)
        buf[:, :n] = torch.randn(m, n).to(dtype)
        bufs.append(buf)
        ws.append(buf[:, :n])
    lefts = [torch.randn(m, k) / math.sqrt(k) for m, _ in shapes]
    rights = [torch.randn(n, k) for _, n in shapes]
    return bufs, ws, lefts, rights


@pytest.mark.parametrize("k", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lowrank_update_matches_reference(interp, dtype, k):
    bufs, ws, lefts, rights = _layers(SHAPES, k, dtype)
    exact = [w.to(torch.float32, copy=True) for w in ws]
    reference.lowrank_update_(exact, lefts, rights, -0.75)
    ref = [w.clone() for w in ws]
    reference.lowrank_update_(ref, lefts, rights, -0.75)
    interp.lowrank(ws, lefts, rights, -0.75)                 # all five layers in one launch
    for buf, w, e, r, (m, n) in zip(bufs, ws, exact, ref, SHAPES):
        assert torch.isnan(buf[:, n:]).all(), "kernel wrote outside the weight"
        assert not torch.isnan(w).any(), "kernel left elements unwritten"
        if dtype == torch.float32:
            torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
        else:
            assert _err(w, e) <= 2 * _err(r, e) + 4 * FP32_EPS * float(e.abs().max())


def test_lowrank_update_mixed_dtypes_and_ranks(interp):
    # the last two: biases seen as [d, 1] columns (a patch's "bias" entries)
    ws = [torch.randn(9, 21), torch.randn(33, 8).half(), torch.randn(17, 19), torch.randn(5, 40).half(),
          torch.randn(13).view(-1, 1), torch.randn(29).half().view(-1, 1)]
    ks = [1, 17, 0, 2, 1, 1]
    lefts = [torch.randn(w.shape[0], k) for w, k in zip(ws, ks)]
    rights = [torch.randn(w.shape[1], k, dtype=torch.float64) for w, k in zip(ws, ks)]
    ref = [w.clone() for w in ws]
    reference.lowrank_update_(ref, lefts, rights, 0.5)
    interp.lowrank(ws, lefts, rights, 0.5)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, rtol=1e-5 if w.dtype == torch.float32 else 1e-3, atol=1e-5)


def test_lowrank_update_apply_then_revert(interp):
    _, ws, lefts, rights = _layers([(37, 23), (11, 70)], 5, torch.float32)
    before = [w.clone() for w in ws]
    interp.lowrank(ws, lefts, rights, 1.0)
    interp.lowrank(ws, lefts, rights, -1.0)
    for w, b in zip(ws, before):
        torch.testing.assert_close(w, b, rtol=0, atol=1e-5)


def test_lowrank_update_rejects_bad_input(interp):
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        interp.lowrank([torch.randn(6, 8).t()], [torch.randn(8, 2)], [torch.randn(6, 2)])
    with pytest.raises(ValueError, match="rows must be contiguous"):       # one row of such a view too
        interp.lowrank([torch.randn(6, 8).t()[2:3]], [torch.randn(1, 2)], [torch.randn(6, 2)])
    with pytest.raises(ValueError, match="do not fit"):
        interp.lowrank([w], [torch.randn(8, 2)], [torch.randn(5, 2)])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        interp.lowrank([w.double()], [torch.randn(8, 2)], [torch.randn(6, 2)])
    with pytest.raises(ValueError, match="lengths"):
        interp.lowrank([w], [], [])


# ----------------------------------------------------------------------- synthesis update
@pytest.fixture
def nan_outputs(monkeypatch):
    """Output buffers the kernel allocates start as NaN, so an unwritten element shows."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))


def _synth_inputs(n, c, h, w, gdtype):
    x = torch.randn(n, c, h, w)
    g = torch.randn(n, c, h, w).to(gdtype)
    active = torch.arange(n) % 3 != 1                          # mixed mask
    lo = torch.linspace(-1.2, -0.4, c)
    hi = torch.linspace(0.5, 1.3, c)
    return x, g, active, lo, hi


@pytest.mark.parametrize("blur", [False, True])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,shifts", [((4, 3, 13, 37), ((2, -3), (-1, 4))),
                                          ((2, 1, 1, 5), ((0, 7), (3, -2))),
                                          ((3, 2, 9, 3), ((-11, 1), (5, 0)))])
def test_synth_update_matches_reference(interp, nan_outputs, shape, shifts, gdtype, blur):
    x, g, active, lo, hi = _synth_inputs(*shape, gdtype)
    kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=shifts[0], out_shift=shifts[1], blur=blur)
    want = reference.synth_update(x, g, active, **kw)
    got = interp.synth(x, g, active, **kw)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == x.shape
        assert not torch.isnan(a).any(), "kernel left output elements unwritten"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0][~active], x[~active])             # inactive: carried over exactly


def test_synth_update_all_inactive_reads_no_grad(interp):
    x, g, _, lo, hi = _synth_inputs(3, 3, 8, 11, torch.float32)
    g.fill_(float("nan"))                                       # would poison any active item
    active = torch.zeros(3, dtype=torch.bool)
    x_new, x_next = interp.synth(x, g, active, lr=0.1, decay=0.0, lo=lo, hi=hi,
                                 in_shift=(1, 1), out_shift=(2, -1), blur=True)
    assert torch.equal(x_new, x)
    assert torch.equal(x_next, torch.roll(x, (2, -1), dims=(2, 3)))


def test_synth_update_rejects_bad_input(interp):
    x, g, active, lo, hi = _synth_inputs(2, 3, 5, 6, torch.float32)
    kw = dict(lr=0.1, decay=0.0, lo=lo, hi=hi, in_shift=(0, 0), out_shift=(0, 0), blur=False)
    with pytest.raises(TypeError, match="x.dtype"):
        interp.synth(x.half(), g, active, **kw)
    with pytest.raises(ValueError, match="same"):
        interp.synth(x, g[:, :2], active, **kw)
    with pytest.raises(TypeError, match="active.dtype"):
        interp.synth(x, g, active.float(), **kw)
    with pytest.raises(ValueError, match="lo"):
        interp.synth(x, g, active, **dict(kw, lo=lo[:2]))


# ----------------------------------------------------------------------- GPU, real sizes
def _gpu_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels")
    pytest.importorskip("triton")
    from clipforget_fast import kernels

    return kernels


@pytest.mark.gpu
@pytest.mark.parametrize("shapes, aligned", [
    ([(3840, 1280), (1280, 5120), (5120, 1280), (1024, 4096)], True),     # ViT-H-14's: the aligned path
    ([(1281, 777), (5120, 1)], False),              # ragged (a bias as a [d, 1] column): one launch apart
], ids=["aligned", "ragged"])
@pytest.mark.parametrize("k", [1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lowrank_update_gpu(dtype, k, shapes, aligned):
    kernels = _gpu_kernels()
    ws = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    vec = 16 // ws[0].element_size()        # the launcher's ALIGN > 1 path: 16-byte pointers and rows
    assert all(w.data_ptr() % 16 == 0 and w.shape[1] % vec == 0 for w in ws) == aligned
    lefts = [torch.randn(s[0], k, device="cuda") / math.sqrt(k) for s in shapes]
    rights = [torch.randn(s[1], k, device="cuda") for s in shapes]
    exact = [w.to(torch.float32, copy=True) for w in ws]
    reference.lowrank_update_(exact, lefts, rights, 0.5)
    ref = [w.clone() for w in ws]
    reference.lowrank_update_(ref, lefts, rights, 0.5)
    kernels.lowrank_update_triton(ws, lefts, rights, 0.5)
    for w, e, r in zip(ws, exact, ref):
        assert _err(w, e) <= 2 * _err(r, e) + 4 * FP32_EPS * float(e.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("blur", [False, True])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_synth_update_gpu(gdtype, blur):
    kernels = _gpu_kernels()
    x, g, active, lo, hi = (t.cuda() for t in _synth_inputs(64, 3, 224, 224, gdtype))
    kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=(2, -1), out_shift=(-2, 1), blur=blur)
    want = reference.synth_update(x, g, active, **kw)
    got = kernels.synth_update_triton(x, g, active, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
