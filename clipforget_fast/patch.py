"""Patch: a small, reversible, composable low-rank edit of a CLIP model (DESIGN §2.6–2.7).

For a layer y = W x (W: [d_out, d_in]) and orthonormal forget directions U_F [d_in, k]:

    W' = W (I - α U_F U_Fᵀ) = W + A Bᵀ,     A = -α W U_F  [d_out, k],   B = U_F  [d_in, k]

A raw projection P ([d_in, d_out], y = x P) is W = Pᵀ, so P' = P + B Aᵀ. A bias b [d_out] (the domain
gate rewires a few hidden units of an MLP, ``gate.py``) is held as A = the change [d_out, 1], B = [[1]].
``apply`` adds every entry in one dispatch call (one kernel launch on GPU), ``revert`` subtracts it. A
patch records a SHA-256 of each base tensor and refuses a model whose tensors differ, unless forced; it
is saved as safetensors with its spec, config and library version in the metadata.

Patches stack: one computed on a model that carries others records, per weight, the patches under it
(their ``key``s, oldest first) and the hash of the weight beneath them all (its ``root``). Applying a
patch leaves a mark on each weight it checked, "this tensor is that root with these patches on it", and
reverting one takes its key off; a later patch takes a weight whose mark names its own root and
patches, whatever bits another backend, a half-precision copy or a revert's rounding left (a mark lasts
while the tensor is not written otherwise: its storage and version counter unchanged; writes through
``.data`` escape it). A forced apply leaves no mark.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import dispatch
from ._version import __version__
from .layers import IMAGE_PREFIXES, TensorMemo, hf_names, is_hf_clip, open_clip_name

_STACK_ATTR = "_clipforget_stack"    # on the model: applied patches, oldest first
_FORMAT = "clipforget_fast.patch/1"
LAYOUTS = ("linear", "in_out", "bias")


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    # flat first: a size-1 dimension may keep any stride in a "contiguous" tensor, which view() refuses;
    # the array's own buffer, not a copy of it (hashlib reads it with the GIL released)
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def cast_hashes(t: torch.Tensor) -> dict[str, str]:
    """{dtype name: ``tensor_hash`` of ``t`` cast to it} for the half dtypes, where ``t`` is fp32 (else
    empty): a patch computed on fp32 weights then recognizes the same weights held in half precision."""
    if t.dtype != torch.float32:
        return {}
    return {_dtype_name(d): tensor_hash(t.detach().to(d)) for d in HALF_DTYPES}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Mark(NamedTuple):
    """What a weight holds, as the patches applied to it in this process know: the weight hashed
    ``root`` with the patches ``chain`` (their keys, oldest first) added, up to rounding."""
    root: str
    chain: tuple


# weight -> Mark, made stale by any other write to it (load_state_dict, an in-place op, ``.to``)
_MARKS = TensorMemo()


def mark_of(weight: torch.Tensor) -> Mark | None:
    """The mark the patches applied in this process left on ``weight``, None if none or stale."""
    return _MARKS.get(weight)


def _set_mark(weight: torch.Tensor, root: str | None, chain: tuple) -> None:
    _MARKS.set(weight, None if root is None else Mark(root, tuple(chain)))


@dataclass(eq=False)
class PatchEntry:
    name: str            # parameter name in model.named_parameters()
    layout: str          # "linear" ([d_out, d_in]), "in_out" ([d_in, d_out]) or "bias" ([d_out]; k = 1, B = [[1]])
    A: torch.Tensor      # [d_out, k] fp32
    B: torch.Tensor      # [d_in, k] fp32, orthonormal columns (the directions of the inputs it changes)
    base_hash: str       # tensor_hash of the weight the patch was computed on
    cast_hashes: dict = field(default_factory=dict)   # cast_hashes of that weight: {dtype name: hash}
    root: str | None = None   # the hash of that weight beneath the patches applied to it (None: base_hash)
    under: tuple = ()         # the keys of those patches, oldest first (none: computed on the bare weight)

    def __post_init__(self):
        self.root = self.base_hash if self.root is None else self.root
        self.under = tuple(self.under)

    @classmethod
    def on(cls, name: str, layout: str, A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor) -> "PatchEntry":
        """An entry computed on ``weight``, recording its hash and its half-precision casts' hashes, and
        (from the weight's mark) the patches applied to it and the weight beneath them."""
        m = mark_of(weight)
        base = tensor_hash(weight)
        return cls(name, layout, A, B, base, cast_hashes(weight), m.root if m else base, m.chain if m else ())

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is the one this entry was computed on: its mark names this entry's root and
        patches, or it is that weight bit for bit, or that weight cast to half precision."""
        m = mark_of(weight)
        if m is not None and (m.root, m.chain) == (self.root, self.under):
            return True
        return tensor_hash(weight) in (self.base_hash, self.cast_hashes.get(_dtype_name(weight.dtype)))

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the parameter this entry edits."""
        if self.layout == "bias":
            return (self.A.shape[0],)
        return (self.A.shape[0], self.B.shape[0]) if self.layout == "linear" else (self.B.shape[0], self.A.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with param += L Rᵀ for this entry's storage layout (a bias seen as [d_out, 1])."""
        return (self.B, self.A) if self.layout == "in_out" else (self.A, self.B)


@dataclass(eq=False)
class Patch:
    entries: list[PatchEntry]
    spec: dict = field(default_factory=dict)       # ForgetSpec.to_dict()
    config: dict = field(default_factory=dict)     # ForgetConfig.to_dict()
    info: dict = field(default_factory=dict)       # per-layer ranks, synthesis stats, timings
    version: str = __version__
    key: str | None = None   # the patch's identity in the stacks it joins (default: a hash of its entries);
                             # ``only`` and ``converted`` copies keep it

    def __post_init__(self):
        if self.key is None:
            h = hashlib.sha256()
            for e in self.entries:
                h.update(f"{e.name}|{e.layout}|{e.base_hash}|".encode())
                for t in (e.A, e.B):
                    h.update(tensor_hash(t).encode())
            self.key = h.hexdigest()[:32]

    @property
    def timings(self) -> dict:
        return self.info.get("timings", {})

    def __repr__(self) -> str:
        ranks = ", ".join(f"{e.name}: k={e.rank}" for e in self.entries)
        return f"Patch({len(self.entries)} layers; {ranks})"

    def only(self, tower: str) -> "Patch":
        """The entries of one tower, ``"image"`` or ``"text"``, as a patch of their own (same spec,
        config and info): for a tower used apart from its model, e.g. Hugging Face's
        ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``, which name their weights as
        ``CLIPModel`` does. It may have no entries (the class redirect edits the text side only)."""
        if tower not in ("image", "text"):
            raise ValueError(f"tower={tower!r} must be 'image' or 'text'")
        keep = [e for e in self.entries if (tower == "image") == e.name.startswith(IMAGE_PREFIXES)]
        return Patch(keep, self.spec, self.config, {**self.info, "tower": tower}, self.version, self.key)

    def converted(self, model: nn.Module, force: bool = False) -> "Patch":
        """This patch for the same network held in the other model family: computed on an open_clip CLIP,
        for the Hugging Face CLIPModel with its weights, or the reverse (names, layouts, and open_clip's
        fused attention ``in_proj_weight`` as Hugging Face's q, k, v weights). Each weight of ``model`` is
        checked against the one the patch was computed on (ValueError naming the first that differs,
        unless ``force``); the new entries record ``model``'s own hashes. A patch that already names
        ``model``'s weights comes back as a copy."""
        params = dict(model.named_parameters())
        if all(e.name in params for e in self.entries):
            return Patch(list(self.entries), self.spec, self.config, dict(self.info), self.version, self.key)
        entries = (self._to_hf(params, force) if is_hf_clip(model) else self._to_open_clip(params, force))
        return Patch(entries, self.spec, self.config, {**self.info, "converted": True}, self.version, self.key)

    def _to_hf(self, params: dict, force: bool) -> list[PatchEntry]:
        out = []
        for e in self.entries:
            names = hf_names(e.name)
            ws = [_param(params, n) for n in names]
            src = torch.cat(ws).detach() if len(ws) > 1 else ws[0].t() if e.layout == "in_out" else ws[0]
            _check_base(e, src, force, ws)
            rows = ws[0].shape[0]
            layout = "bias" if e.layout == "bias" else "linear"
            for j, (n, w) in enumerate(zip(names, ws)):
                A = e.A[j * rows:(j + 1) * rows] if len(ws) > 1 else e.A
                out.append(PatchEntry.on(n, layout, A.clone(), e.B.clone(), w))
        return out

    def _to_open_clip(self, params: dict, force: bool) -> list[PatchEntry]:
        groups, layouts = {}, {}                      # open_clip name -> {q/k/v third or None: entry}
        for e in self.entries:
            name, layouts[name], part = open_clip_name(e.name)
            groups.setdefault(name, {})[part] = e
        out = []
        for name, parts in groups.items():
            p = _param(params, name)
            if None in parts:                         # one weight: the same factors, open_clip's layout
                e = parts[None]
                _check_base(e, p.t() if layouts[name] == "in_out" else p, force)
                out.append(PatchEntry.on(name, layouts[name], e.A.clone(), e.B.clone(), p))
                continue
            if sorted(parts) != [0, 1, 2]:
                raise ValueError(f"{name!r}: the patch holds only some of q, k, v; open_clip fuses all three")
            q, k, v = parts[0], parts[1], parts[2]
            for j, e in enumerate((q, k, v)):
                _check_base(e, p.chunk(3)[j], force, [p])
            out.append(PatchEntry.on(name, "linear", torch.cat([q.A] + [_in_basis(e, q.B, name) for e in (k, v)]),
                                     q.B.clone(), p))
        return out

    # ---- apply / revert ---------------------------------------------------------------------
    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        out = []
        for e in self.entries:
            p = params.get(e.name)
            if p is None:
                raise ValueError(f"patch targets {e.name!r}, which this model does not have")
            if tuple(p.shape) != e.shape:
                raise ValueError(f"patch entry {e.name!r} expects shape {e.shape}, model has {tuple(p.shape)}")
            out.append(p)
        return out

    def _update(self, params: list[torch.Tensor], scale: float) -> None:
        lefts, rights = [], []
        for e, p in zip(self.entries, params):
            L, R = e.factors()
            lefts.append(L.to(p.device))
            rights.append(R.to(p.device))
        with torch.no_grad():
            dispatch.lowrank_update_([p.data.view(-1, 1) if p.dim() == 1 else p.data for p in params], lefts, rights,
                                     scale)

    def apply(self, model: nn.Module, force: bool = False) -> nn.Module:
        """Add the patch to ``model``'s weights in place; returns the model.

        Raises ValueError if a targeted tensor is missing, has another shape, or (unless ``force``)
        differs from the one the patch was computed on, from that one cast to fp16 or bf16 (for a patch
        computed on fp32 weights), and from what the patches applied in this process say it holds (the
        same weight with the same patches under it, or left by reverts: equal up to rounding).
        """
        params = self._params(model)
        if not force:
            for e, p in zip(self.entries, params):
                if not e.matches(p):
                    raise ValueError(f"model tensor {e.name!r} is not the one this patch was computed "
                                     f"on{_casts_note(e, p)} (hash mismatch); pass force=True to apply anyway")
        self._update(params, 1.0)
        for e, p in zip(self.entries, params):          # checked: the root with these patches; forced: unknown
            _set_mark(p, None if force else e.root, e.under + (self.key,))
        stack = getattr(model, _STACK_ATTR, None)
        if stack is None:
            stack = []
            object.__setattr__(model, _STACK_ATTR, stack)
        stack.append(self)
        return model

    def revert(self, model: nn.Module, force: bool = False) -> nn.Module:
        """Subtract the patch from ``model``'s weights; patches revert in reverse order of apply.

        Restores the base weights up to one rounding to the weight dtype per apply/revert.
        """
        stack = getattr(model, _STACK_ATTR, [])
        if not force:
            if not stack or stack[-1] is not self:
                raise ValueError("this patch is not the last one applied to the model: revert the "
                                 "later patches first (or pass force=True)")
        params = self._params(model)
        marks = [mark_of(p) for p in params]
        self._update(params, -1.0)
        for p, m in zip(params, marks):                 # this patch's key comes off the weight's mark
            ok = m is not None and m.chain[-1:] == (self.key,)
            _set_mark(p, m.root if ok else None, m.chain[:-1] if ok else ())
        self._unstack(model)
        return model

    def _unstack(self, model: nn.Module) -> None:
        """Take this patch (its latest entry) off the model's stack of applied patches."""
        stack = getattr(model, _STACK_ATTR, [])
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break

    @contextlib.contextmanager
    def applied(self, model: nn.Module, force: bool = False):
        """The patch applied for the duration of a ``with`` block; afterwards the targeted weights are
        restored bit for bit from a copy taken on entry (not by subtraction), whatever happened inside.
        Patches applied inside the block must be reverted inside it.

            with patch.applied(model):
                after = evaluate(model, tokenizer, images, ...)
        """
        params = self._params(model)
        saved = [p.detach().clone() for p in params]
        marks = [mark_of(p) for p in params]
        self.apply(model, force)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s, m in zip(params, saved, marks):
                    p.copy_(s)
                    _set_mark(p, m.root if m else None, m.chain if m else ())
            self._unstack(model)

    # ---- save / load --------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the patch as safetensors (A::name, B::name) with JSON metadata, atomically."""
        path = safetensors_path(path, "patch")
        tensors, meta = {}, []
        for e in self.entries:
            # copies: entries may share a factor (q, k and v one basis), which safetensors refuses
            tensors[f"A::{e.name}"] = e.A.detach().float().cpu().clone(memory_format=torch.contiguous_format)
            tensors[f"B::{e.name}"] = e.B.detach().float().cpu().clone(memory_format=torch.contiguous_format)
            meta.append({"name": e.name, "layout": e.layout, "base_hash": e.base_hash,
                         **({"cast_hashes": e.cast_hashes} if e.cast_hashes else {}),
                         **({"root": e.root, "under": list(e.under)} if e.under else {})})
        header = {"format": _FORMAT, "version": self.version, "key": self.key, "entries": meta,
                  "spec": self.spec, "config": self.config, "info": self.info}
        return atomic_safetensors(tensors, path, {"clipforget": json.dumps(header)})

    @classmethod
    def load(cls, path) -> "Patch":
        """Read a patch written by ``save``; ValueError if the file is not one."""
        header, tensors = read_safetensors(path, "clipforget", _FORMAT, "patch file")

        def bad(why: str):
            return ValueError(f"{str(path)!r}: not a well-formed patch file ({why})")

        metas = header.get("entries")
        if not isinstance(metas, list):
            raise bad("no list of entries")
        entries = []
        for i, m in enumerate(metas):
            if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("base_hash"), str)):
                raise bad(f"entry {i} lacks a name or base hash")
            name, layout = m["name"], m.get("layout")
            if layout not in LAYOUTS:
                raise bad(f"{name!r} has layout {layout!r}, not one of {LAYOUTS}")
            A, B = tensors.get(f"A::{name}"), tensors.get(f"B::{name}")
            if A is None or B is None:
                raise bad(f"{name!r} lacks its A or B tensor")
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
                raise bad(f"{name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [d_out, k] and [d_in, k]")
            casts, under = m.get("cast_hashes", {}), m.get("under", [])
            if not (isinstance(casts, dict) and isinstance(under, list)):
                raise bad(f"{name!r}: cast_hashes or under of the wrong type")
            entries.append(PatchEntry(name, layout, A, B, m["base_hash"], dict(casts), m.get("root"), tuple(under)))
        parts = [header.get(k, {}) for k in ("spec", "config", "info")]
        if not all(isinstance(x, dict) for x in parts):
            raise bad("spec, config or info is not a mapping")
        return cls(entries, *parts, header.get("version", "?"), header.get("key"))


def _casts_note(e: PatchEntry, weight: torch.Tensor) -> str:
    """Where a tensor's dtype is not the patch's: which dtypes the patch recognizes its weights in."""
    if not e.cast_hashes or weight.dtype == torch.float32 or _dtype_name(weight.dtype) in e.cast_hashes:
        return ""
    return (f" (its {_dtype_name(weight.dtype)} weights are not recognized: the patch knows its weights in "
            f"float32 and as {', '.join(sorted(e.cast_hashes))})")


def _param(params: dict, name: str) -> torch.Tensor:
    if name not in params:
        raise ValueError(f"the model has no {name!r}, which the converted patch needs")
    return params[name]                 # the parameter itself: its mark is keyed on it


def _check_base(e: PatchEntry, weight: torch.Tensor, force: bool, held=()) -> None:
    """``weight`` (seen in the layout the entry was computed on) must be the entry's base weight: those
    bits, or the model's tensors ``held`` (that ``weight`` is read from) marked as carrying the patches
    the entry was computed on top of (converted too: a converted patch keeps its key)."""
    if force:
        return
    marks = [mark_of(t) for t in held]
    if e.under and marks and all(m is not None and m.chain == e.under for m in marks):
        return
    if not e.matches(weight):
        raise ValueError(f"the model's counterpart of {e.name!r} is not the weight this patch was computed on "
                         "(hash mismatch); pass force=True to convert anyway")


def _in_basis(e: PatchEntry, B: torch.Tensor, name: str) -> torch.Tensor:
    """``e``'s A for the forget directions ``B`` [d_in, k] where ``e.B`` spans the same space (as q, k and v
    solved apart from one Gram do, up to rounding): A (B_eᵀ B), so that A' Bᵀ = A B_eᵀ."""
    if torch.equal(e.B, B):
        return e.A
    Pe, P = e.B.double() @ e.B.double().t(), B.double() @ B.double().t()
    if e.B.shape != B.shape or float((Pe - P).abs().max()) > 1e-4:
        raise ValueError(f"{name!r}: q, k and v have different forget directions; they cannot be fused")
    return (e.A.double() @ (e.B.double().t() @ B.double())).to(e.A.dtype)


def safetensors_path(path, what: str) -> Path:
    """``path`` as a Path, checked as a place to write a .safetensors ``what``: ValueError otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what} path {str(path)!r} must end in .safetensors")
    if not path.parent.is_dir():
        raise ValueError(f"directory {str(path.parent)!r} does not exist")
    return path


def read_safetensors(path, key: str, fmt: str, what: str) -> tuple[dict, dict]:
    """(header, tensors) of a safetensors file whose metadata ``key`` holds a JSON header with
    ``"format": fmt``; ValueError naming ``what`` when there is no such file or it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {what} at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if key not in meta:
                raise ValueError(f"{str(path)!r} is a safetensors file but not a clipforget {what}")
            try:
                header = json.loads(meta[key])
            except ValueError as e:
                raise ValueError(f"{str(path)!r}: the {what}'s header is not JSON ({e})") from e
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r}: the {what}'s header is a {type(header).__name__}, not a JSON object")
    if header.get("format") != fmt:
        raise ValueError(f"{str(path)!r}: unknown {what} format {header.get('format')!r}")
    return header, tensors


def atomic_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write ``tensors`` ({name: tensor}) to the safetensors file ``path`` through a temporary file in the
    same folder, moved into place only once complete: a failed write leaves no file behind."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        plain_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plain_permissions(path, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by ``tempfile`` (0600 / 0700) the permissions a plain
    ``open`` / ``mkdir`` would have given it under the process's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~process_umask())


def process_umask() -> int:
    """The process's umask. Read from /proc where the kernel reports it (Linux 4.7+): setting and
    restoring it, the only other way, briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def applied_patches(model: nn.Module) -> list[Patch]:
    """Patches applied to ``model`` (oldest first) by this process."""
    return list(getattr(model, _STACK_ATTR, []))
