"""Loader of the optional C++ CPU kernel ``csrc/lowrank_update.cpp`` (multi-layer apply on CPU).

Either built at install time as ``clipforget_fast._lowrank_cpu`` (setup.py, optional), or built on
first use with ``torch.utils.cpp_extension.load`` into the user cache
(``$XDG_CACHE_HOME/clipforget_fast/cpp``, or ``CLIPFORGET_CPP_BUILD_DIR``), so the package never
needs a compiler to install or run: without one (or without the source, in a wheel install) this
module warns once and ``load()`` returns None, and callers use the torch reference.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "lowrank_update.cpp"
_NAME = "clipforget_fast_lowrank_cpu"


def build_dir() -> Path:
    """Where the extension is compiled and cached."""
    env = os.environ.get("CLIPFORGET_CPP_BUILD_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "clipforget_fast" / "cpp"


@functools.lru_cache(maxsize=1)
def prebuilt():
    """The extension built at install time, or None (never compiles)."""
    try:
        from . import _lowrank_cpu
    except ImportError:
        return None
    return _lowrank_cpu


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False):
    """The compiled module (``lowrank_update_(weights, lefts, rights, scale)``) or None."""
    if prebuilt() is not None:
        return prebuilt()
    if not SOURCE.is_file():
        warnings.warn(f"C++ kernel source {SOURCE} not found; the torch reference is used", stacklevel=2)
        return None
    try:
        from torch.utils import cpp_extension

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=_NAME, sources=[str(SOURCE)], build_directory=str(out), verbose=verbose,
            # -march=native: the build is cached per machine and runs only where it was built.
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, build error: the torch path still works
        warnings.warn(f"C++ kernel could not be built ({type(err).__name__}: {err}); "
                      "the torch reference is used", stacklevel=2)
        return None
