"""Triton kernels of clipforget_fast (installed as ``clipforget_fast.kernels``).

One module per op, each holding its private kernel and one launcher with the signature of its torch
twin in ``clipforget_fast.reference``. Import only through ``clipforget_fast.dispatch``, which decides
when Triton runs.
"""
from .lowrank_update import lowrank_update_triton
from .synth_update import synth_update_triton

__all__ = ["lowrank_update_triton", "synth_update_triton"]
