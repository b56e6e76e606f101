"""forget(): the whole training-free, data-free edit, stage by stage (DESIGN §2).

    spec ──> prompt bank ──> text features ─┐
      └────> prototype synthesis ──> images ┴─> Gram capture (F, R) ─> nullspace ─> Patch

The model is not modified: the returned Patch is applied with ``patch.apply(model)``. Patches
already applied to the model (by this process) are taken into account: the new forget directions
are kept orthogonal to theirs, so earlier forgetting is not undone (DESIGN §2.6, "composable").
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping

import torch
from torch import nn

from .capture import GramCapture
from .config import ForgetConfig, gated_request
from .distributed import World
from .evaluate import AccuracyMatrix
from .gate import ImageRows, gate_entries, rewired_units, site_read
from .images import check_images, image_source
from .layers import (Layer, context_length, encode_image, find_layers, gate_site, image_geometry,
                     image_tower_digest, image_tower_fingerprint)
from .nullspace import forget_basis
from .patch import Patch, PatchEntry, applied_patches, tensor_hash
from .redirect import class_shifts, class_targets, pseudo_images, redirect_entry
from .spec import ForgetSpec
from .synthesis import (SYNTHESIS_FIELDS, TRANSLATIONS_KEPT, PrototypeBank, autocast_dtype, frozen, logit_scale,
                        synthesize, translate)
from .text import class_embeddings, encode_tokens, ensemble, tokenize

log = logging.getLogger(__name__)


def _prior_directions(model: nn.Module, name: str) -> torch.Tensor | None:
    mats = [e.B for p in applied_patches(model) for e in p.entries if e.name == name]
    return torch.cat(mats, dim=1) if mats else None


def _same_problem(last, G: dict, prior) -> bool:
    """Whether a layer's Grams ``G`` and prior directions are the ones ``last`` = (Grams, prior, ...) held."""
    g0, p0 = last[0], last[1]
    if not all(torch.equal(g0[k], G[k]) for k in ("F", "R")):
        return False
    return (p0 is None and prior is None) or (p0 is not None and prior is not None and torch.equal(p0, prior))


def _patch_entry(layer: Layer, U: torch.Tensor, alpha: float) -> PatchEntry:
    W = layer.weight_out_in().detach().float()            # [d_out, d_in]
    U = U.to(W.device, torch.float32)
    A = -alpha * (W @ U)                                   # [d_out, k]
    return PatchEntry.on(layer.name, layer.layout, A.cpu(), U.cpu(), layer.param)


def _prototypes(model, cells, cell_text, config, device, bank, info, timings, world) -> PrototypeBank:
    """``bank`` completed with freshly synthesized prototypes for the cells it lacks."""
    P = config.prototypes_per_cell
    source = {"image_tower": image_tower_fingerprint(model),
              "synthesis": {f: getattr(config, f) for f in SYNTHESIS_FIELDS}}
    if bank is not None:
        _check_bank(bank, source["image_tower"], world)
    have = {} if bank is None else {c: bank.images[c] for c in cells if c in bank and len(bank.images[c]) >= P}
    missing = [i for i, c in enumerate(cells) if c not in have]
    info["synthesis"] = {"reused_cells": len(cells) - len(missing)}
    if not missing:
        return bank
    target = torch.tensor(missing, device=device).repeat_interleave(P)
    res = synthesize(model, cell_text, target, config, device, world)
    info["synthesis"].update(res.stats())
    timings["synthesis"] = res.seconds
    if not res.accepted.any() and world.leader:
        log.warning("no prototype reached p(target) ≥ %.2f; using the unaccepted ones", config.accept_prob)
    fresh = PrototypeBank.from_result([cells[i] for i in missing], res, P)
    return PrototypeBank({**have, **fresh.images}, {**({} if bank is None else bank.accepted), **fresh.accepted},
                         fresh.stats, source)


def _check_bank(bank: PrototypeBank, tower: dict, world) -> None:
    """A bank synthesized through another image tower is refused; through the same architecture with
    other weights (another checkpoint, or a patch applied since) it is used with a warning."""
    theirs = bank.source.get("image_tower")
    if not theirs:
        return
    if theirs["architecture"] != tower["architecture"]:
        raise ValueError("prototypes: the bank was synthesized through another image tower (its parameter "
                         "names or shapes differ from this model's)")
    if theirs["weights"] != tower["weights"] and world.leader:
        log.warning("prototypes: the bank was synthesized through other image-tower weights (another "
                    "checkpoint, or a patch applied since); its prototypes may not land on this model's cells")


def _embed_images(model, images, config, autocast, world) -> torch.Tensor:
    """[N, D] normalized fp32 embeddings of ``images``, each rank encoding its share."""
    def rows(lo, hi):
        return torch.cat([encode_image(model, images[i:min(hi, i + config.batch_size)]).float()
                          for i in range(lo, hi, config.batch_size)])

    with torch.autocast(**autocast):
        emb = world.shared(len(images), rows, images.device)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def _domain_shifts(model, spec, cells, cell_text, images, partial, config, autocast, world):
    """δ_c per partly forgotten class (redirect.class_shifts), fitted on pseudo image embeddings: the
    cells' text embeddings moved by the modality gap that the prototypes' embeddings locate. Only the
    leading rank fits (the others get ({}, {}): they take the patch it broadcasts)."""
    emb = _embed_images(model, images, config, autocast, world)
    if not world.leader:
        return {}, {}
    classes = list(spec.classes)
    # cells of classes forgotten everywhere take the class_targets redirect and stay out of the fit
    whole = {c for c, _ in spec.forget_cells} - set(partial)
    rows = [i for i, (c, _) in enumerate(cells) if c not in whole]
    ct = torch.nn.functional.normalize(cell_text.float(), dim=-1)
    cls_of = [c for c, _ in cells]
    class_emb = torch.nn.functional.normalize(torch.stack(
        [ct[torch.tensor([c == k for k in cls_of], device=ct.device)].mean(0) for c in classes]), dim=-1)
    pseudo = pseudo_images(ct, emb)[rows]
    cell_class = torch.tensor([classes.index(cells[i][0]) for i in rows], device=ct.device)
    forgotten = torch.tensor([cells[i] in spec.forget_cells for i in rows], device=ct.device)
    free = sorted(classes.index(c) for c in partial)
    shifts, info = class_shifts(pseudo, cell_class, forgotten, class_emb, free,
                                float(model.logit_scale.exp()), config.domain_keep_weight)
    if info["pseudo_forgotten_acc"] > 0 or info["pseudo_kept_acc"] < info["pseudo_kept_acc_before"]:
        log.warning("class redirect: no shift of %s's embedding both misses the forgotten cells and keeps the "
                    "other predictions on the pseudo images (forgotten %.0f%%, kept %.0f%% → %.0f%%); check the "
                    "result with evaluate()", ", ".join(sorted(partial)), 100 * info["pseudo_forgotten_acc"],
                    100 * info["pseudo_kept_acc_before"], 100 * info["pseudo_kept_acc"])
    return {classes[i]: d for i, d in shifts.items()}, {"fit": info, "partly_forgotten": partial}


def _realize_shifts(layer, U, keys, out, targets, row_classes, shifts, G, config, rounds: int = 3,
                    max_gain: float = 8.0):
    """The redirect entry whose class embeddings move by the planned δ_c: the ridge solution moves them
    the right way but only part of the way (79–89 % on the proving ground), so each partly forgotten
    class's targets are scaled by planned / realized along δ_c (at most ``max_gain`` in all) and the entry
    solved again; a class still short of 90 % after the last round is named in a warning."""
    targets = targets.clone()
    gains = {cls: 1.0 for cls in shifts}
    rows = {cls: torch.tensor([c == cls for c in row_classes], device=out.device) for cls in shifts}

    def unit_mean(x):
        return torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=-1).mean(0), dim=0)

    for r in range(rounds + 1):
        entry = redirect_entry(layer, U, keys, targets, G["F"], G["R"], retain_weight=config.retain_weight)
        moved = out + (keys.float() @ entry.B.to(out)) @ entry.A.to(out).t()
        got = {}
        for cls, delta in shifts.items():
            d = delta.to(out)
            change = unit_mean(moved[rows[cls]]) - unit_mean(out[rows[cls]])
            planned = float(d @ d)
            got[cls] = float(change @ d) / planned if planned > 0 else 1.0   # no shift planned: none to realize
        if r == rounds:
            break
        for cls in shifts:
            new = min(gains[cls] / min(max(got[cls], 0.25), 4.0), max_gain)
            targets[rows[cls]] *= new / gains[cls]
            gains[cls] = new
    short = sorted(cls for cls in shifts if got[cls] < 0.9)
    if short:
        log.warning("class redirect: the patch moves %s's embedding only %s of the planned shift (targets scaled "
                    "up to %.0f×)", ", ".join(short), ", ".join(f"{got[c]:.0%}" for c in short), max_gain)
    return entry, {cls: {"fraction": round(got[cls], 4), "target_gain": round(gains[cls], 4)} for cls in shifts}


# self-check warnings, on the prototypes (the edit's own images: an optimistic view). A few prototypes
# per cell make coarse accuracies, so each warning also needs the counts to back it, at level CHECK_LEVEL:
CHECK_FORGET_SLACK = 10.0   # forgotten cells above chance + this many points, and more recognized than a
                            # recognition rate of chance + this gives (one-sided binomial test)
CHECK_KEEP_DROP = 5.0       # a kept group (or the same classes in other domains) losing more points than
                            # this, and more of its prototypes lost than gained than an edit that flips them
                            # either way at random gives (one-sided exact McNemar test on the flipped ones)
CHECK_LEVEL = 0.05


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    i = torch.arange(k, n + 1, dtype=torch.float64)
    logp = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(logp.exp().sum().clamp(max=1.0))


def _kept_group_warns(drop: float, lost: int, gained: int) -> bool:
    """Whether a kept group's prototypes losing ``drop`` points (``lost`` of them turned wrong, ``gained``
    turned right by the patch) is worth a warning: more than CHECK_KEEP_DROP points, and more lost than
    gained beyond what flips either way at random give (exact one-sided McNemar test at CHECK_LEVEL)."""
    return drop > CHECK_KEEP_DROP and _binomial_tail(lost, lost + gained, 0.5) < CHECK_LEVEL


def _class_rows(prompt_emb: torch.Tensor, cells: list, sizes: list[int], classes: list[str]) -> torch.Tensor:
    """[len(classes), D] the zero-shot classifier from the cells' prompt embeddings (``sizes`` per cell,
    in ``cells`` order): each class the normalized mean of its prompts' normalized embeddings over all
    its cells (as ``evaluate`` builds it)."""
    per_prompt = torch.nn.functional.normalize(prompt_emb.float(), dim=-1)
    cls_of = torch.tensor([classes.index(c) for c, _ in cells], device=per_prompt.device)
    cls_of = cls_of.repeat_interleave(torch.tensor(sizes, device=per_prompt.device))
    return torch.nn.functional.normalize(torch.stack([per_prompt[cls_of == k].mean(0)
                                                      for k in range(len(classes))]), dim=-1)


@torch.no_grad()
def _self_check(model, tokenizer, spec: ForgetSpec, patch: Patch, images: torch.Tensor, cells: list,
                per_cell: int, prompt_emb: torch.Tensor, sizes: list[int], towers: set, config: ForgetConfig,
                autocast: dict, world: World, text_rows: tuple | None = None) -> dict:
    """Zero-shot accuracy (the spec's prompts, domain-agnostic: what ``evaluate`` computes) of the
    prototypes of each group of cells, without and with the patch (``Patch.applied``: the weights come
    back bit for bit), and warnings when the forgotten cells stay recognized or the others lose ground.
    The prototypes are the edit's own inputs, so a pass here is no proof on real images; a miss here is
    a miss. ``prompt_emb`` [Σ sizes, D]: the prompts stage's embeddings of the cells' prompts (``sizes``
    per cell), reused as the classifier before the patch; each tower ("text", "visual") runs again under
    the patch only if it is in ``towers``, the ones the patch edits; each rank encodes its share of
    the prototypes. ``text_rows`` (layer, [Σ sizes, d_in]): when the patch edits no text layer but the
    text projection, that layer and its inputs from the prompts stage; the prompts' embeddings under
    the patch are then those rows through the patched weight, without the text tower."""
    classes, domains = list(spec.classes), list(spec.domains)
    ci = torch.tensor([classes.index(c) for c, _ in cells]).repeat_interleave(per_cell)
    di = torch.tensor([domains.index(d) for _, d in cells]).repeat_interleave(per_cell)
    device = images.device
    bs = config.batch_size

    def classifier():
        sets = [[p for d in domains for p in spec.prompts((c, d))] for c in classes]
        return class_embeddings(model, tokenizer, sets, device, bs)

    def image_emb():
        return _embed_images(model, images, config, autocast, world)

    def score(clf, emb):
        pred = (emb @ clf.t()).argmax(-1).cpu()
        return AccuracyMatrix.from_predictions(pred, ci, di, classes, domains), pred == ci

    every = {(c, d) for c in classes for d in domains} <= set(cells)   # every cell's prompts were embedded

    def classifier_after():
        if "text" not in towers:
            return clf0
        if not (every and text_rows is not None and len(text_rows[1]) == sum(sizes)):
            return classifier()
        layer, rows = text_rows
        w = layer.weight_out_in()
        emb = rows.to(w.device, w.dtype) @ w.t()       # the rows were the weight's dtype before the capture's fp32
        bias = getattr(layer.tap, "bias", None) if layer.layout == "linear" else None
        return _class_rows(emb if bias is None else emb + bias, cells, sizes, classes)

    with torch.autocast(**autocast):
        clf0 = _class_rows(prompt_emb, cells, sizes, classes) if every else classifier()
        emb0 = image_emb()
        before, hit0 = score(clf0, emb0)
        with patch.applied(model, force=True):
            after, hit1 = score(classifier_after(), image_emb() if "visual" in towers else emb0)
    cell_of = [c for c in cells for _ in range(per_cell)]
    forgotten = {c for c, _ in spec.forget_cells}
    # the domain mode's own group: the forgotten classes where they are kept
    same = {x for x in spec.retain_cells if x[0] in forgotten} if spec.mode in ("domain", "cells") else set()
    groups = {"forgotten": spec.forget_cells, "same_class_other_domains": same, "kept": spec.retain_cells - same}
    out = {"chance": round(1 / len(classes), 4), "prototypes_per_cell": per_cell}
    for name, group in groups.items():
        if group:
            out[name] = {"before": round(before.cell_mean(group), 4), "after": round(after.cell_mean(group), 4)}
    chance, warn = 100 / len(classes), []
    f = out["forgotten"]
    hit, n = after.counts(spec.forget_cells)
    if (100 * f["after"] > chance + CHECK_FORGET_SLACK
            and _binomial_tail(hit, n, min(1.0, (chance + CHECK_FORGET_SLACK) / 100)) < CHECK_LEVEL):
        caught = (patch.info.get("gate") or {}).get("prototypes_caught")
        warn.append(f"its forgotten cells' prototypes are still recognized {100 * f['after']:.0f}% of the time "
                    f"({hit} of {n}; before {100 * f['before']:.0f}%, chance {chance:.0f}%)"
                    + ("" if caught is None else f"; the gate's detectors catch {100 * caught:.0f}% of the forgotten "
                       f"domains' prototypes (fitted to carry over to real images, they may catch more of those)"))
    for name, what in (("kept", "the kept cells"), ("same_class_other_domains", "the same classes in their kept domains")):
        if name not in out:
            continue
        rows = torch.tensor([c in groups[name] for c in cell_of])
        lost, gained = int((hit0 & ~hit1 & rows).sum()), int((~hit0 & hit1 & rows).sum())
        drop = 100 * (out[name]["before"] - out[name]["after"])
        if _kept_group_warns(drop, lost, gained):
            warn.append(f"the prototypes of {what} lose {drop:.0f} points ({100 * out[name]['before']:.0f}% → "
                        f"{100 * out[name]['after']:.0f}%; {lost} lost, {gained} gained)")
    out["warnings"] = warn
    if warn and world.leader:
        log.warning("self-check on the prototypes (mode %s, edit %s): %s; check the patch with evaluate() on real "
                    "images", spec.mode, patch.info.get("edit"), "; ".join(warn))
    return out


def _find_gate_site(model):
    """(the domain gate's site, None), or (None, the ValueError naming what the tower lacks)."""
    try:
        return gate_site(model), None
    except ValueError as e:
        return None, e


def _translated(model, images: torch.Tensor, cells: list, per_cell: int, cell_text: torch.Tensor,
                forgotten_domains: list, domains: list, config: ForgetConfig, classes: list,
                world: World | None = None, bank: PrototypeBank | None = None, amp: torch.dtype | None = None):
    """((images, domain index, class index), whether they came from ``bank.translations``) for the domain
    gate's detectors: the prototypes of every cell moved into the same class's cell of each forgotten
    domain, and those of the forgotten domains moved into every other domain (``synthesis.translate``,
    ``config.gate_translate_steps`` steps), each labelled by the domain it was moved into and its class
    (indices into ``domains`` and ``classes``), in the order of the pairs of cells by their indices in
    ``cells``. The batches are shared by the ranks of ``world``.

    The images are moved in the vocabulary's order of the cells (class by class, domain by domain), not
    the request's: every request over the vocabulary with the same forgotten domains moves the same
    images in the same batches. With ``bank`` (the caller's, handed to later requests) one process keeps
    them there, keyed by everything they are computed from (``_translation_key``), the last
    TRANSLATIONS_KEPT; several processes compute them each time, so that every rank joins the same
    collectives."""
    order = {cell: i for i, cell in enumerate((c, d) for c in classes for d in domains)}
    canon = sorted(range(len(cells)), key=lambda i: order[cells[i]])   # vocabulary position -> index in cells
    at = {i: k for k, i in enumerate(canon)}
    index = {c: i for i, c in enumerate(cells)}         # a request given cell by cell may lack some targets
    pairs = sorted({(index[(c, d)], index[(c, f)]) for c, d in cells for f in forgotten_domains
                    if d != f and (c, f) in index}
                   | {(index[(c, d)], index[(c, e)]) for c, d in cells if d in forgotten_domains
                      for e in domains if e != d and (c, e) in index})
    if not pairs:
        return (images[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), False
    moved_order = sorted(range(len(pairs)), key=lambda p: (at[pairs[p][0]], at[pairs[p][1]]))
    src = torch.cat([torch.arange(pairs[p][0] * per_cell, (pairs[p][0] + 1) * per_cell) for p in moved_order])
    tgt = torch.tensor([at[pairs[p][1]] for p in moved_order]).repeat_interleave(per_cell)
    text = cell_text[torch.tensor(canon, device=cell_text.device)]
    x = images[src.to(images.device)]
    keep = bank is not None and not (world is not None and world.on)
    key = _translation_key(model, x, text, tgt, per_cell, config, amp) if keep else None
    moved = bank.translations.pop(key, None) if keep else None
    hit = moved is not None
    if not hit:
        moved = translate(model, x, text, tgt, config.gate_translate_steps, config, world)
    if keep:
        bank.translations[key] = moved                   # the newest last
        while len(bank.translations) > TRANSLATIONS_KEPT:
            bank.translations.pop(next(iter(bank.translations)))
    # back to the order of the pairs (the detectors' fit reads its examples in it)
    back = torch.tensor(moved_order).argsort()
    rows = (back[:, None] * per_cell + torch.arange(per_cell)).reshape(-1)
    moved = moved[rows.to(moved.device)]
    dom = torch.tensor([domains.index(cells[j][1]) for _, j in pairs]).repeat_interleave(per_cell)
    cls = torch.tensor([classes.index(cells[j][0]) for _, j in pairs]).repeat_interleave(per_cell)
    return (moved, dom, cls), hit


def _translation_key(model, images: torch.Tensor, cell_text: torch.Tensor, target: torch.Tensor,
                     per_cell: int, config: ForgetConfig, amp: torch.dtype | None) -> str:
    """A digest of everything ``synthesis.translate`` computes from: the image tower (every byte of its
    weights: ``layers.image_tower_digest``; its pixel statistics), the logit scale, the images (as they
    are moved: in the vocabulary's order, whatever the request's), the classifier and the targets (their
    bytes), and the steps' settings."""
    _, mean, std = image_geometry(model)
    h = hashlib.sha256(repr((image_tower_digest(model), mean.tolist(), std.tolist(), logit_scale(model), per_cell,
                             config.gate_translate_steps, config.step_size, config.batch_size, str(amp),
                             str(images.device))).encode())
    for t in (images, cell_text, target):
        h.update(tensor_hash(t).encode())
    return h.hexdigest()


def _domain_examples(examples, spec: ForgetSpec, model: nn.Module):
    """``forget``'s ``domain_examples`` checked against the request and the model: (the images as
    ``ImageRows`` [n, 3, H, W], left where the caller holds them and not copied: the gate reads them a
    batch at a time; domain index [n] into ``spec.domains``), or None. A value that is not a tensor but
    slices into image tensors (``ImageFiles``) is checked on its first image now and on every batch as
    the gate reads it (``images.CheckedRows``)."""
    if examples is None:
        return None
    if not isinstance(examples, Mapping):
        raise TypeError(f"domain_examples must map domain names to image tensors, got {type(examples).__name__}")
    unknown = sorted(str(d) for d in examples if d not in spec.domains)
    if unknown:
        raise ValueError(f"domain_examples: {', '.join(map(repr, unknown))} not among the request's domains "
                         f"{list(spec.domains)}")
    (H, W), _, _ = image_geometry(model)
    images, domain = [], []
    for d in spec.domains:
        if d not in examples:
            continue
        x = examples[d]
        if isinstance(x, torch.Tensor):
            check_images(x, f"domain_examples[{d!r}]", H, W)
            if not torch.isfinite(x).all():
                raise ValueError(f"domain_examples[{d!r}]: images with NaN or infinite pixels")
            images.append(x.detach())
        else:
            x = image_source(x, f"domain_examples[{d!r}]", H, W)
            x[0:1]                                  # the first image, now: before any work is done
            images.append(x)
        domain.append(torch.full((len(x),), spec.domains.index(d), dtype=torch.long))
    if not images:
        raise ValueError("domain_examples: no domain given (pass None for none)")
    return ImageRows(images), torch.cat(domain)


def _forget_domain_gate(model, tokenizer, spec: ForgetSpec, config: ForgetConfig, bank, world: World,
                        site, site_error, examples=None) -> Patch:
    """forget() with the domain gate (gate.py) at ``site`` (or ``site_error`` when the model has none):
    prompts, prototypes of every cell, the gate's entries (solved on the leading rank, broadcast),
    self-check. ``examples``: ``_domain_examples``, more examples for the gate's detectors."""
    gated = gated_request(spec)
    if gated is None:
        raise ValueError("edit='domain-gate' forgets some classes (or all) in some domains (the forgotten cells "
                         "must be every pair of their classes and domains, some cells of the other domains kept, "
                         f"two classes or more); this request (mode {spec.mode!r}, {len(spec.classes)} classes) "
                         f"forgets {len(spec.forget_cells)} cells and keeps {len(spec.retain_cells)}, which is not that")
    if site is None:
        raise site_error
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    amp = autocast_dtype(config, device)
    autocast = dict(device_type=device.type, dtype=amp, enabled=amp != torch.float32)
    timings: dict[str, float] = {}
    info: dict = {"edit": "domain-gate", "world_size": world.size}
    cells, P = spec.cells, config.prototypes_per_cell
    classes = list(spec.classes)
    with frozen(model):
        t = time.perf_counter()
        prompts = [spec.prompts(c) for c in cells]
        sizes = [len(ps) for ps in prompts]
        tokens = tokenize(tokenizer, [p for ps in prompts for p in ps], device, context_length(model))
        with torch.autocast(**autocast):                # each rank embeds its share of the prompts
            per_prompt = world.shared(len(tokens), lambda lo, hi: encode_tokens(model, tokens[lo:hi],
                                                                                config.batch_size), device)
        cell_text = ensemble(per_prompt, sizes)
        class_emb = _class_rows(per_prompt, cells, sizes, classes)
        timings["prompts"] = time.perf_counter() - t
        given = bank
        bank = _prototypes(model, cells, cell_text, config, device, bank, info, timings, world)
        images = torch.cat([bank.images[c][:P].to(device) for c in cells])
        forgotten = torch.tensor([d in gated[1] for _, d in cells]).repeat_interleave(P)   # the gate's domains
        domain_of = torch.tensor([spec.domains.index(d) for _, d in cells]).repeat_interleave(P)
        class_of = torch.tensor([classes.index(c) for c, _ in cells]).repeat_interleave(P)
        t = time.perf_counter()
        entries, gate, extra = [], None, None
        if config.gate_translate_steps:           # every rank moves its share of the prototypes
            extra, reused = _translated(model, images, cells, P, cell_text, gated[1], list(spec.domains), config,
                                        classes, world, bank if bank is given else None, amp)
            info["translations_reused"] = reused
            timings["translate"] = time.perf_counter() - t
            t = time.perf_counter()
        if examples is not None:                  # every rank reads its share of the real examples
            examples = (site_read(model, site, examples[0], config.batch_size, autocast, device, world),
                        examples[1])
            timings["examples"] = time.perf_counter() - t
            t = time.perf_counter()
        if world.leader:
            entries, gate = gate_entries(model, site, images, forgotten, class_emb, config.max_rank,
                                         config.batch_size, autocast, rewired_units(applied_patches(model), site),
                                         neutralize=[classes.index(c) for c in gated[0]],
                                         keep_order=config.gate_keep_order_for(examples is not None),
                                         domain_of=domain_of, extra=extra, class_of=class_of, examples=examples)
        entries, info["gate"] = world.broadcast((entries, gate))
        if "examples" in info["gate"]:                 # the real examples per domain, by name
            info["gate"]["examples"] = {spec.domains[j]: n for j, n in info["gate"]["examples"].items()}
        timings["gate"] = time.perf_counter() - t
    info["timings"] = timings
    patch = Patch(entries, spec.to_dict(), config.to_dict(), info)
    info["self_check"] = None
    if config.self_check:
        t = time.perf_counter()
        with frozen(model):
            info["self_check"] = _self_check(model, tokenizer, spec, patch, images, cells, P, per_prompt, sizes,
                                             {"visual"}, config, autocast, world)
        timings["self_check"] = time.perf_counter() - t
    return patch


def synthesize_prototypes(model: nn.Module, tokenizer, spec: ForgetSpec,
                          config: ForgetConfig = ForgetConfig(), *, distributed: bool | None = None,
                          group=None) -> PrototypeBank:
    """Prototypes for every cell of ``spec`` (F and R), to pass to several ``forget`` calls on the
    same model and vocabulary: synthesis is most of an edit's time, and the cells are the same.
    ``distributed``, ``group``: as for ``forget`` (the batches are shared by the ranks, and every rank
    gets every prototype)."""
    _check_call(model, spec, config, classifier=False)
    world = World(distributed, group)
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    amp = autocast_dtype(config, device)
    with frozen(model), torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
        cell_text = class_embeddings(model, tokenizer, [spec.prompts(c) for c in spec.cells], device,
                                     config.batch_size)
    return _prototypes(model, spec.cells, cell_text, config, device, None, {}, {}, world)


def _check_call(model, spec, config, prototypes=None, classifier: bool = True) -> None:
    """TypeError / ValueError naming what is wrong with ``forget``'s (or, without ``classifier``,
    ``synthesize_prototypes``') arguments, before any work."""
    if not isinstance(spec, ForgetSpec):
        raise TypeError(f"spec must be a ForgetSpec, got {type(spec).__name__}")
    if not isinstance(config, ForgetConfig):
        raise TypeError(f"config must be a ForgetConfig, got {type(config).__name__}")
    if prototypes is not None and not isinstance(prototypes, PrototypeBank):
        raise TypeError(f"prototypes must be a PrototypeBank (PrototypeBank.load(path) reads a saved one), got "
                        f"{type(prototypes).__name__}")
    # the zero-shot classifier is every class's mean prompt over its cells: a class with none has no row
    have = {c for c, _ in spec.cells}
    missing = [c for c in spec.classes if c not in have] if classifier else []
    if missing:
        raise ValueError(f"classes {missing} are in the request's vocabulary but in none of its cells (forgotten "
                         "or kept): keep some of their cells, or leave them out of classes")
    if config.device is not None and isinstance(model, nn.Module):
        want = torch.device(config.device)
        elsewhere = sorted({str(p.device) for p in model.parameters()
                            if p.device.type != want.type or (want.index is not None and p.device != want)})
        if elsewhere:
            raise ValueError(f"config.device is {config.device!r} and the model's parameters are on {elsewhere}: "
                             "move the model there (model.to(device)), or leave device at None (the model's)")


def forget(model: nn.Module, tokenizer, spec: ForgetSpec, config: ForgetConfig = ForgetConfig(),
           prototypes: PrototypeBank | None = None, *, domain_examples: Mapping | None = None,
           distributed: bool | None = None, group=None) -> Patch:
    """Compute the patch that makes ``model`` forget ``spec.forget_cells`` and keep ``retain_cells``.

    model:      an open_clip ``CLIP`` with a VisionTransformer image tower, or a Hugging Face
                ``CLIPModel`` (not modified).
    tokenizer:  the model's tokenizer (``open_clip.get_tokenizer(name)``, or the model's Hugging Face
                ``CLIPTokenizer``).
    prototypes: optional ``synthesize_prototypes`` result to reuse; cells it lacks are synthesized.
    domain_examples: optional real images of some of the request's domains, {domain: [n, 3, H, W]}
                preprocessed as the model's inputs, of any classes (only their domain is used): the domain
                gate's detectors are fitted on them as well as on the prototypes. Only for requests the
                domain gate edits; without them the edit is data-free. The tensors are read where they
                are, a batch at a time, and not copied; a value may also be a source that slices into
                such tensors (``ImageFiles``: files decoded a batch at a time, checked as they are read).
    distributed: None (default) shares the work with the other ranks when ``torch.distributed`` is
                initialized with more than one process (launched with ``torchrun``; every rank must then
                call ``forget`` with the same arguments, and every rank gets the same patch); True
                requires it; False keeps the call to this process (``clipforget_fast.distributed``).
    group:      the process group to share with (None: the default group).
    Returns a Patch whose ``info`` holds per-layer ranks, synthesis statistics and per-stage
    ``timings`` (seconds).
    """
    _check_call(model, spec, config, prototypes)
    layers = find_layers(model, config.targets, config.last_blocks)
    layers = [l for l in layers if (l.tower == "text" and config.use_text)
              or (l.tower == "visual" and config.use_prototypes and config.prototypes_per_cell > 0)]
    site, site_error = _find_gate_site(model)
    edit = config.edit_for(spec, gate_site=site is not None)
    examples = _domain_examples(domain_examples, spec, model)
    if examples is not None and edit != "domain-gate":
        raise ValueError(f"domain_examples are for the domain gate's detectors, and this request (mode "
                         f"{spec.mode!r}) gets edit {edit!r}; pass them only where the domain gate edits "
                         f"(config.edit_for(spec, gate_site=...) says which)")
    if edit == "domain-gate":
        return _forget_domain_gate(model, tokenizer, spec, config, prototypes, World(distributed, group), site,
                                   site_error, examples)
    redirect = edit == "class-redirect"
    retain_energy = config.retain_energy_for(edit)
    forgotten_classes = {c for c, _ in spec.forget_cells}
    if redirect:
        layers = [l for l in layers if l.kind == "proj" and l.tower == "text"]
        if all(c in forgotten_classes for c, _ in spec.cells):
            raise ValueError("edit='class-redirect' needs classes that are kept in every domain to hold "
                             f"the text side in place, and this request (mode {spec.mode!r}) forgets every "
                             "class somewhere; the class redirect cannot forget whole domains: use "
                             "edit='domain-gate' (class-token towers) or edit='project' (edit='auto' picks)")
    if not layers:
        raise ValueError(f"config selects no layer: targets={config.targets!r}, use_text="
                         f"{config.use_text}, use_prototypes={config.use_prototypes}, "
                         f"prototypes_per_cell={config.prototypes_per_cell}")
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    world = World(distributed, group)
    timings: dict[str, float] = {}
    info: dict = {"edit": edit, "retain_energy": retain_energy, "layers": {}, "world_size": world.size}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cells = spec.cells                                    # F first, then R
    n_f = len(spec.forget_cells)
    partial: dict[str, list[str]] = {}                    # class -> domains it is forgotten in
    if redirect:
        # the redirect moves every prompt of a forgotten class (M) and holds the other classes' (H)
        moved = [c for c in cells if c[0] in forgotten_classes]
        cells, n_f = moved + [c for c in cells if c[0] not in forgotten_classes], len(moved)
        kept_somewhere = {c for c, _ in spec.retain_cells}
        for c, d in sorted(spec.forget_cells):
            if c in kept_somewhere:
                partial.setdefault(c, []).append(d)
        if partial and not (config.use_prototypes and config.prototypes_per_cell > 0):
            raise ValueError("edit='class-redirect' with classes kept in other domains "
                             f"({sorted(partial)}) needs prototypes: use_prototypes=True and "
                             "prototypes_per_cell ≥ 1")
    groups = ["F"] * n_f + ["R"] * (len(cells) - n_f)
    amp = autocast_dtype(config, device)
    autocast = dict(device_type=device.type, dtype=amp, enabled=amp != torch.float32)

    # the text projection's inputs: the redirect's keys, and the self-check's prompts under the patch
    keep_rows = (tuple(l.name for l in layers if l.kind == "proj" and l.tower == "text")
                 if redirect or config.self_check else ())
    with frozen(model), GramCapture(model, layers, config.token_policy, device, keep_rows) as cap:
        # 1. prompt bank; one text-tower pass gives both the cells' text embeddings and the text
        #    layers' Grams (F prompts first, then R, as the cells are ordered)
        t = time.perf_counter()
        prompts = [spec.prompts(c) for c in cells]
        sizes = [len(ps) for ps in prompts]
        all_tokens = tokenize(tokenizer, [p for ps in prompts for p in ps], device, context_length(model))
        n_f_prompts = sum(sizes[:n_f])
        emb = []
        with torch.autocast(**autocast):
            for g, g_lo, g_hi in (("F", 0, n_f_prompts), ("R", n_f_prompts, len(all_tokens))):
                def rows(lo, hi, g=g, g_lo=g_lo):          # this rank's share of the group's prompts
                    return torch.cat([cap.text(all_tokens[i:min(g_lo + hi, i + config.batch_size)], g)
                                      for i in range(g_lo + lo, g_lo + hi, config.batch_size)]).float()
                got = world.shared(g_hi - g_lo, rows, device)
                if got is not None:
                    emb.append(got)
        cell_text = ensemble(torch.cat(emb), sizes)
        sync()
        timings["prompts"] = time.perf_counter() - t

        # 2. prototype synthesis (when an image-tower layer is edited, or the redirect needs the
        #    image-side domain detectors)
        edits_images = any(l.tower == "visual" for l in layers)
        if edits_images or partial:
            P = config.prototypes_per_cell
            bank = _prototypes(model, cells, cell_text, config, device, prototypes, info, timings, world)
            images = torch.cat([bank.images[c][:P].to(device) for c in cells])
            img_groups = [g for g in groups for _ in range(P)]
        shifts = {}
        if partial:
            t = time.perf_counter()
            shifts, info["redirect"] = _domain_shifts(model, spec, cells, cell_text, images, partial, config,
                                                      autocast, world)
            timings["domain_fit"] = time.perf_counter() - t

        # 3. capture: the image layers' Grams from the prototypes, F and R
        t = time.perf_counter()
        if edits_images:
            with torch.autocast(**autocast):
                for g in ("F", "R"):
                    imgs = images[torch.tensor([gg == g for gg in img_groups], device=device)]
                    lo, hi = world.share(len(imgs))
                    for i in range(lo, hi, config.batch_size):
                        cap.images(imgs[i:min(hi, i + config.batch_size)], g)
        cap.gather(world)                                  # Grams summed, forget rows in order, on every rank
        sync()
        timings["capture"] = time.perf_counter() - t

        # 4. nullspace per layer, 5. patch entries: the leading rank computes them, every rank gets them
        t = time.perf_counter()
        entries = []
        if world.leader:
            gen = torch.Generator(device=device).manual_seed(config.seed)
            last = None                                  # (Grams, prior, U, info) of the layer before
            for layer in layers:
                G = cap.grams[layer.name]
                prior = _prior_directions(model, layer.name)
                if last is not None and _same_problem(last, G, prior):
                    # one input read by several weights (Hugging Face's q, k and v): one basis for all, as
                    # open_clip's fused in_proj gets (a randomized solve per weight would differ by rounding)
                    U, linfo = last[2], dict(last[3])
                else:
                    U, linfo = forget_basis(G["F"], G["R"], retain_energy=retain_energy,
                                            forget_energy=config.forget_energy, max_rank=config.max_rank,
                                            prior=prior, solver=config.solver, oversample=config.oversample,
                                            power_iters=config.power_iters, generator=gen)
                    last = (G, prior, U, dict(linfo))
                linfo.update(samples_F=cap.counts[layer.name]["F"], samples_R=cap.counts[layer.name]["R"])
                info["layers"][layer.name] = linfo
                if U.shape[1] and redirect:
                    keys = torch.cat(cap.rows[layer.name]["F"])
                    row_classes = [cell[0] for cell, n in zip(cells[:n_f], sizes[:n_f]) for _ in range(n)]
                    out = keys.float() @ layer.weight_out_in().detach().float().t()
                    targets = torch.empty_like(out)
                    full = torch.tensor([c not in shifts for c in row_classes], device=out.device)
                    if full.any():
                        targets[full] = class_targets(out[full], [c for c in row_classes if c not in shifts],
                                                      config.redirect_gain)
                    for cls, delta in shifts.items():
                        # prompt i moves to n_i + r δ (n_i its normalized output, r = ‖mean n_i‖), so the
                        # class's normalized mean moves from T_c to T_c + δ_c
                        rows = torch.tensor([c == cls for c in row_classes], device=out.device)
                        norms = out[rows].norm(dim=1, keepdim=True)
                        r = (out[rows] / norms).mean(0).norm()
                        targets[rows] = norms * r * delta.to(out)[None, :]
                    if shifts:
                        entry, info["redirect"]["realized"] = _realize_shifts(layer, U, keys, out, targets, row_classes,
                                                                              shifts, G, config)
                    else:
                        entry = redirect_entry(layer, U, keys, targets, G["F"], G["R"],
                                               retain_weight=config.retain_weight)
                    entries.append(entry)
                elif U.shape[1]:
                    entries.append(_patch_entry(layer, U, config.alpha))
        entries, solved = world.broadcast((entries, {k: info[k] for k in ("layers", "redirect") if k in info}))
        info.update(solved)
        sync()
        timings["nullspace"] = time.perf_counter() - t
    if not entries and world.leader:
        log.warning("no forget direction survived the keep set's subspace; the patch is empty")
    info["timings"] = timings
    patch = Patch(entries, spec.to_dict(), config.to_dict(), info)
    # 6. self-check on the prototypes, when there are any (the class redirect of classes forgotten
    #    everywhere synthesizes none, and gets none)
    info["self_check"] = None
    if config.self_check and entries and (edits_images or partial):
        t = time.perf_counter()
        with frozen(model):
            edited = [l for l in layers if l.name in {e.name for e in entries}]
            text = [l for l in edited if l.tower == "text"]
            rows = None
            if len(text) == 1 and text[0].name in cap.rows:   # the text projection alone: its inputs suffice
                rows = (text[0], torch.cat(cap.rows[text[0].name]["F"] + cap.rows[text[0].name]["R"]))
            info["self_check"] = _self_check(model, tokenizer, spec, patch, images, cells, P, torch.cat(emb),
                                             sizes, {l.tower for l in edited}, config, autocast, world, rows)
        sync()
        timings["self_check"] = time.perf_counter() - t
    return patch
