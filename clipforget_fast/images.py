"""Image files read as the model reads them.

    images = read_images(files, preprocess)                 # [n, 3, H, W], decoded now
    source = ImageFiles(files, preprocess, torch.float16)   # decoded a slice at a time, by a few threads
    patch = forget(model, tokenizer, spec, domain_examples={"sketch": source})

``preprocess`` is the model's own (open_clip's ``create_model_and_transforms``, or a Hugging Face image
processor wrapped to return one [3, H, W] tensor). ``ImageFiles`` holds the file names only: ``forget``
decodes its examples one batch at a time as the gate reads them, so a folder of any size costs the
memory of one batch.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def read_image(path, preprocess, what: str = "images") -> torch.Tensor:
    """One file, converted to RGB and preprocessed into [3, H, W]; a file PIL cannot read, or a preprocess
    that gives anything else, is named in a ValueError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            x = preprocess(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(path)!r} ({e})") from e
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = f"a {type(x).__name__}" if not isinstance(x, torch.Tensor) else f"a tensor of shape {tuple(x.shape)}"
        raise ValueError(f"{what}: preprocess gave {got} for {str(path)!r}, not one image [3, H, W] (a Hugging Face "
                         f"image processor returns a batch: wrap it, lambda im: proc(im, return_tensors='pt')"
                         f"['pixel_values'][0])")
    return x


def default_workers() -> int:
    """Threads that decode image files (and hash weights): the cores this process may use, shared with the
    other processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                   # no affinity on this platform
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(8, cores // local))


def read_images(files, preprocess, what: str = "images", dtype: torch.dtype = torch.float32,
                workers: int | None = None) -> torch.Tensor:
    """[n, 3, H, W] ``dtype``: the images ``files``, preprocessed, written into one tensor as they are read
    (no list of them held beside it: at most a few per thread are decoded ahead). The image tower's dtype
    holds them as the model will read them, in half the memory for a half-precision model. A file that
    preprocesses to another shape than the ones before it is named in a ValueError (``what`` starts every
    message); with several bad files, the first in order. ``workers`` threads decode the files (None:
    ``default_workers()``; 1: in this thread): decoding and the usual preprocessing release the GIL, and
    ``preprocess`` must be safe to call from several threads at once (a stateless transform is)."""
    files = list(files)
    if not files:
        raise ValueError(f"{what}: no files")
    workers = default_workers() if workers is None else workers
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"{what}: workers must be an int ≥ 1, got {workers!r}")
    out = None

    def put(k, f, x):
        nonlocal out
        if out is None:
            out = torch.empty(len(files), *x.shape, dtype=dtype)
        elif x.shape != out.shape[1:]:
            raise ValueError(f"{what}: {str(f)!r} preprocesses to {tuple(x.shape)}, the images before it to "
                             f"{tuple(out.shape[1:])}")
        out[k] = x

    if workers == 1 or len(files) == 1:
        for k, f in enumerate(files):
            put(k, f, read_image(f, preprocess, what))
        return out
    ahead = 2 * workers                      # decoded images waiting to be written: a bounded window
    with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
        pending = deque()
        try:
            for k, f in enumerate(files):
                pending.append((k, f, pool.submit(read_image, f, preprocess, what)))
                if len(pending) >= ahead:
                    j, g, fut = pending.popleft()
                    put(j, g, fut.result())
            while pending:
                j, g, fut = pending.popleft()
                put(j, g, fut.result())
        finally:
            for _, _, fut in pending:        # an error: the files not yet started are not read
                fut.cancel()
    return out


class ImageFiles:
    """Image files as a sequence of preprocessed images that decodes only the slice asked for:
    ``source[lo:hi]`` is ``read_images(files[lo:hi], preprocess, what, dtype, workers)``. ``forget`` takes
    one as a ``domain_examples`` value and reads it a batch at a time; so do ``evaluate`` and
    ``evaluate_patches``."""

    def __init__(self, files, preprocess, dtype: torch.dtype = torch.float32, what: str = "images",
                 workers: int | None = None):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError(f"{what}: no files")
        if not callable(preprocess):
            raise TypeError(f"{what}: preprocess must be callable (an image → a [3, H, W] tensor), got "
                            f"{type(preprocess).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{what}: dtype must be a floating torch.dtype, got {dtype!r}")
        if workers is not None and not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"{what}: workers must be an int ≥ 1 or None, got {workers!r}")
        self.preprocess, self.dtype, self.what, self.workers = preprocess, dtype, what, workers
        self._shape = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError(f"ImageFiles is read by slices (source[lo:hi]), not by {type(rows).__name__}")
        files = self.files[rows]
        if not files:
            if self._shape is None:
                self._shape = tuple(read_image(self.files[0], self.preprocess, self.what).shape)
            return torch.empty(0, *self._shape, dtype=self.dtype)
        out = read_images(files, self.preprocess, self.what, self.dtype, self.workers)
        self._shape = tuple(out.shape[1:])
        return out

    def __repr__(self) -> str:
        return f"ImageFiles({len(self.files)} files, {self.dtype})"


def check_images(x, what: str, H: int, W: int) -> None:
    """A ValueError naming ``what`` unless ``x`` is floating images [n ≥ 1, 3, H, W]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[1:] != (3, H, W):
        got = f"a {type(x).__name__}" if not isinstance(x, torch.Tensor) else f"{x.dtype} of shape {tuple(x.shape)}"
        raise ValueError(f"{what}: expected floating images [n, 3, {H}, {W}] preprocessed as the model's inputs, "
                         f"got {got}")
    if len(x) == 0:
        raise ValueError(f"{what}: no images")


class CheckedRows:
    """A caller's image source (``len``, and slices that are image tensors, such as ``ImageFiles``) whose
    every slice is checked as it is read: floating images [k, 3, H, W] with finite pixels, the rows named
    (after ``what``) where one is not."""

    def __init__(self, source, what: str, H: int, W: int):
        self.source, self.what, self.H, self.W = source, what, H, W

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        x = self.source[rows]
        lo, hi, _ = rows.indices(len(self))
        what = f"{self.what} rows {lo}:{hi}"
        if hi > lo:
            check_images(x, what, self.H, self.W)
            if len(x) != hi - lo:
                raise ValueError(f"{what}: the source gave {len(x)} images for {hi - lo} rows")
            if not torch.isfinite(x).all():
                raise ValueError(f"{what}: images with NaN or infinite pixels")
        return x


def image_source(x, what: str, H: int, W: int) -> CheckedRows:
    """``x``, a caller's source of images that is not a tensor (``len``, and slices that are image tensors:
    ``ImageFiles``), as ``CheckedRows``; a ValueError naming ``what`` for anything else (a list of tensors
    included: its slices are lists) or for an empty source."""
    if isinstance(x, (list, tuple, str, bytes, Mapping)) or not (hasattr(x, "__len__") and hasattr(x, "__getitem__")):
        raise ValueError(f"{what}: expected floating images [n, 3, {H}, {W}] preprocessed as the model's inputs (a "
                         f"tensor, or a source that slices into them such as ImageFiles), got a {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{what}: no images")
    return CheckedRows(x, what, H, W)
