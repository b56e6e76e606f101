"""forget(): the whole training-free, data-free edit, stage by stage (DESIGN §2).

    spec ──> prompt bank ──> text features ─┐
      └────> prototype synthesis ──> images ┴─> Gram capture (F, R) ─> nullspace ─> Patch

The model is not modified: the returned Patch is applied with ``patch.apply(model)``. Patches
already applied to the model (by this process) are taken into account: the new forget directions
are kept orthogonal to theirs, so earlier forgetting is not undone (DESIGN §2.6, "composable").
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .capture import GramCapture
from .config import ForgetConfig
from .layers import Layer, find_layers
from .nullspace import forget_basis
from .patch import Patch, PatchEntry, applied_patches, tensor_hash
from .redirect import class_redirect_entry
from .spec import ForgetSpec
from .synthesis import PrototypeBank, autocast_dtype, frozen, synthesize
from .text import class_embeddings, ensemble, tokenize

log = logging.getLogger(__name__)


def _prior_directions(model: nn.Module, name: str) -> torch.Tensor | None:
    mats = [e.B for p in applied_patches(model) for e in p.entries if e.name == name]
    return torch.cat(mats, dim=1) if mats else None


def _patch_entry(layer: Layer, U: torch.Tensor, alpha: float) -> PatchEntry:
    W = layer.weight_out_in().detach().float()            # [d_out, d_in]
    U = U.to(W.device, torch.float32)
    A = -alpha * (W @ U)                                   # [d_out, k]
    return PatchEntry(layer.name, layer.layout, A.cpu(), U.cpu(), tensor_hash(layer.param))


def _prototypes(model, cells, cell_text, config, device, bank, info, timings) -> PrototypeBank:
    """``bank`` completed with freshly synthesized prototypes for the cells it lacks."""
    P = config.prototypes_per_cell
    have = {} if bank is None else {c: bank.images[c] for c in cells if c in bank and len(bank.images[c]) >= P}
    missing = [i for i, c in enumerate(cells) if c not in have]
    info["synthesis"] = {"reused_cells": len(cells) - len(missing)}
    if not missing:
        return bank
    target = torch.tensor(missing, device=device).repeat_interleave(P)
    res = synthesize(model, cell_text, target, config, device)
    info["synthesis"].update(res.stats())
    timings["synthesis"] = res.seconds
    if not res.accepted.any():
        log.warning("no prototype reached p(target) ≥ %.2f; using the unaccepted ones", config.accept_prob)
    fresh = PrototypeBank.from_result([cells[i] for i in missing], res, P)
    return PrototypeBank({**have, **fresh.images}, {**({} if bank is None else bank.accepted), **fresh.accepted},
                         fresh.stats)


def synthesize_prototypes(model: nn.Module, tokenizer, spec: ForgetSpec,
                          config: ForgetConfig = ForgetConfig()) -> PrototypeBank:
    """Prototypes for every cell of ``spec`` (F and R), to pass to several ``forget`` calls on the
    same model and vocabulary: synthesis is most of an edit's time, and the cells are the same."""
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    amp = autocast_dtype(config, device)
    with frozen(model), torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
        cell_text = class_embeddings(model, tokenizer, [spec.prompts(c) for c in spec.cells], device,
                                     config.batch_size)
    return _prototypes(model, spec.cells, cell_text, config, device, None, {}, {})


def forget(model: nn.Module, tokenizer, spec: ForgetSpec, config: ForgetConfig = ForgetConfig(),
           prototypes: PrototypeBank | None = None) -> Patch:
    """Compute the patch that makes ``model`` forget ``spec.forget_cells`` and keep ``retain_cells``.

    model:      an open_clip ``CLIP`` with a VisionTransformer image tower (not modified).
    tokenizer:  the model's tokenizer (``open_clip.get_tokenizer(name)``).
    prototypes: optional ``synthesize_prototypes`` result to reuse; cells it lacks are synthesized.
    Returns a Patch whose ``info`` holds per-layer ranks, synthesis statistics and per-stage
    ``timings`` (seconds).
    """
    if not isinstance(spec, ForgetSpec):
        raise TypeError(f"spec must be a ForgetSpec, got {type(spec).__name__}")
    if not isinstance(config, ForgetConfig):
        raise TypeError(f"config must be a ForgetConfig, got {type(config).__name__}")
    layers = find_layers(model, config.targets, config.last_blocks)
    layers = [l for l in layers if (l.tower == "text" and config.use_text)
              or (l.tower == "visual" and config.use_prototypes and config.prototypes_per_cell > 0)]
    redirect = config.edit == "class-redirect"
    if redirect:
        layers = [l for l in layers if l.kind == "proj" and l.tower == "text"]
        if spec.mode != "global":
            log.warning("edit='class-redirect' changes the text side only: it cannot keep the "
                        "forgotten classes in other domains (mode %r)", spec.mode)
    if not layers:
        raise ValueError(f"config selects no layer: targets={config.targets!r}, use_text="
                         f"{config.use_text}, use_prototypes={config.use_prototypes}, "
                         f"prototypes_per_cell={config.prototypes_per_cell}")
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    timings: dict[str, float] = {}
    info: dict = {"layers": {}}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cells = spec.cells                                    # F first, then R
    n_f = len(spec.forget_cells)
    groups = ["F"] * n_f + ["R"] * (len(cells) - n_f)
    amp = autocast_dtype(config, device)
    autocast = dict(device_type=device.type, dtype=amp, enabled=amp != torch.float32)

    keep_rows = tuple(l.name for l in layers) if redirect else ()
    with frozen(model), GramCapture(model, layers, config.token_policy, device, keep_rows) as cap:
        # 1. prompt bank; one text-tower pass gives both the cells' text embeddings and the text
        #    layers' Grams (F prompts first, then R, as the cells are ordered)
        t = time.perf_counter()
        prompts = [spec.prompts(c) for c in cells]
        sizes = [len(ps) for ps in prompts]
        all_tokens = tokenize(tokenizer, [p for ps in prompts for p in ps], device)
        n_f_prompts = sum(sizes[:n_f])
        emb = []
        with torch.autocast(**autocast):
            for g, lo, hi in (("F", 0, n_f_prompts), ("R", n_f_prompts, len(all_tokens))):
                for i in range(lo, hi, config.batch_size):
                    emb.append(cap.text(all_tokens[i:min(hi, i + config.batch_size)], g))
        cell_text = ensemble(torch.cat(emb), sizes)
        sync()
        timings["prompts"] = time.perf_counter() - t

        # 2. prototype synthesis (only when an image-tower layer is edited)
        images = None
        if any(l.tower == "visual" for l in layers):
            P = config.prototypes_per_cell
            bank = _prototypes(model, cells, cell_text, config, device, prototypes, info, timings)
            images = torch.cat([bank.images[c][:P].to(device) for c in cells])
            img_groups = [g for g in groups for _ in range(P)]

        # 3. capture: the image layers' Grams from the prototypes, F and R
        t = time.perf_counter()
        if images is not None:
            with torch.autocast(**autocast):
                for g in ("F", "R"):
                    imgs = images[torch.tensor([gg == g for gg in img_groups], device=device)]
                    for i in range(0, len(imgs), config.batch_size):
                        cap.images(imgs[i:i + config.batch_size], g)
        sync()
        timings["capture"] = time.perf_counter() - t

        # 4. nullspace per layer, 5. patch entries
        t = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(config.seed)
        entries = []
        for layer in layers:
            G = cap.grams[layer.name]
            U, linfo = forget_basis(G["F"], G["R"], retain_energy=config.retain_energy,
                                    forget_energy=config.forget_energy, max_rank=config.max_rank,
                                    prior=_prior_directions(model, layer.name), solver=config.solver,
                                    oversample=config.oversample, power_iters=config.power_iters,
                                    generator=gen)
            linfo.update(samples_F=cap.counts[layer.name]["F"], samples_R=cap.counts[layer.name]["R"])
            info["layers"][layer.name] = linfo
            if U.shape[1] and redirect:
                row_classes = [cell[0] for cell, n in zip(cells[:n_f], sizes[:n_f]) for _ in range(n)]
                entries.append(class_redirect_entry(
                    layer, U, torch.cat(cap.forget_rows[layer.name]), row_classes,
                    G["F"], G["R"], gain=config.redirect_gain, retain_weight=config.retain_weight))
            elif U.shape[1]:
                entries.append(_patch_entry(layer, U, config.alpha))
        sync()
        timings["nullspace"] = time.perf_counter() - t
    if not entries:
        log.warning("no forget direction survived the keep set's subspace; the patch is empty")
    info["timings"] = timings
    return Patch(entries, spec.to_dict(), config.to_dict(), info)
