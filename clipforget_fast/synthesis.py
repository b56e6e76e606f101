"""Prototype synthesis: images made from noise that the image encoder places on a cell's text
embedding, so an edit of the image tower needs no real images (DESIGN §2.3).

Recipe of Kravets & Namboodiri (WACV 2025), batched over all prototypes of all cells:

    x ~ N(0, σ²) clamped to the valid pixel range
    repeat up to ``steps`` times:
        x_in  = roll(x, random jitter)                     (encoder input)
        loss  = Σ_i CE(s · ê(x_in_i) · T̂ᵀ, target_i)       (T̂: every cell's text embedding)
        x     = clamp(x (1 - η λ) - η ∇x / rms(∇x), range)  (+ a 3×3 blur every n steps)
        a prototype whose p(target) ≥ threshold (from step ``min_steps`` on) is accepted and stops moving

Model parameters are frozen (``requires_grad_(False)``) for the duration, so autograd computes pixel
gradients only; on CUDA the encoder runs under bf16 autocast. The update itself is one dispatch call
(the fused Triton kernel on GPU). When fewer than half the batch is still active, the batch is
compacted so accepted prototypes cost no more encoder passes.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from ._version import __version__
from .config import ForgetConfig
from .distributed import World
from .layers import encode_image, image_geometry

# Standard deviation of the initial noise in normalized-pixel units: about a third of the valid range.
INIT_STD = 0.5


@dataclass
class SynthesisResult:
    images: torch.Tensor      # [N, 3, H, W] fp32, normalized pixels
    target: torch.Tensor      # [N] long, index of each prototype's cell
    accepted: torch.Tensor    # [N] bool, p(target) reached the threshold
    steps: torch.Tensor       # [N] long, steps taken (to acceptance, or the maximum)
    final_prob: torch.Tensor  # [N] fp32, p(target) at the last evaluation
    seconds: float

    def stats(self) -> dict:
        acc = self.accepted
        return {"prototypes": int(acc.numel()), "accepted": int(acc.sum()),
                "acceptance_rate": float(acc.float().mean()) if acc.numel() else 0.0,
                "mean_steps_to_accept": float(self.steps[acc].float().mean()) if acc.any() else None,
                "seconds": self.seconds}


_BANK_FORMAT = "clipforget_fast.prototypes/1"
# the ForgetConfig fields that shape the prototypes (recorded with a bank)
SYNTHESIS_FIELDS = ("prototypes_per_cell", "steps", "step_size", "pixel_decay", "jitter", "blur_every",
                    "accept_prob", "min_steps", "batch_size", "seed", "dtype")


# translations of a bank's prototypes kept in memory for the domain gate: the last this many (each set of
# forgotten domains over a vocabulary is one; prototypes × (cells of the kept domains + cells of the
# forgotten ones × kept domains) images)
TRANSLATIONS_KEPT = 4


@dataclass
class PrototypeBank:
    """Synthesized prototypes by cell, reusable across requests on the same model (every request
    over the same vocabulary synthesizes the same cells against the same classifier), in memory or
    through ``save`` / ``load``.

    In memory, a bank handed to ``forget`` also keeps the domain gate's translations of its prototypes
    (``translations``: the last TRANSLATIONS_KEPT sets of forgotten domains), keyed by everything they
    are computed from: the prototypes and which of them move where, the classifier, every byte of the
    image tower's weights (``layers.image_tower_digest``), the translation's settings. A later request
    with the same forgotten domains over the same vocabulary reuses them, bit for bit what it would
    compute, and skips most of the gate's time. ``translations.clear()`` frees them; they are not saved,
    and not kept with several processes (``distributed.World``)."""
    images: dict          # {(class, domain): [P, 3, H, W] fp32}
    accepted: dict        # {(class, domain): [P] bool}
    stats: dict           # SynthesisResult.stats() of the run that made it
    source: dict = field(default_factory=dict)   # {"image_tower": layers.image_tower_fingerprint of the
                                                 # model, "synthesis": the SYNTHESIS_FIELDS of the config}
    translations: dict = field(default_factory=dict, repr=False, compare=False)   # {key: the moved images
                                                 # in the vocabulary's order}, oldest first (pipeline._translated)

    def __contains__(self, cell) -> bool:
        return cell in self.images

    @classmethod
    def from_result(cls, cells: list, res: "SynthesisResult", per_cell: int, source: dict | None = None
                    ) -> "PrototypeBank":
        imgs, acc = res.images.view(len(cells), per_cell, *res.images.shape[1:]), res.accepted.view(len(cells), per_cell)
        return cls({c: imgs[i] for i, c in enumerate(cells)}, {c: acc[i] for i, c in enumerate(cells)},
                   res.stats(), dict(source or {}))

    def save(self, path) -> Path:
        """Write the bank as safetensors (``images::i``, ``accepted::i`` for the i-th cell) with the cells,
        statistics and source as JSON metadata, atomically."""
        from .patch import atomic_safetensors, safetensors_path

        path = safetensors_path(path, "prototype bank")
        cells = list(self.images)
        tensors = {}
        for i, c in enumerate(cells):
            tensors[f"images::{i}"] = self.images[c].detach().float().contiguous().cpu()
            tensors[f"accepted::{i}"] = self.accepted[c].detach().to(torch.uint8).contiguous().cpu()
        header = {"format": _BANK_FORMAT, "version": __version__, "cells": [list(c) for c in cells],
                  "stats": self.stats, "source": self.source}
        return atomic_safetensors(tensors, path, {"clipforget_prototypes": json.dumps(header)})

    @classmethod
    def load(cls, path) -> "PrototypeBank":
        """Read a bank written by ``save``; ValueError if the file is not one."""
        from .patch import read_safetensors

        header, tensors = read_safetensors(path, "clipforget_prototypes", _BANK_FORMAT, "prototype bank")
        cells = [tuple(c) for c in header["cells"]]
        return cls({c: tensors[f"images::{i}"] for i, c in enumerate(cells)},
                   {c: tensors[f"accepted::{i}"].bool() for i, c in enumerate(cells)},
                   header.get("stats", {}), header.get("source", {}))


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores both afterwards, module by
    module (a model partly in training mode comes back so)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def autocast_dtype(config: ForgetConfig, device: torch.device) -> torch.dtype:
    if config.dtype is not None:
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synthesize(model: nn.Module, cell_text: torch.Tensor, target: torch.Tensor,
               config: ForgetConfig, device=None, world: World | None = None) -> SynthesisResult:
    """Synthesize one prototype per entry of ``target``.

    cell_text: [n_cells, D] L2-normalized text embeddings, the classifier the prototypes are
               optimized against (one row per cell of the request).
    target:    [N] long, the cell each prototype must land on.
    world:     the ranks to share the batches with (``distributed.World``; default: this process).
    Prototypes are made in batches of ``config.batch_size``; batch b starts from the b-th draw of the
    seeded noise stream and jitters with its own seeded stream, so the result does not depend on which
    rank made which batch. Runs with gradients whatever the caller's mode (``torch.no_grad`` or
    ``torch.inference_mode``).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _synthesize(model, cell_text.clone(), target.clone(), config, device, world or World(False))


def translate(model: nn.Module, images: torch.Tensor, cell_text: torch.Tensor, target: torch.Tensor,
              steps: int, config: ForgetConfig, world: World | None = None) -> torch.Tensor:
    """``images`` [N, 3, H, W] (normalized pixels) moved by ``steps`` steps of gradient ascent towards the
    cells ``target`` [N] of the classifier ``cell_text`` [n_cells, D]: the synthesis's RMS-normalized step
    (``config.step_size``, ``dispatch.synth_update``) within the valid pixel range, with no early stop,
    jitter, blur or pull to the mean, so every image goes as far as the others. For the domain gate,
    prototypes moved into a domain (and out of it) are examples close to the domain's border. Batches of
    ``config.batch_size``, round-robin over the ranks of ``world`` (default: this process) and summed, so
    every rank gets every image, the same whatever the number of processes; runs with gradients whatever
    the caller's mode."""
    device = images.device
    lo, hi = pixel_range(model, device)
    scale = logit_scale(model)
    amp = autocast_dtype(config, device)
    step = dict(lr=config.step_size, decay=0.0, lo=lo, hi=hi, in_shift=(0, 0), out_shift=(0, 0), blur=False)
    world = world or World(False)
    with torch.inference_mode(False), torch.enable_grad(), frozen(model):
        out = torch.zeros(images.shape, dtype=torch.float32, device=device)   # a normal tensor in any mode
        cell_text = cell_text.to(device, torch.float32).clone()   # a caller's inference tensors, as normal ones
        for b, i in enumerate(range(0, len(images), config.batch_size)):
            if not world.mine(b):
                continue
            x = images[i:i + config.batch_size].float().clone()
            tgt = target[i:i + config.batch_size].to(device).clone()
            every = torch.ones(len(x), dtype=torch.bool, device=device)
            for _ in range(steps):
                x.requires_grad_(True)
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    feats = encode_image(model, x)
                logits = scale * F.normalize(feats.float(), dim=-1) @ cell_text.t()
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, tgt, reduction="sum"), x)
                with torch.no_grad():
                    x, _ = dispatch.synth_update(x.detach(), grad, every, **step)   # the synthesis's step
            out[i:i + len(x)] = x.detach()
        return world.sum_(out)   # every rank filled its own batches and left zeros elsewhere


def pixel_range(model: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [C] fp32 on ``device``: the valid range of the model's normalized pixels per channel."""
    _, mean, std = image_geometry(model)
    return ((0 - mean) / std).to(device), ((1 - mean) / std).to(device)


def logit_scale(model: nn.Module) -> float:
    """The model's zero-shot logit scale (100 where it has none)."""
    return float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0


def batch_rng(seed: int, b: int) -> random.Random:
    """The jitter stream of synthesis batch ``b``."""
    return random.Random(seed if b == 0 else f"{seed}/{b}")


def _synthesize(model, cell_text, target, config, device, world) -> SynthesisResult:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    (H, W), _, _ = image_geometry(model)
    lo, hi = pixel_range(model, device)
    cell_text = cell_text.to(device, torch.float32)
    target = target.to(device)
    n = target.numel()
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    scale = logit_scale(model)
    amp = autocast_dtype(config, device)

    out_x = torch.zeros(n, 3, H, W, device=device)
    out_acc = torch.zeros(n, dtype=torch.bool, device=device)
    out_steps = torch.zeros(n, dtype=torch.long, device=device)
    out_prob = torch.zeros(n, device=device)
    t0 = time.perf_counter()
    with frozen(model):
        for b, c0 in enumerate(range(0, n, config.batch_size)):
            idx = torch.arange(c0, min(n, c0 + config.batch_size), device=device)
            x = initial_noise(len(idx), (H, W), lo, hi, gen)      # drawn by every rank: the stream stays aligned
            if not world.mine(b):
                continue
            rng = batch_rng(config.seed, b)
            out_steps[idx] = config.steps                           # until accepted
            shift = _shift(rng, config.jitter)
            x_in = torch.roll(x, shift, dims=(2, 3))
            for step in range(config.steps):
                x_in.requires_grad_(True)
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    feats = encode_image(model, x_in)
                logits = scale * F.normalize(feats.float(), dim=-1) @ cell_text.t()
                tgt = target[idx]
                loss = F.cross_entropy(logits, tgt, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_in)
                with torch.no_grad():
                    prob = logits.softmax(-1).gather(1, tgt[:, None]).squeeze(1)
                    was = out_acc[idx]
                    out_prob[idx[~was]] = prob[~was]
                    new = (prob >= config.accept_prob) & ~was & (step >= config.min_steps)
                    if new.any():
                        out_acc[idx[new]] = True
                        out_steps[idx[new]] = step + 1
                        out_x[idx[new]] = x[new]
                    done = was | new
                    active = ~done
                    if not active.any():
                        break
                    nxt = _shift(rng, config.jitter)
                    blur = config.blur_every > 0 and (step + 1) % config.blur_every == 0
                    x, x_in = dispatch.synth_update(x, grad, active, lr=config.step_size,
                                                    decay=config.pixel_decay, lo=lo, hi=hi,
                                                    in_shift=shift, out_shift=nxt, blur=blur)
                    shift = nxt
                    if int(active.sum()) * 2 <= len(idx):       # compact: drop accepted items
                        idx, x, x_in = idx[active], x[active].contiguous(), x_in[active].contiguous()
            with torch.no_grad():
                left = ~out_acc[idx]
                out_x[idx[left]] = x[left]
    if world.on:              # every rank filled its own batches and left zeros elsewhere
        out_x, out_prob = world.sum_(out_x), world.sum_(out_prob)
        out_acc = world.sum_(out_acc.to(torch.int32)).bool()
        out_steps = world.sum_(out_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SynthesisResult(out_x, target, out_acc, out_steps, out_prob, time.perf_counter() - t0)


def initial_noise(n: int, size: tuple[int, int], lo: torch.Tensor, hi: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """[n, 3, H, W] Gaussian noise (std INIT_STD, drawn on the CPU generator so every device
    starts from the same images) clamped to [lo, hi] per channel, on lo's device."""
    x = (torch.randn(n, 3, *size, generator=generator) * INIT_STD).to(lo.device)
    return torch.maximum(torch.minimum(x, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))


def _shift(rng: random.Random, jitter: int) -> tuple[int, int]:
    return (rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) if jitter else (0, 0)
