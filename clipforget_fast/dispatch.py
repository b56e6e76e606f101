"""Backend dispatch: the one module that decides between Triton kernels, the C++ CPU kernel and the
pure-torch reference, and the only one (besides ``clipforget_fast.kernels``) that imports Triton.

``CLIPFORGET_BACKEND=auto|triton|torch|cpp`` (read at every call) forces a path:

* ``auto``   Triton for CUDA tensors when Triton imports; on CPU the C++ kernel for
             ``lowrank_update_`` when it was built at install time (4.2–4.5× faster than the torch
             path on 16-bit ViT-H-14 weights, 1.6× on fp32, bench/RESULTS.md); the torch reference otherwise (a fallback
             from CUDA tensors is logged once).
* ``triton`` Triton kernels, on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
             before the kernels were first imported (Triton's interpreter: how tests run them).
* ``torch``  the reference in ``clipforget_fast.reference``.
* ``cpp``    the C++ CPU kernel (``csrc/``, built on first use) for ``lowrank_update_`` on CPU
             tensors; ops without a C++ kernel use the torch reference, which is native CPU code.

An explicit choice that cannot run raises ``RuntimeError``; an unknown name raises ``ValueError``.
Triton is imported lazily, at the first call that needs it.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import reference

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "torch", "cpp")
_CPP_OPS = ("lowrank_update_",)       # ops that have a C++ kernel
_logged: set[str] = set()


def requested_backend() -> str:
    """The backend named by CLIPFORGET_BACKEND (default ``auto``); ValueError on an unknown name."""
    name = os.environ.get("CLIPFORGET_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"CLIPFORGET_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def _load_kernels():
    """(kernels module, interpreted?, None) or (None, False, reason); imported once per process."""
    try:
        from clipforget_fast import kernels
    except Exception as err:  # no triton, or a triton that cannot load here
        return None, False, f"{type(err).__name__}: {err}"
    return kernels, interpreter_requested(), None


def triton_available() -> bool:
    """Whether the Triton kernels import in this process."""
    return _load_kernels()[0] is not None


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def backend_for(tensor: torch.Tensor, op: str = "lowrank_update_") -> str:
    """The backend (``"triton"``, ``"cpp"`` or ``"torch"``) that runs ``op`` on ``tensor``'s device.

    Raises RuntimeError when CLIPFORGET_BACKEND names a backend that cannot run here.
    """
    name = requested_backend()
    dev = tensor.device.type
    if name == "torch":
        return "torch"
    if name == "cpp":
        if op not in _CPP_OPS:
            return "torch"
        if dev != "cpu":
            raise RuntimeError(f"CLIPFORGET_BACKEND=cpp runs on CPU tensors; {op} got a {dev} tensor")
        from . import _cpp

        if _cpp.load() is None:
            raise RuntimeError("CLIPFORGET_BACKEND=cpp but the C++ kernel could not be built "
                               "(see the warning above)")
        return "cpp"
    kernels, interpreted, reason = _load_kernels() if (dev == "cuda" or name == "triton") else (None, False, "")
    if name == "triton":
        if kernels is None:
            raise RuntimeError(f"CLIPFORGET_BACKEND=triton but Triton kernels cannot be imported ({reason})")
        if dev == "cuda":
            return "triton"
        if dev == "cpu" and interpreted and interpreter_requested():
            return "triton"
        if dev == "cpu" and interpreter_requested():
            raise RuntimeError("CLIPFORGET_BACKEND=triton on CPU: TRITON_INTERPRET=1 was set after the "
                               "kernels were imported; set it before the first kernel call")
        raise RuntimeError(f"CLIPFORGET_BACKEND=triton cannot run on {dev} tensors "
                           "(CPU needs TRITON_INTERPRET=1, set before Triton is imported)")
    if dev == "cuda":                                    # auto
        if kernels is not None:
            return "triton"
        _log_once(f"Triton unavailable ({reason}); {op} uses the torch reference on CUDA")
    if dev == "cpu" and op in _CPP_OPS:
        from . import _cpp

        if _cpp.prebuilt() is not None:                  # auto never compiles at run time
            return "cpp"
    return "torch"


def lowrank_update_(weights: list[torch.Tensor], lefts: list[torch.Tensor],
                    rights: list[torch.Tensor], scale: float = 1.0) -> None:
    """``W_l += scale * L_l R_lᵀ`` for all l, in place (see ``reference.lowrank_update_``).

    weights[l]: [m_l, n_l] fp32/fp16/bf16; lefts[l]: [m_l, k_l]; rights[l]: [n_l, k_l].
    Layers are grouped by device; each group runs on the backend chosen for that device (on Triton,
    one launch per weight dtype covering every layer of that dtype). The kernels read rows as
    contiguous: a weight whose columns are strided (a transposed view) takes the torch reference.
    """
    if not len(weights) == len(lefts) == len(rights):
        raise ValueError(f"weights, lefts, rights have lengths {len(weights)}, {len(lefts)}, "
                         f"{len(rights)}; they must match")
    by_device: dict[object, list[int]] = {}
    for i, w in enumerate(weights):
        strided = w.dim() == 2 and w.shape[1] > 1 and w.stride(1) != 1
        by_device.setdefault("strided" if strided else w.device, []).append(i)
    for key, idx in by_device.items():
        ws, ls, rs = ([seq[i] for i in idx] for seq in (weights, lefts, rights))
        backend = "torch" if key == "strided" else backend_for(ws[0], "lowrank_update_")
        if backend == "triton":
            _load_kernels()[0].lowrank_update_triton(ws, ls, rs, scale)
        elif backend == "cpp":
            from . import _cpp

            _cpp.load().lowrank_update_(ws, ls, rs, float(scale))
        else:
            reference.lowrank_update_(ws, ls, rs, scale)
            continue
        # the kernels write through the data pointer, which autograd does not see: count the write in each
        # weight's version counter, as an in-place op does (a graph that saved the weight then refuses to
        # run backward, and whatever keys on the counter sees the change)
        for w in ws:
            torch.autograd.graph.increment_version(w)


def synth_update(x: torch.Tensor, grad_in: torch.Tensor, active: torch.Tensor,
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """One prototype-synthesis step; x, grad_in: [N, C, H, W], active: [N] bool; keywords and
    results as ``reference.synth_update``."""
    if backend_for(x, "synth_update") == "triton":
        return _load_kernels()[0].synth_update_triton(x, grad_in, active, **kw)
    return reference.synth_update(x, grad_in, active, **kw)
