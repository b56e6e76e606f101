"""What limits the domain modes on the proving ground: the measurements behind bench/RESULTS.md,
"quality: exploratory, what limits the domain modes". Nothing here is in the library.

    python bench/domain_limits.py --oracle          # projection edit with real renders as prototypes
    python bench/domain_limits.py --transfer        # how far prototypes are from real renders
    python bench/domain_limits.py --image-redirect  # ridge redirect on visual.proj, real vs prototype keys
    python bench/domain_limits.py --fitted          # best text-side shift / last-MLP edit, fitted on real
                                                    # renders vs on prototypes
    python bench/domain_limits.py --combined [--blocks K]  # both fitted together on real renders (the
                                                    # last K blocks' mlp.c_proj)
    python bench/domain_limits.py --mlp-input       # the last block's mlp.c_fc fitted on real renders,
                                                    # the library's prototypes, Fourier-parametrized ones
    python bench/domain_limits.py --detect          # how well each place of the image tower tells
                                                    # the forgotten domains' images from the rest
    python bench/domain_limits.py --patch-read      # the same off each patch token, for a gate on patches
    python bench/domain_limits.py --class-token-mlp  # the last block's MLP fitted on the class token,
                                                    # real renders vs stand-ins
    python bench/domain_limits.py --class-token-gate  # the same place, data-free: a domain gate from the
                                                    # prototypes and a gated low-rank action (fitted)
    python bench/domain_limits.py --gate-detector   # the library's domain gate detector (gate.py), fitted
                                                    # on the prototypes at several L2 penalties: held-out
                                                    # renders caught and flagged
    python bench/domain_limits.py --gate-keep-order # the domain gate on the nine domain requests at
                                                    # several ForgetConfig.gate_keep_order values
    python bench/domain_limits.py --gate-map-ridge --bank-seeds 0,1,2  # the gate's map ridge on the
                                                    # domain requests, three prototype banks
    python bench/domain_limits.py --gate-collapse --bank-seeds 0,1,2  # the gate's push on the
                                                    # domain-complete requests, a detector per domain or one
    python bench/domain_limits.py --gate-translate --bank-seeds 0,1,2  # the gate's detectors fitted also
                                                    # on prototypes translated between domains
    python bench/domain_limits.py --gate-collapse-ridge --bank-seeds 0,1,2  # their L2 penalty
    python bench/domain_limits.py --gate-map-translate --bank-seeds 0,1,2  # the same on the domain
                                                    # requests, at several detector penalties
    python bench/domain_limits.py --gate-map-per-domain --bank-seeds 0,1,2  # a detector per forgotten
                                                    # domain or one for their union, domain requests
    python bench/domain_limits.py --gate-map-threshold --bank-seeds 0,1,2  # where the map's units switch
                                                    # on, domain requests
    python bench/domain_limits.py --gate-synthesis  # the gate on prototypes synthesized further into
                                                    # their cells (accept_prob, steps)
    python bench/domain_limits.py --gate-collapse-threshold  # where the every-class gate's units switch on
    python bench/domain_limits.py --gate-min-steps  # the gate on prototypes that may not be accepted before
                                                    # a given step (ForgetConfig.min_steps)
    python bench/domain_limits.py --gate-map-class-weight  # the map detectors' weight on the classes the
                                                    # map neutralizes
    python bench/domain_limits.py --gate-collapse-cap  # the every-class gate's push and its cap
    python bench/domain_limits.py --gate-complete-banks --bank-seeds 0,1,2  # the every-class gate on the
                                                    # eight domain-complete requests, bank by bank
    python bench/domain_limits.py --gate-complete-push --bank-seeds 0,1,2  # the same at pushes 20 and 30
    python bench/domain_limits.py --gate-real-detectors  # the gate with detectors fitted on real renders:
                                                    # a ceiling for its stand-in data
    python bench/domain_limits.py --gate-map-ceiling  # the gate's action with a perfect detector, fitted
                                                    # on prototypes vs real renders, on domain-complete
    python bench/domain_limits.py --gate-two-blocks # the gate's action in the last two blocks
    python bench/domain_limits.py --gate-detector-forms  # the every-class gate's detector as a committee
                                                    # of half-spaces, fitted on moved stand-ins, held
                                                    # steady under moves, on mirrored prototypes

Every option takes --weights W: another proving-ground checkpoint instead of the shipped one. The shipped
model reads its class token out; --oracle, --transfer, --image-redirect, --fitted, --combined and
--mlp-input were measured on the average-pooled model shipped before it and need that checkpoint
(`git show 8b80cfa:clipforget_fast/proving_ground/weights/proving_ground_vit48.safetensors > avg.safetensors`,
then --weights avg.safetensors) where they reach into the tower.

Real renders stand in for prototypes only here, as an upper bound that uses data (render seed 5·10⁶,
apart from the held-out evaluation renders at 3·10⁶). Prints the tables; records nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402

from clipforget_fast import ForgetConfig, forget, synthesize_prototypes  # noqa: E402
from clipforget_fast import proving_ground as pg  # noqa: E402
from clipforget_fast.gate import capture, detector, layer_norm  # noqa: E402
from clipforget_fast.layers import gate_site, image_geometry  # noqa: E402
from clipforget_fast.redirect import class_shifts, forget_keep_terms, pseudo_images  # noqa: E402
from clipforget_fast.synthesis import PrototypeBank, frozen  # noqa: E402
from clipforget_fast.text import class_embeddings  # noqa: E402

C, D = list(pg.CLASSES), list(pg.DOMAINS)
REAL_SEED = 5_000_000
STRONG = dict(accept_prob=0.9999, steps=400, jitter=4)   # the synthesis that carried over best
SPEC = q.spec_for("global", ["fish"], None)              # any spec: only its prompts are used here


def cell_text(model, tok) -> torch.Tensor:
    """[classes × domains, D] normalized text embedding of every cell (class-major), the spec's prompts."""
    return F.normalize(class_embeddings(model, tok, [SPEC.prompts((c, d)) for c in C for d in D], "cpu").float(),
                       dim=-1)


def agnostic_text(model, tok, templates=None) -> torch.Tensor:
    """[classes, D] normalized domain-agnostic class embeddings: each class's prompts of every domain
    (the spec's templates, or ``templates``)."""
    sets = [[p for d in D for p in SPEC.prompts((c, d), templates)] for c in C]
    return F.normalize(class_embeddings(model, tok, sets, "cpu").float(), dim=-1)


def fmt(s: q.Scores) -> str:
    same = "" if s.same_class_drop != s.same_class_drop else f", same {s.same_class_drop:.2f}"
    return f"F {q.fmt_forget(s)}, keep {s.keep_drop:.2f}{same}"


def real_bank(per_cell: int) -> PrototypeBank:
    imgs, ci, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    bank = PrototypeBank({}, {}, {})
    for i, c in enumerate(C):
        for j, d in enumerate(D):
            m = (ci == i) & (di == j)
            bank.images[(c, d)], bank.accepted[(c, d)] = imgs[m], torch.ones(int(m.sum()), dtype=torch.bool)
    return bank


def oracle(h: q.Harness) -> None:
    bank = real_bank(8)
    requests = [("domain", ["house"], ["sketch"]), ("domain-complete", None, ["sketch"]), ("global", ["fish"], None)]
    print("| targets, retain_energy | " + " | ".join(f"{','.join(fc or ['*'])} @ {','.join(fd or ['*'])}"
                                                    for _, fc, fd in requests) + " |")
    print("|---|---|---|---|")
    for targets, energy, blocks in (("proj", 0.99, 1), ("proj+mlp", 0.999, 4), ("proj+mlp+attn", 0.99, 4)):
        cfg = ForgetConfig(targets=targets, retain_energy=energy, last_blocks=blocks, use_text=False)
        cols = []
        for mode, fc, fd in requests:
            spec = q.spec_for(mode, fc, fd)
            patch = forget(h.model, h.tok, spec, cfg, prototypes=bank)
            with patch.applied(h.model):             # the weights come back bit for bit
                after = h._eval(q.HELD_OUT_TEMPLATES)
            cols.append(fmt(q.score(spec, h.before["held-out"], after)))
        print(f"| {targets} (last {blocks}), {energy} | " + " | ".join(cols) + " |", flush=True)


def proj_inputs(model, images: torch.Tensor) -> torch.Tensor:
    """The input of visual.proj (the pooled, normalized image features) for ``images``."""
    proj = model.visual.proj
    with torch.no_grad():
        model.visual.proj = None
        try:
            return model.visual(images).float()
        finally:
            model.visual.proj = proj


def bank_keys(model, bank: PrototypeBank):
    X, cells = [], []
    for (c, d), im in bank.images.items():
        X.append(proj_inputs(model, im))
        cells += [C.index(c) * len(D) + D.index(d)] * len(im)
    return torch.cat(X), torch.tensor(cells)


def upsampled_prototypes(model, tok, res: int, steps: int = 200, per_cell: int = 4, jitter: int = 3,
                         lr: float = 0.05) -> PrototypeBank:
    """Prototypes parametrized as a res×res image upsampled to the model's size, optimized with Adam
    against the cells' text embeddings (a variant of the library's synthesis, for comparison)."""
    text = cell_text(model, tok)
    (H, W), mean, std = image_geometry(model)
    lo, hi = ((0 - mean) / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    target = torch.arange(len(text)).repeat_interleave(per_cell)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(len(target), 3, res, res, generator=g) * 0.5).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    scale = model.logit_scale.exp().item()
    with frozen(model):
        for _ in range(steps):
            x = F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
            dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
            x = torch.maximum(torch.minimum(torch.roll(x, (dx, dy), dims=(2, 3)), hi), lo)
            loss = F.cross_entropy(scale * F.normalize(model.encode_image(x), dim=-1) @ text.t(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        x = torch.maximum(torch.minimum(F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False), hi), lo)
    cells = [(c, d) for c in C for d in D]
    return PrototypeBank({cell: x[i * per_cell:(i + 1) * per_cell] for i, cell in enumerate(cells)}, {}, {})


def transfer(h: q.Harness) -> None:
    imgs, ci, di = pg.render(C, D, 4, seed=REAL_SEED)
    Xr, cell_r = proj_inputs(h.model, imgs), ci * len(D) + di
    print("| synthesis | cell (of 100) | class | domain | seconds |\n|---|---|---|---|---|")
    variants = [("defaults", lambda: synthesize_prototypes(h.model, h.tok, q.spec_for("global", ["fish"], None), ForgetConfig())),
                ("p ≥ 0.999, 300 steps", lambda: synthesize_prototypes(
                    h.model, h.tok, q.spec_for("global", ["fish"], None), ForgetConfig(accept_prob=0.999, steps=300))),
                ("p ≥ 0.9999, 400 steps, jitter 4", lambda: synthesize_prototypes(
                    h.model, h.tok, q.spec_for("global", ["fish"], None), ForgetConfig(**STRONG))),
                ("Adam on 24×24 upsampled, 200 steps", lambda: upsampled_prototypes(h.model, h.tok, 24)),
                ("Adam on 12×12 upsampled, 200 steps, jitter 4", lambda: upsampled_prototypes(h.model, h.tok, 12, jitter=4))]
    for name, make in variants:
        t = time.perf_counter()
        bank = make()
        secs = time.perf_counter() - t
        Xp, cell_p = bank_keys(h.model, bank)
        means = torch.stack([Xp[cell_p == k].mean(0) for k in range(len(C) * len(D))])
        pred = torch.cdist(Xr, means).argmin(1)
        acc = [(pred == cell_r).float().mean(), (pred // len(D) == ci).float().mean(), (pred % len(D) == di).float().mean()]
        print(f"| {name} | " + " | ".join(f"{100 * float(a):.1f} %" for a in acc) + f" | {secs:.0f} |", flush=True)


def ridge_redirect(h: q.Harness, T, X, cells, spec, gain: float, hold: float, ridge: float):
    """ΔP on visual.proj moving each forgotten image's output against its class (T: agnostic text
    embeddings), holding the other images' outputs: min ‖X_F ΔP - T_F‖² + hold ‖X_R ΔP‖² + ridge."""
    proj = h.model.visual.proj
    forgotten = {C.index(c) * len(D) + D.index(d) for c, d in spec.forget_cells}
    isF = torch.tensor([int(k) in forgotten for k in cells])
    Tc = T[cells[isF] // len(D)]
    V = X[isF] @ proj.detach()
    target = -gain * (V * Tc).sum(-1, keepdim=True) * Tc
    M = X[isF].t() @ X[isF] + hold * X[~isF].t() @ X[~isF]
    M = M + ridge * M.trace() / M.shape[0] * torch.eye(M.shape[0])
    dP = torch.linalg.solve(M, X[isF].t() @ target)
    with torch.no_grad():
        proj.add_(dP)
        try:
            after = h._eval(q.HELD_OUT_TEMPLATES)
        finally:
            proj.sub_(dP)
    return q.score(spec, h.before["held-out"], after)


def image_redirect(h: q.Harness) -> None:
    requests = [("domain", ["house"], ["sketch"]), ("domain", ["cup", "key", "umbrella"], ["painting", "pixel_art"])]
    real = bank_keys(h.model, real_bank(8))
    protos = bank_keys(h.model, synthesize_prototypes(h.model, h.tok, q.spec_for("global", ["fish"], None),
                                                      ForgetConfig(prototypes_per_cell=8, **STRONG)))
    T = agnostic_text(h.model, h.tok)
    print("| keys | gain, hold, ridge | " + " | ".join(f"{','.join(fc)} @ {','.join(fd)}" for _, fc, fd in requests)
          + " |\n|---|---|---|---|")
    grid = [("real renders", real, [(2, 1, 1e-3)]),
            ("prototypes", protos, list(itertools.product([3, 5], [1, 3], [0.3, 1.0, 3.0])))]
    for name, (X, cells), settings in grid:
        for g, rho, lam in settings:
            cols = [fmt(ridge_redirect(h, T, X, cells, q.spec_for(m, fc, fd), g, rho, lam)) for m, fc, fd in requests]
            print(f"| {name} | {g}, {rho}, {lam} | " + " | ".join(cols) + " |", flush=True)


REQUESTS = [("domain", ["house"], ["sketch"]), ("domain", ["star"], ["photo"]),
            ("domain", ["cup", "key", "umbrella"], ["painting", "pixel_art"]),
            ("domain-complete", None, ["sketch"]), ("domain-complete", None, ["pixel_art"]),
            ("domain-complete", None, ["cartoon", "painting"])]


def _avg_pool_tower(model, who: str):
    v = model.visual
    if v.pool_type != "avg" or v.final_ln_after_pool or v.attn_pool is not None:
        raise SystemExit(f"{who} assumes average pooling after ln_post, as the proving ground shipped before the "
                         "class-token one had (--weights: see the module docstring)")
    return v


def _class_token_tower(model, who: str):
    v = model.visual
    if v.pool_type != "tok" or v.final_ln_after_pool or v.attn_pool is not None:
        raise SystemExit(f"{who} needs a checkpoint that pools its class token (the shipped one does)")
    return v


def _inputs_of(model, module, images: torch.Tensor) -> torch.Tensor:
    """[n, tokens, width]: what ``module`` of the image tower receives when ``images`` are encoded."""
    store = []
    hook = module.register_forward_pre_hook(lambda m, a: store.append(a[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(images), 200):
                model.encode_image(images[i:i + 200])
    finally:
        hook.remove()
    return torch.cat(store)


def _embed_from_tokens(v, x: torch.Tensor) -> torch.Tensor:
    """[n, D] normalized embeddings from the last block's output tokens (ln_post, average pool, proj)."""
    return F.normalize(v.ln_post(x)[:, 1:].mean(1) @ v.proj, dim=-1)


class LastBlock:
    """The image tower from the input of the last block's MLP on: caches the residual stream there
    (every token) so that an edit of the last block's ``mlp.c_proj`` (``embed``) or ``mlp.c_fc``
    (``embed_input``) is evaluated without the rest."""

    def __init__(self, model, images: torch.Tensor):
        self.v = _avg_pool_tower(model, "LastBlock")
        self.blk = self.v.transformer.resblocks[-1]
        self.R = _inputs_of(model, self.blk.ln_2, images)                 # [n, tokens, width]
        with torch.no_grad():
            self.L = self.blk.ln_2(self.R)                                 # the MLP's input
            self.H = F.gelu(self.blk.mlp.c_fc(self.L))                     # [n, tokens, 4·width]

    def embed(self, dW: torch.Tensor | float = 0.0) -> torch.Tensor:
        """[n, D] normalized image embeddings with mlp.c_proj.weight + dW."""
        mlp = self.blk.mlp.c_proj
        return _embed_from_tokens(self.v, self.R + F.linear(self.H, mlp.weight + dW, mlp.bias))

    def embed_input(self, dW: torch.Tensor | float = 0.0) -> torch.Tensor:
        """[n, D] normalized image embeddings with mlp.c_fc.weight + dW."""
        m = self.blk.mlp
        hidden = F.gelu(F.linear(self.L, m.c_fc.weight + dW, m.c_fc.bias))
        return _embed_from_tokens(self.v, self.R + F.linear(hidden, m.c_proj.weight, m.c_proj.bias))


class LastBlocks:
    """The image tower from the input of its last ``k`` blocks on (the residual stream there cached), so
    that changes of those blocks' ``mlp.c_proj`` weights are evaluated without the blocks before."""

    def __init__(self, model, images: torch.Tensor, k: int):
        self.v = _avg_pool_tower(model, "LastBlocks")
        self.blocks = list(self.v.transformer.resblocks)[-k:]
        self.X = _inputs_of(model, self.blocks[0], images)                  # [n, tokens, width]

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(b.mlp.c_proj.weight, requires_grad=True) for b in self.blocks]

    def embed(self, dWs=None) -> torch.Tensor:
        """[n, D] normalized image embeddings with each block's mlp.c_proj.weight + dWs[i]."""
        x = self.X
        for i, b in enumerate(self.blocks):
            w = b.mlp.c_proj.weight + (dWs[i] if dWs is not None else 0.0)
            x = torch.func.functional_call(b, {"mlp.c_proj.weight": w}, (x,))
        return _embed_from_tokens(self.v, x)


def forget_keep_loss(E, cls, fm, T, scale, p0, keep_weight):
    """The library's fit objective (redirect.forget_keep_terms), for any edit of E or T."""
    lf, lk, _ = forget_keep_terms(E, T, cls, fm, scale, p0)
    return lf + keep_weight * lk


def fit_params(params, embed, cls, fm, T, scale, p0, keep_weight, steps, lr=3e-3) -> None:
    """Fit the leaf tensors ``params`` in place by Adam on the forget/keep loss of the rows whose
    embeddings ``embed()`` gives with them (``cls`` their classes, ``fm`` which are forgotten, ``p0``
    their log-probabilities before)."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = forget_keep_loss(embed(), cls, fm, T, scale, p0, keep_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()


def fit_weight(embed, weight, cls, fm, T, scale, p0, keep_weight, steps, lr=3e-3) -> torch.Tensor:
    """The change dW of ``weight`` (``embed(dW)``: the rows' embeddings with it) fitted by Adam from 0 on
    the forget/keep loss of the rows (as ``fit_params``)."""
    dW = torch.zeros_like(weight, requires_grad=True)
    fit_params([dW], lambda: embed(dW), cls, fm, T, scale, p0, keep_weight, steps, lr)
    return dW.detach()


def verdict(spec, s: q.Scores) -> str:
    return "meets the targets" if not q.misses(spec, s, 1 / len(C)) else "misses"


def prototype_set(bank: PrototypeBank, per_cell: int):
    """(images, class index, domain index) of a bank's ``per_cell`` prototypes of every cell, class-major."""
    images = torch.cat([bank.images[(c, d)] for c in C for d in D])
    return (images, torch.arange(len(C)).repeat_interleave(len(D) * per_cell),
            torch.arange(len(D)).repeat_interleave(per_cell).repeat(len(C)))


def fitted(h: q.Harness, steps_text: int = 300, steps_mlp: int = 150, keep_weight: float = 3.0) -> None:
    """Upper bounds of two edit families, each fitted by gradient descent on the forget/keep loss:
    a free shift of the class embeddings (what a text-side edit can do at best: per forgotten class, or
    every class for domain-complete) and a full-rank change of the last block's mlp.c_proj (image side),
    fitted on real renders (20 per cell, render seed 5·10⁶) or on prototypes (the library's synthesis,
    8 per cell); then the library's class shift fitted on its pseudo images (no real render). Scored on
    the held-out renders with the held-out templates' class embeddings, the shifts applied to them as
    planned (the realized edit is measured by bench/quality.py)."""
    model, scale = h.model, h.model.logit_scale.exp().item()
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)
    imgs, ci, di = pg.render(C, D, 20, seed=REAL_SEED)
    bank = synthesize_prototypes(model, h.tok, SPEC, ForgetConfig(prototypes_per_cell=8))
    pimgs, pci, pdi = prototype_set(bank, 8)
    test = LastBlock(model, h.images)
    fits = {"real renders": (LastBlock(model, imgs), ci, di), "prototypes": (LastBlock(model, pimgs), pci, pdi)}
    with torch.no_grad():
        E_test = test.embed()
        base = (E_test @ T_ho.t()).argmax(1) == h.ci
    print(f"held-out zero-shot accuracy, recomputed: {100 * float(base.float().mean()):.1f} % "
          f"(harness: {100 * h.before['held-out'].cell_mean(SPEC.cells):.1f} %)")
    # the library's stand-ins for image embeddings: the cells' texts moved by the prototypes' modality gap
    CT = cell_text(model, h.tok)                                             # [cells, D], class-major
    before = {}                             # each fit set's embeddings and log-probabilities before any edit
    with torch.no_grad():
        for name, (blk, _, _) in fits.items():
            E0 = blk.embed()
            before[name] = (E0, F.log_softmax(scale * E0 @ T_fit.t(), -1))
    E_proto = before["prototypes"][0]
    pseudo = pseudo_images(CT, E_proto)
    cell_c, cell_d = torch.arange(len(C)).repeat_interleave(len(D)), torch.arange(len(D)).repeat(len(C))
    truth = h.ci * len(D) + h.di
    proto_means = F.normalize(torch.stack([E_proto[(pci == c) & (pdi == d)].mean(0) for c, d in zip(cell_c, cell_d)]), dim=-1)
    for what, M in (("cell text embedding", CT), ("pseudo image (cell text + gap)", pseudo),
                    ("mean prototype embedding", proto_means)):
        named = float(((E_test @ M.t()).argmax(1) == truth).float().mean())
        print(f"held-out renders whose cell is the one of the nearest {what}: {100 * named:.1f} %")

    print("| request | fitted on | text-side class shift | last-block mlp.c_proj |\n|---|---|---|---|")
    for mode, fc, fd in REQUESTS + q.MORE_DOMAIN_REQUESTS:
        spec = q.spec_for(mode, fc, fd)
        for name, (blk, cls, dom) in fits.items():
            fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(cls.tolist(), dom.tolist())])
            E0, p0 = before[name]
            free = torch.tensor(sorted({C.index(c) for c, _ in spec.forget_cells}))
            shift = torch.zeros(len(free), T_fit.shape[1], requires_grad=True)
            opt = torch.optim.Adam([shift], lr=0.01)
            for _ in range(steps_text):
                loss = forget_keep_loss(E0, cls, fm, T_fit.index_add(0, free, shift), scale, p0, keep_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            T_new = T_ho.index_add(0, free, shift.detach())
            text_col = fmt(q.score(spec, h.before["held-out"], evaluate_embeddings(E_test, T_new, h)))
            dW = fit_weight(blk.embed, blk.blk.mlp.c_proj.weight, cls, fm, T_fit, scale, p0, keep_weight, steps_mlp)
            with torch.no_grad():
                mlp_col = fmt(q.score(spec, h.before["held-out"], evaluate_embeddings(test.embed(dW), T_ho, h)))
            print(f"| {mode}: {','.join(fc or ['*'])} @ {','.join(fd)} | {name} | {text_col} | {mlp_col} |", flush=True)
        # the library's fit (redirect.class_shifts) on the pseudo images, applied to the class embeddings
        fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(cell_c.tolist(), cell_d.tolist())])
        free = sorted({C.index(c) for c, _ in spec.forget_cells})
        shifts, _ = class_shifts(pseudo, cell_c, fm, T_fit, free, scale, keep_weight)
        T_new = T_ho.clone()
        for c, delta in shifts.items():
            T_new[c] = T_ho[c] + delta
        text_col = fmt(q.score(spec, h.before["held-out"], evaluate_embeddings(E_test, T_new, h)))
        print(f"| {mode}: {','.join(fc or ['*'])} @ {','.join(fd)} | pseudo images (the library's fit) | {text_col} | |",
              flush=True)


def combined(h: q.Harness, blocks: int = 1, steps: int = 300, per_cell: int = 20, mode: str | None = None,
             keep_weight: float = 3.0) -> None:
    """The text-side class shift and full-rank changes of the last ``blocks`` blocks' mlp.c_proj fitted
    together (one Adam loop, the same loss as --fitted) on real renders: an upper bound, with data, of
    the edit families at once; scored as --fitted. ``per_cell`` renders per cell to fit on; ``mode``: only
    the requests of that mode."""
    model, scale = h.model, h.model.logit_scale.exp().item()
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)
    imgs, ci, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    blk, test = LastBlocks(model, imgs, blocks), LastBlocks(model, h.images, blocks)
    with torch.no_grad():
        p0 = F.log_softmax(scale * blk.embed() @ T_fit.t(), -1)
    print(f"| request | text-side class shift + mlp.c_proj of the last {blocks} block(s), fitted on {per_cell} real "
          f"renders per cell, {steps} steps |\n|---|---|")
    for m, fc, fd in REQUESTS + q.MORE_DOMAIN_REQUESTS:
        if mode and m != mode:
            continue
        spec = q.spec_for(m, fc, fd)
        fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(ci.tolist(), di.tolist())])
        free = torch.tensor(sorted({C.index(c) for c, _ in spec.forget_cells}))
        shift = torch.zeros(len(free), T_fit.shape[1], requires_grad=True)
        dWs = blk.zeros()
        opt = torch.optim.Adam([{"params": [shift], "lr": 0.01}, {"params": dWs, "lr": 3e-3}])
        for _ in range(steps):
            loss = forget_keep_loss(blk.embed(dWs), ci, fm, T_fit.index_add(0, free, shift), scale, p0, keep_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = evaluate_embeddings(test.embed(dWs), T_ho.index_add(0, free, shift), h)
        s = q.score(spec, h.before["held-out"], after)
        print(f"| {m}: {','.join(fc or ['*'])} @ {','.join(fd)} | {fmt(s)} ({verdict(spec, s)}) |", flush=True)


# sRGB colour correlation (the square root of its covariance over natural images, as feature visualization
# uses it), normalized to a largest column norm of 1
COLOUR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOUR = COLOUR / COLOUR.norm(dim=0).max()


def fourier_prototypes(model, tok, per_cell: int = 8, steps: int = 100, lr: float = 0.05, jitter: int = 4,
                       batch: int = 200) -> torch.Tensor:
    """[cells · per_cell, 3, H, W] prototypes (class-major cells, each cell's ``per_cell`` together) drawn in a
    Fourier basis scaled by 1/frequency, with correlated colour and a sigmoid to the pixel range (the
    parametrization of feature visualization, Olah et al. 2017), optimized with Adam against every cell's
    text embedding under random shifts: smooth images, unlike the library's pixel-space prototypes."""
    (H, W), mean, std = image_geometry(model)
    text = cell_text(model, tok)
    target = torch.arange(len(text)).repeat_interleave(per_cell)
    freqs = torch.sqrt(torch.fft.rfftfreq(W)[None, :] ** 2 + torch.fft.fftfreq(H)[:, None] ** 2)
    scale = torch.sqrt(torch.tensor(float(H * W))) / torch.clamp(freqs, min=1.0 / max(H, W))
    g = torch.Generator().manual_seed(0)
    logit_scale = model.logit_scale.exp().item()
    out = []

    def image(spec):
        x = torch.fft.irfft2(torch.view_as_complex(spec) * scale, s=(H, W)) / 4.0
        x = torch.sigmoid(torch.einsum("ij,bjhw->bihw", COLOUR, x))
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    with frozen(model):
        for c0 in range(0, len(target), batch):
            tgt = target[c0:c0 + batch]
            spec = (torch.randn(len(tgt), 3, H, W // 2 + 1, 2, generator=g) * 0.01).requires_grad_(True)
            opt = torch.optim.Adam([spec], lr=lr)
            for _ in range(steps):
                dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
                emb = F.normalize(model.encode_image(torch.roll(image(spec), (dx, dy), (2, 3))), dim=-1)
                loss = F.cross_entropy(logit_scale * emb @ text.t(), tgt)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                out.append(image(spec))
    return torch.cat(out)


def mlp_input(h: q.Harness, steps: int = 150, keep_weight: float = 3.0) -> None:
    """A full change of the last block's ``mlp.c_fc`` (its MLP's input weights, before the GELU) fitted by
    Adam on the --fitted loss, on three sets of stand-ins: real renders (20 per cell, render seed 5·10⁶:
    data, an upper bound), the library's prototypes (8 per cell), and Fourier-parametrized prototypes
    (8 per cell, ``fourier_prototypes``); scored on the held-out renders and templates. Also how well each
    set's mean embedding, and mean MLP input (ln_2 output averaged over tokens), name the held-out
    renders' cells (nearest of the 100)."""
    model, scale = h.model, h.model.logit_scale.exp().item()
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)
    real, rci, rdi = pg.render(C, D, 20, seed=REAL_SEED)
    bank = synthesize_prototypes(model, h.tok, SPEC, ForgetConfig(prototypes_per_cell=8))
    library = prototype_set(bank, 8)
    t = time.perf_counter()
    fourier = fourier_prototypes(model, h.tok)
    print(f"Fourier prototypes: {time.perf_counter() - t:.0f} s", flush=True)
    sets = {"real renders": (real, rci, rdi),
            "prototypes (library)": library, "prototypes (Fourier)": (fourier, *library[1:])}
    test = LastBlock(model, h.images)
    truth = h.ci * len(D) + h.di
    with torch.no_grad():
        E_test, L_test = test.embed(), test.L.mean(1)
    fits = {}
    for name, (imgs, ci, di) in sets.items():
        blk = LastBlock(model, imgs)
        cell = ci * len(D) + di
        with torch.no_grad():
            E = blk.embed()
            zero_shot = float(((E @ T_fit.t()).argmax(1) == ci).float().mean())
            means = F.normalize(torch.stack([E[cell == k].mean(0) for k in range(len(C) * len(D))]), dim=-1)
            by_emb = float(((E_test @ means.t()).argmax(1) == truth).float().mean())
            L = blk.L.mean(1)
            nearest = torch.cdist(L_test, torch.stack([L[cell == k].mean(0) for k in range(len(C) * len(D))])).argmin(1)
            by_mlp = float((nearest == truth).float().mean())
            by_dom = float((nearest % len(D) == h.di).float().mean())
        print(f"{name}: zero-shot {100 * zero_shot:.1f} %; held-out renders named by the mean embedding "
              f"{100 * by_emb:.1f} %, by the mean MLP input {100 * by_mlp:.1f} % (domain {100 * by_dom:.1f} %)", flush=True)
        fits[name] = (blk, ci, di)
    print("| request | fitted on | last-block mlp.c_fc |\n|---|---|---|")
    for m, fc, fd in REQUESTS[:2] + REQUESTS[3:5]:
        spec = q.spec_for(m, fc, fd)
        for name, (blk, ci, di) in fits.items():
            fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(ci.tolist(), di.tolist())])
            with torch.no_grad():
                p0 = F.log_softmax(scale * blk.embed() @ T_fit.t(), -1)
            dW = fit_weight(blk.embed_input, blk.blk.mlp.c_fc.weight, ci, fm, T_fit, scale, p0, keep_weight, steps)
            with torch.no_grad():
                s = q.score(spec, h.before["held-out"], evaluate_embeddings(test.embed_input(dW), T_ho, h))
            print(f"| {m}: {','.join(fc or ['*'])} @ {','.join(fd)} | {name} | {fmt(s)} ({verdict(spec, s)}) |",
                  flush=True)


def tower_features(model, images: torch.Tensor) -> dict:
    """{place: [n, width]} per-image features inside the image tower: the class token and the mean of the
    patch tokens at each block's input, at the last block's MLP input (after its attention), and at the
    last block's output; and the final embedding."""
    v = model.visual
    blocks = list(v.transformer.resblocks)
    stores = {f"block {i} input": [] for i in range(len(blocks))}
    stores.update({"last MLP input": [], "last block output": []})
    hooks = [b.register_forward_pre_hook(lambda m, a, k=f"block {i} input": stores[k].append(a[0].detach()))
             for i, b in enumerate(blocks)]
    hooks.append(blocks[-1].ln_2.register_forward_pre_hook(lambda m, a: stores["last MLP input"].append(a[0].detach())))
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, o: stores["last block output"].append(o.detach())))
    try:                                        # one pass: every place at once
        with torch.no_grad():
            E = torch.cat([F.normalize(model.encode_image(images[i:i + 200]), dim=-1)
                           for i in range(0, len(images), 200)])
    finally:
        for hk in hooks:
            hk.remove()
    places = {k: torch.cat(x) for k, x in stores.items()}
    feats = {}
    for name, x in places.items():
        if name != "block 0 input":            # the class token is the same for every image there
            feats[f"{name}, class token"] = x[:, 0]
        feats[f"{name}, mean of patch tokens"] = x[:, 1:].mean(1)
    feats["final embedding"] = E
    return feats


def linear_detector(X: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3):
    """The library's domain detector (``gate.detector``: logistic, standardized features, L-BFGS) with an
    L2 penalty of ``ridge`` against the mean log loss; (w [f], b) on the raw features: logit = X w + b."""
    return detector(X, y, ridge * len(y))


def caught_at(pos: torch.Tensor, neg: torch.Tensor, flagged: float) -> float:
    """The share of scores ``pos`` above the threshold that flags the share ``flagged`` of scores ``neg``
    (the threshold: the score ranked ``int((1 - flagged) · len(neg))`` from the lowest; strictly above it
    are a share ``flagged`` or a little less). Every "caught at 1 % flagged" figure takes it this way."""
    thr = neg.sort().values[int((1 - flagged) * len(neg))]
    return float((pos > thr).float().mean())


def detect(h: q.Harness, per_cell: int = 20) -> None:
    """How well a per-image linear detector at each place of the image tower tells the forgotten domains'
    images from the rest: fitted on real renders (``per_cell`` per cell, render seed 5·10⁶: data, an
    upper bound of what a gate there can see), scored on the held-out renders: AUC and the share of the
    forgotten domains' images caught at 1 % and 5 % of the others flagged (a gate that catches 90 % of
    them leaves ≤ 10 % forgotten accuracy; one that flags 1 % of the others costs them ~1 point)."""
    imgs, ci, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    fit, test = tower_features(h.model, imgs), tower_features(h.model, h.images)
    print("| forgotten domains | place (per image) | AUC | caught at 1 % flagged | at 5 % |\n|---|---|---|---|---|")
    for doms in (["sketch"], ["pixel_art"], ["cartoon", "painting"], ["photo"]):
        idx = torch.tensor([D.index(d) for d in doms])
        y_fit, y_test = torch.isin(di, idx), torch.isin(h.di, idx)
        for place in fit:
            w, b = linear_detector(fit[place], y_fit)
            s = test[place] @ w + b
            pos, neg = s[y_test], s[~y_test]
            auc = float((pos[:, None] > neg[None]).float().mean())
            caught = [caught_at(pos, neg, a) for a in (0.01, 0.05)]
            print(f"| {','.join(doms)} | {place} | {auc:.4f} | {100 * caught[0]:.1f} % | {100 * caught[1]:.1f} % |",
                  flush=True)


def _mlp_inputs(model, images: torch.Tensor, block: int) -> torch.Tensor:
    """[n, tokens, width] every token's input to image block ``block``'s MLP, after its norm, fp32."""
    norm = model.visual.transformer.resblocks[block].ln_2
    return layer_norm(_inputs_of(model, norm, images).float(), norm)


def patch_read(h: q.Harness, per_cell: int = 20) -> None:
    """Whether a gate could read the domain off the patch tokens, where the tower sees texture, rather than
    off the class token: at each block's MLP input (where a hidden unit could flag a patch, for the next
    block's attention to carry into the class token), a logistic read of each patch token (labelled by its
    image's domain) and of the class token, fitted on real renders (``per_cell`` per cell, render seed
    5·10⁶), scored per held-out image by the class token's logit or by the mean over its patches of the
    patch logit (the mean, its positive part, or the share above 0): the forgotten domain's images caught
    at 1 % of the others flagged."""
    imgs, _, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    reads = ("class token", "patch mean", "patch mean, positive part", "patches above 0")
    print("| block | domain | " + " | ".join(reads) + " |\n|---|---|" + "---|" * len(reads))
    for b in range(len(h.model.visual.transformer.resblocks)):
        fit, test = _mlp_inputs(h.model, imgs, b), _mlp_inputs(h.model, h.images, b)
        for dom in ("pixel_art", "cartoon"):
            y_fit, y_test = di == D.index(dom), h.di == D.index(dom)
            w, c = detector(fit[:, 0], y_fit, 10.0)
            n, t, width = fit.shape
            pw, pc = detector(fit[:, 1:].reshape(-1, width), y_fit[:, None].expand(n, t - 1).reshape(-1), 10.0)
            lp = test[:, 1:] @ pw + pc
            scores = (test[:, 0] @ w + c, lp.mean(1), F.relu(lp).mean(1), (lp > 0).float().mean(1))
            cells = [f"{100 * caught_at(sc[y_test], sc[~y_test], 0.01):.1f} %" for sc in scores]
            print(f"| {b} | {dom} | " + " | ".join(cells) + " |", flush=True)


TOKEN_MLP_REQUESTS = REQUESTS[3:] + REQUESTS[:3]


def class_token_mlp(h: q.Harness, steps: int = 300, keep_weight: float = 10.0, per_cell: int = 20) -> None:
    """On a model that pools its class token, the last block's MLP reaches the embedding through that one
    token: a change of its ``mlp.c_fc`` and ``mlp.c_proj`` weights acts per image. Both fitted together by
    Adam (``steps``, lr 3e-3) on the --fitted loss with ``keep_weight``, on real renders (``per_cell`` and
    3 × ``per_cell`` per cell, render seed 5·10⁶: data, an upper bound) and on stand-ins: the library's
    prototypes, the --fitted strong synthesis, Fourier-parametrized prototypes (8 per cell each); scored
    on the held-out renders and templates."""
    model, scale = h.model, h.model.logit_scale.exp().item()
    v = _class_token_tower(model, "--class-token-mlp")
    blk = v.transformer.resblocks[-1]
    mlp = dict(blk.mlp.named_parameters())
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)

    def token(images):                       # [n, width] the class token at the last MLP's input
        return _inputs_of(model, blk.ln_2, images)[:, 0]

    def embed(M, dW):
        w = {n: mlp[n] + dW[n] for n in dW}
        out = M + torch.func.functional_call(blk.mlp, w, (blk.ln_2(M),))
        return F.normalize(v.ln_post(out) @ v.proj, dim=-1)

    zero = {n: 0.0 for n in ("c_fc.weight", "c_proj.weight")}
    M_test = token(h.images)
    with torch.no_grad():                    # the cached path gives the harness's own accuracies
        base = evaluate_embeddings(embed(M_test, zero), T_ho, h)
    assert torch.equal(base.correct, h.before["held-out"].correct), "the class-token path differs from encode_image"
    sets = {}
    for n in (per_cell, 3 * per_cell):
        imgs, ci, di = pg.render(C, D, n, seed=REAL_SEED)
        sets[f"real renders, {n} per cell"] = (imgs, ci, di)
    for name, cfg in (("prototypes (library)", {}), ("prototypes (strong synthesis)", STRONG)):
        t = time.perf_counter()
        bank = synthesize_prototypes(model, h.tok, SPEC, ForgetConfig(prototypes_per_cell=8, **cfg))
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        sets[name] = prototype_set(bank, 8)
    t = time.perf_counter()
    sets["prototypes (Fourier)"] = (fourier_prototypes(model, h.tok), *sets[name][1:])
    print(f"prototypes (Fourier): {time.perf_counter() - t:.0f} s", flush=True)
    sets = {name: (token(imgs), ci, di) for name, (imgs, ci, di) in sets.items()}
    print(f"| request | fitted on | last block's mlp.c_fc + mlp.c_proj on the class token ({steps} steps, keep weight "
          f"{keep_weight:g}) |\n|---|---|---|")
    for m, fc, fd in TOKEN_MLP_REQUESTS:
        spec = q.spec_for(m, fc, fd)
        for name, (M, ci, di) in sets.items():
            fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(ci.tolist(), di.tolist())])
            with torch.no_grad():
                p0 = F.log_softmax(scale * embed(M, zero) @ T_fit.t(), -1)
            dW = {n: torch.zeros_like(mlp[n], requires_grad=True) for n in zero}
            fit_params(list(dW.values()), lambda: embed(M, dW), ci, fm, T_fit, scale, p0, keep_weight, steps)
            with torch.no_grad():
                s = q.score(spec, h.before["held-out"], evaluate_embeddings(embed(M_test, dW), T_ho, h))
            print(f"| {m}: {','.join(fc or ['*'])} @ {','.join(fd)} | {name} | {fmt(s)} ({verdict(spec, s)}) |",
                  flush=True)


def class_token_gate(h: q.Harness, rank: int = 16, sharpness: float = 3.0, ridge: float = 0.1, steps: int = 300,
                     keep_weight: float = 10.0, per_cell: int = 8) -> None:
    """A data-free image-side edit for a model that pools its class token: ``rank + 1`` of the least-used
    hidden units of the last block's MLP (least mean |activation| × output norm on the prototypes) are
    rewired into a gate and a gated linear map. Every rewired unit reads ``sharpness`` × the logit of a
    linear detector of the forgotten domains (logistic, L2 ``ridge``, fitted on the MLP input of the
    library's prototypes, ``per_cell`` per cell); unit 0 writes minus the sum of the others' outputs, so
    that where the detector is far below 0 every unit is off, and far above it the units add
    ``C Aᵀ ln_2(x)`` (units j ≥ 1 also read ``A[j]``): a rank-``rank`` map acting on the detected images
    only. A and C are fitted by Adam on the prototypes (the --fitted loss, ``keep_weight``); scored on the
    held-out renders and templates, with the detector's own share of held-out renders caught and flagged
    at logit 0."""
    model, scale = h.model, h.model.logit_scale.exp().item()
    v = _class_token_tower(model, "--class-token-gate")
    blk = v.transformer.resblocks[-1]
    W1, b1 = blk.mlp.c_fc.weight.detach(), blk.mlp.c_fc.bias.detach()
    W2, b2 = blk.mlp.c_proj.weight.detach(), blk.mlp.c_proj.bias.detach()
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)
    bank = synthesize_prototypes(model, h.tok, SPEC, ForgetConfig(prototypes_per_cell=per_cell))
    images, ci, di = prototype_set(bank, per_cell)
    with torch.no_grad():
        M, M_test = (_inputs_of(model, blk.ln_2, x)[:, 0] for x in (images, h.images))
        L, L_test = blk.ln_2(M), blk.ln_2(M_test)
        usage = F.gelu(F.linear(L, W1, b1)).abs().mean(0) * W2.norm(dim=0)
    units = usage.argsort()[:rank + 1]

    def embed(Mx, Lx, w=None, b=None, A=None, Cm=None):
        W1e, b1e, W2e = W1, b1, W2
        if w is not None:
            W1e, b1e, W2e = W1.clone(), b1.clone(), W2.clone()
            W1e[units] = sharpness * w[None] + torch.cat([torch.zeros(1, A.shape[1]), A])
            b1e[units] = sharpness * b
            W2e[:, units] = torch.cat([-Cm.sum(1, keepdim=True), Cm], 1)
        out = Mx + F.linear(F.gelu(F.linear(Lx, W1e, b1e)), W2e, b2)
        return F.normalize(v.ln_post(out) @ v.proj, dim=-1)

    print(f"| request | detector on the held-out renders: caught / others flagged | gated rank-{rank} action on "
          f"{rank + 1} rewired units, fitted on the prototypes |\n|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for m, fc, fd in REQUESTS[3:] + REQUESTS[:3]:
        spec = q.spec_for(m, fc, fd)
        fm = torch.tensor([(C[c], D[d]) in spec.forget_cells for c, d in zip(ci.tolist(), di.tolist())])
        dom = torch.tensor([D.index(d) for d in fd])
        w, b = linear_detector(L, torch.isin(di, dom), ridge)
        with torch.no_grad():
            st, yt = L_test @ w + b, torch.isin(h.di, dom)
            p0 = F.log_softmax(scale * embed(M, L) @ T_fit.t(), -1)
        A = (torch.randn(rank, L.shape[1], generator=g) * 0.1).requires_grad_(True)
        Cm = (torch.randn(M.shape[1], rank, generator=g) * 0.01).requires_grad_(True)
        fit_params([A, Cm], lambda: embed(M, L, w, b, A, Cm), ci, fm, T_fit, scale, p0, keep_weight, steps)
        with torch.no_grad():
            s = q.score(spec, h.before["held-out"], evaluate_embeddings(embed(M_test, L_test, w, b, A, Cm), T_ho, h))
        print(f"| {m}: {','.join(fc or ['*'])} @ {','.join(fd)} | {100 * float((st[yt] > 0).float().mean()):.1f} % / "
              f"{100 * float((st[~yt] > 0).float().mean()):.1f} % | {fmt(s)} ({verdict(spec, s)}) |", flush=True)


GATE_RIDGES = (0.1, 10.0, 80.0, 400.0)


def gate_detector(h: q.Harness) -> None:
    """The library's domain gate detector (``gate.detector`` on the MLP input ℓ of the last block's class
    token), fitted on the default config's prototypes (4 per cell) at each L2 penalty in GATE_RIDGES: the
    share of the forgotten domains' held-out renders it catches (logit > 0) and of the others it flags,
    and the same on its own prototypes. A caught image is neutralized, a flagged one too: every point
    flagged costs a kept image's class, every point missed leaves a forgotten one recognized."""
    model = h.model
    site = gate_site(model)
    off = dict(device_type="cpu", enabled=False)
    ell_test = layer_norm(capture(model, site, h.images, 200, off)[0], site.norm)
    bank = synthesize_prototypes(model, h.tok, SPEC, h.config)
    images, _, di = prototype_set(bank, h.config.prototypes_per_cell)
    ell = layer_norm(capture(model, site, images, 200, off)[0], site.norm)
    print("| forgotten domains | detector L2 | held-out renders caught | flagged | prototypes caught | flagged |\n"
          "|---|---|---|---|---|---|")
    for doms in (["sketch"], ["pixel_art"], ["cartoon", "painting"], ["photo"]):
        idx = torch.tensor([D.index(d) for d in doms])
        y, y_test = torch.isin(di, idx), torch.isin(h.di, idx)
        for ridge in GATE_RIDGES:
            w, b = detector(ell, y, ridge)
            st, sp = ell_test @ w + b, ell @ w + b
            rates = [100 * float((s[m] > 0).float().mean())
                     for s, m in ((st, y_test), (st, ~y_test), (sp, y), (sp, ~y))]
            print(f"| {','.join(doms)} | {ridge:g} | " + " | ".join(f"{r:.1f} %" for r in rates) + " |", flush=True)


GATE_KEEP_ORDERS = (0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def gate_keep_order(h: q.Harness) -> None:
    """The library's domain gate (``edit="domain-gate"``) on the harness's three domain requests and the
    six more (``quality.MORE_DOMAIN_REQUESTS``) at each ``gate_keep_order`` in GATE_KEEP_ORDERS (one
    prototype bank for all), scored on the held-out renders and templates; the rows that meet the targets."""
    requests = DOMAIN_REQUESTS
    print("| gate_keep_order | request | forgotten | other classes drop | same classes drop | verdict |\n"
          "|---|---|---|---|---|---|")
    for keep in GATE_KEEP_ORDERS:
        met = 0
        for m, fc, fd in requests:
            spec = q.spec_for(m, fc, fd)
            res, _, _ = h.run(spec, h.config.replace(edit="domain-gate", gate_keep_order=keep))
            s = res["held-out"]
            miss = q.misses(spec, s, h.before["held-out"].chance)
            met += not miss
            print(f"| {keep:g} | {','.join(fc)} @ {','.join(fd)} | {q.fmt_forget(s)} | {s.keep_drop:.2f} | "
                  f"{s.same_class_drop:.2f} | {'ok' if not miss else 'MISS'} |", flush=True)
        print(f"| {keep:g} | **{met} of {len(requests)} requests meet the targets** | | | | |", flush=True)


DOMAIN_REQUESTS = [r for r in q.REQUESTS if r[0] == "domain"] + q.MORE_DOMAIN_REQUESTS   # the nine
COMPLETE_REQUESTS = [r for r in q.REQUESTS if r[0] == "domain-complete"]                # the three
MAP_RIDGES = (1e-3, 0.1, 0.3, 1.0)           # gate.MAP_RIDGE candidates (some classes neutralized)
COLLAPSES = (3.0, 10.0, 30.0)                # gate.COLLAPSE candidates (every class forgotten)
TRANSLATE_STEPS = (0, 20, 60)                # ForgetConfig.gate_translate_steps candidates
COLLAPSE_RIDGES = (10.0, 40.0, 100.0, 300.0, 1000.0)     # gate.COLLAPSE_RIDGE candidates
MAP_TRANSLATE_STEPS = (0, 20)                # ForgetConfig.gate_translate_steps candidates, domain requests
MAP_DETECTOR_RIDGES = (10.0, 100.0)          # gate.DETECTOR_RIDGE candidates with them
MAP_THRESHOLDS = (2.0, 1.0, 0.0, -1.0, -2.0)  # gate.MAP_THRESHOLD candidates
COLLAPSE_THRESHOLDS = (1.0, 0.5, 0.0, -0.5, -1.0)  # gate.COLLAPSE_THRESHOLD candidates
COLLAPSE_CAPS = tuple(itertools.product((10.0, 20.0, 30.0), (1.0, 2.0, 4.0)))   # (gate.COLLAPSE, gate.CAP)
MAP_CLASS_WEIGHTS = (1.0, 3.0, 10.0)          # gate.MAP_CLASS_WEIGHT candidates
GATE_SYNTHESES = ((0.9, 150), (0.99, 200), (0.999, 300))   # (accept_prob, steps) of the gate's prototypes
MIN_STEPS = (0, 40, 80)                       # ForgetConfig.min_steps candidates


def _bank_sweep(h: q.Harness, label: str, values, requests, seeds, setting, variants=((None, None),)) -> None:
    """The library's domain gate on ``requests`` for each value in ``values`` (set by ``setting(value)``,
    which may return ForgetConfig fields to change) and each (name, wrapper) in ``variants`` (``wrapper``
    replaces ``forget``'s call of ``gate.gate_entries``), with prototype banks synthesized with each seed
    in ``seeds``; scored on the held-out renders and templates. Each cell: forgotten accuracy / same
    classes' drop / other classes' drop (domain-complete: forgotten / other domains' drop), * where the
    request meets its targets. The prototypes are translated once per bank, request and number of steps
    (``_translations_once``)."""
    from clipforget_fast import pipeline as module
    print(f"| {label} | request | " + " | ".join(f"bank seed {s}" for s in seeds) + " |\n"
          "|---|---|" + "---|" * len(seeds))
    saved = module.gate_entries
    with _restored(module, "gate_entries"), _translations_once():
        for value, (vname, wrapper) in itertools.product(values, variants):
            fields = setting(value) or {}
            module.gate_entries = wrapper(saved) if wrapper else saved
            tag = _label(value) + (f", {vname}" if vname else "")
            met = [0] * len(seeds)
            for m, fc, fd in requests:
                spec = q.spec_for(m, fc, fd)
                cells = []
                for i, seed in enumerate(seeds):
                    res, _, _ = h.run(spec, h.config.replace(edit="domain-gate", seed=seed, **fields))
                    sc = res["held-out"]
                    ok = not q.misses(spec, sc, h.before["held-out"].chance)
                    met[i] += ok
                    same = "" if m == "domain-complete" else f"{sc.same_class_drop:.2f} / "
                    cells.append(f"{q.fmt_forget(sc)} / {same}{sc.keep_drop:.2f}{' *' if ok else ''}")
                print(f"| {tag} | {','.join(fc or ['*'])} @ {','.join(fd)} | " + " | ".join(cells) + " |", flush=True)
            print(f"| {tag} | **requests meeting the targets** | " + " | ".join(f"{n} of {len(requests)}"
                                                                         for n in met) + " |", flush=True)


def _label(value) -> str:
    """A swept value as the tables name it: numbers in short form, a tuple of them joined, a name as is."""
    if isinstance(value, tuple):
        return ", ".join(_label(v) for v in value)
    return value if isinstance(value, str) else f"{value:g}"


def gate_map_ridge(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate at each ridge of its map's least squares (gate.MAP_RIDGE over MAP_RIDGES)
    on the nine domain requests, for prototype banks synthesized with each seed in ``seeds``."""
    _constant_sweep(h, "MAP_RIDGE", MAP_RIDGES, DOMAIN_REQUESTS, seeds)


def gate_collapse(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the three domain-complete requests at each push (gate.COLLAPSE over
    COLLAPSES), with a detector per forgotten domain (the library's) or one for their union, for
    prototype banks synthesized with each seed in ``seeds``; first the push alone, on every image of the
    forgotten domains and on no other (perfect gates)."""
    def union(entries):                     # gate_entries without the domain labels: one detector
        return lambda *a, **k: entries(*a, **{**k, "domain_of": None})

    # first with perfect gates: every image of a forgotten domain gets the full push (GATE_LEVEL), no other
    site = gate_site(h.model)
    with torch.no_grad():
        T_ho = agnostic_text(h.model, h.tok, q.HELD_OUT_TEMPLATES)
    _, y_t = _block_tokens(h.model, site, h.images)
    print("| COLLAPSE | request | perfect gates: " + " | ".join(f"bank seed {s}" for s in seeds) + " |\n"
          "|---|---|" + "---|" * len(seeds))
    protos = []
    for seed in seeds:
        images, _, di = prototype_set(h.bank(h.config.replace(seed=seed)), h.config.prototypes_per_cell)
        y = _block_tokens(h.model, site, images)[1]
        protos.append((y - y.mean(1, keepdim=True), di))
    for value, (m, fc, fd) in itertools.product(COLLAPSES, COMPLETE_REQUESTS):
        spec = q.spec_for(m, fc, fd)
        cells = []
        for yc, di in protos:
            push = torch.zeros_like(y_t)
            for d in fd:
                v = yc[di == D.index(d)].mean(0)
                push[h.di == D.index(d)] = value * float(yc.norm(dim=1).median()) * v / v.norm()
            sc = q.score(spec, h.before["held-out"], evaluate_embeddings(_final_embedding(site, y_t + push), T_ho, h))
            cells.append(f"{q.fmt_forget(sc)} / {sc.keep_drop:.2f}")
        print(f"| {value:g} | * @ {','.join(fd)} | " + " | ".join(cells) + " |", flush=True)
    _constant_sweep(h, "COLLAPSE", COLLAPSES, COMPLETE_REQUESTS, seeds,
                    (("a detector per domain", None), ("one detector for their union", union)))


def gate_translate(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the three domain-complete requests with its detectors fitted on the
    prototypes alone or also on prototypes translated into and out of the forgotten domains
    (ForgetConfig.gate_translate_steps over TRANSLATE_STEPS), for prototype banks synthesized with each
    seed in ``seeds``."""
    _bank_sweep(h, "gate_translate_steps", TRANSLATE_STEPS, COMPLETE_REQUESTS,
                seeds, lambda v: {"gate_translate_steps": v})


def gate_collapse_ridge(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the three domain-complete requests at each L2 penalty of its
    per-domain detectors (gate.COLLAPSE_RIDGE over COLLAPSE_RIDGES), for prototype banks synthesized with
    each seed in ``seeds``."""
    _constant_sweep(h, "COLLAPSE_RIDGE", COLLAPSE_RIDGES, COMPLETE_REQUESTS, seeds)


def gate_map_translate(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the nine domain requests (some classes forgotten: the gated map) with
    its detector fitted on the prototypes alone or also on prototypes translated into and out of the
    forgotten domains (ForgetConfig.gate_translate_steps over MAP_TRANSLATE_STEPS), at each of its L2
    penalties (gate.DETECTOR_RIDGE over MAP_DETECTOR_RIDGES), for prototype banks synthesized with each
    seed in ``seeds``."""
    from clipforget_fast import gate

    def setting(value):
        steps, ridge = value
        gate.DETECTOR_RIDGE = ridge
        return {"gate_translate_steps": steps}

    with _restored(gate, "DETECTOR_RIDGE"):
        _bank_sweep(h, "gate_translate_steps, DETECTOR_RIDGE",
                    list(itertools.product(MAP_TRANSLATE_STEPS, MAP_DETECTOR_RIDGES)), DOMAIN_REQUESTS, seeds,
                    setting)


def gate_map_per_domain(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the domain requests that forget classes in several domains, with one
    detector for the forgotten domains' union or one per forgotten domain (gate.MAP_PER_DOMAIN), for
    prototype banks synthesized with each seed in ``seeds``."""
    _constant_sweep(h, "MAP_PER_DOMAIN", (False, True), [r for r in DOMAIN_REQUESTS if len(r[2]) > 1], seeds)


def gate_map_threshold(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the nine domain requests with its map's units switching on at each
    detector logit in MAP_THRESHOLDS (gate.MAP_THRESHOLD; below 0: more images caught and flagged, above
    0: fewer), for prototype banks synthesized with each seed in ``seeds``."""
    _constant_sweep(h, "MAP_THRESHOLD", MAP_THRESHOLDS, DOMAIN_REQUESTS, seeds)


def gate_real_detectors(h: q.Harness, per_cell: int = 20) -> None:
    """A ceiling for the gate's stand-in data: the library's domain gate on the nine domain and three
    domain-complete requests (bank seed 0) as committed, and with every detector fitted instead on real
    renders (``per_cell`` per cell, seeds apart from the held-out ones) of its forgotten domain against the
    other domains, with the library's penalty, and then with the gate's sharpness (``gate._sharpness``)
    taken from those renders too: where the detectors' examples are the limit and where the linear read
    of the last block's class token is."""
    from clipforget_fast import gate

    site = gate_site(h.model)
    imgs, _, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    ell_real = layer_norm(capture(h.model, site, imgs, 200, dict(device_type="cpu", enabled=False))[0], site.norm)
    state = {}

    def recording(entries):                     # what the detectors below need to know of the request
        def call(*a, **k):
            forgotten, class_emb, neutralize = a[3], a[4], k.get("neutralize")
            state["domains"] = sorted(set(k["domain_of"][forgotten].tolist()))   # the groups' order
            state["map"] = neutralize is not None and len(set(neutralize)) < class_emb.shape[0]
            return entries(*a, **k)
        return call

    def real(ell, groups, more, ridge, weight=None):
        doms = state["domains"] if len(groups) == len(state["domains"]) else [state["domains"]]
        masks = [torch.isin(di, torch.tensor(d if isinstance(d, list) else [d])) for d in doms]
        fits = [gate.detector(ell_real, m, ridge) for m in masks]
        state["queue"] = [(m, w, b) for m, (w, b) in zip(masks, fits)]
        return fits

    def real_sharpness(g, on):                  # the same rule, on the real renders of the group's domains
        m, w, b = state["queue"].pop(0)
        return library[1](ell_real @ w + b - (gate.MAP_THRESHOLD if state["map"] else gate.COLLAPSE_THRESHOLD), m)

    library = (gate._detectors, gate._sharpness)
    choices = {"the library's (prototypes, translated ones)": library,
               f"fitted on real renders ({per_cell} per cell)": (real, library[1]),
               f"fitted on real renders ({per_cell} per cell), sharpness from them": (real, real_sharpness)}

    def setting(value):
        gate._detectors, gate._sharpness = choices[value]

    with _restored(gate, "_detectors"), _restored(gate, "_sharpness"):
        _bank_sweep(h, "detectors", list(choices), DOMAIN_REQUESTS + COMPLETE_REQUESTS, (0,), setting,
                    ((None, recording),))


def gate_collapse_cap(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the three domain-complete requests at each (push at the median detected
    prototype, cap in multiples of it) in COLLAPSE_CAPS (gate.COLLAPSE, gate.CAP: a low cap with a large
    push gives the weakly detected images more of it), for prototype banks synthesized with each seed in
    ``seeds``."""
    _constant_sweep(h, ("COLLAPSE", "CAP"), COLLAPSE_CAPS, COMPLETE_REQUESTS, seeds)


def gate_map_class_weight(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the nine domain requests with the examples of the classes its map
    neutralizes weighed by each of MAP_CLASS_WEIGHTS in its detectors' fits (gate.MAP_CLASS_WEIGHT), for
    prototype banks synthesized with each seed in ``seeds``."""
    _constant_sweep(h, "MAP_CLASS_WEIGHT", MAP_CLASS_WEIGHTS, DOMAIN_REQUESTS, seeds)


def gate_synthesis(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the nine domain and three domain-complete requests with prototypes
    synthesized to each (ForgetConfig.accept_prob, ForgetConfig.steps) in GATE_SYNTHESES (deeper: each
    prototype pushed further into its cell before it is accepted), for prototype banks synthesized with
    each seed in ``seeds``."""
    _bank_sweep(h, "accept_prob, steps", GATE_SYNTHESES, DOMAIN_REQUESTS + COMPLETE_REQUESTS, seeds,
                lambda v: {"accept_prob": v[0], "steps": v[1]})


def gate_collapse_threshold(h: q.Harness, seeds=(0,)) -> None:
    """The library's domain gate on the three domain-complete requests with its units switching on at each
    detector logit in COLLAPSE_THRESHOLDS (gate.COLLAPSE_THRESHOLD; below 0: more images caught and
    flagged), for prototype banks synthesized with each seed in ``seeds``."""
    _constant_sweep(h, "COLLAPSE_THRESHOLD", COLLAPSE_THRESHOLDS, COMPLETE_REQUESTS, seeds)


def gate_min_steps(h: q.Harness, seeds=(0,), values=MIN_STEPS) -> None:
    """The library's domain gate on the nine domain and three domain-complete requests with prototypes
    that keep moving into their cells until ForgetConfig.min_steps (each of ``values``) before they may be
    accepted, for prototype banks synthesized with each seed in ``seeds``."""
    _bank_sweep(h, "min_steps", values, DOMAIN_REQUESTS + COMPLETE_REQUESTS, seeds, lambda v: {"min_steps": v})


def gate_complete_banks(h: q.Harness, seeds=(0,)) -> None:
    """The library's every-class gate as committed on the eight domain-complete requests (the harness's
    three and its five more, ``--more-complete``), for prototype banks synthesized with each seed in
    ``seeds``: whether a request meets on one bank or on every bank."""
    _bank_sweep(h, "edit", ["library"], COMPLETE_REQUESTS + q.MORE_COMPLETE_REQUESTS, seeds, lambda v: None)


def gate_complete_push(h: q.Harness, seeds=(0,), values=(20.0, 30.0)) -> None:
    """The library's every-class gate on the eight domain-complete requests (as ``gate_complete_banks``)
    with each push in ``values`` (gate.COLLAPSE; the cap stays CAP times it): the photos it leaves are
    caught but pushed too weakly (RESULTS (19)), the false flags of the kept domains get more too."""
    _constant_sweep(h, "COLLAPSE", values, COMPLETE_REQUESTS + q.MORE_COMPLETE_REQUESTS, seeds)


def _constant_sweep(h: q.Harness, name, values, requests, seeds, variants=((None, None),)) -> None:
    """``_bank_sweep`` over the values of the gate's module constant ``name`` (read when the gate is
    fitted), or of a tuple of them together (each value then a tuple), put back afterwards."""
    from clipforget_fast import gate

    names = (name,) if isinstance(name, str) else tuple(name)

    def setting(value):
        for n, v in zip(names, (value,) if isinstance(name, str) else value):
            setattr(gate, n, v)

    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(_restored(gate, n))
        _bank_sweep(h, ", ".join(names), values, requests, seeds, setting, variants)


@contextlib.contextmanager
def _restored(obj, name: str):
    """``obj.name`` as it was on entry, back on exit."""
    saved = getattr(obj, name)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _translations_once():
    """Within it, forget() translates the prototypes of a bank for a request and a number of steps once
    and reuses them (a sweep of the gate's own constants does not change them), whatever bank it is
    handed (the library keeps them only on a caller's bank, and the last few). The key holds the cells in
    their order: the same prototypes listed otherwise are another request's, kept apart."""
    from clipforget_fast import pipeline as module
    saved, memo = module._translated, {}

    def translated(model, images, cells, per_cell, cell_text, forgotten_domains, domains, config, classes,
                   world=None, bank=None, amp=None):
        key = (tuple(cells), float(images.double().sum()), tuple(forgotten_domains), config.gate_translate_steps)
        hit = key in memo
        if not hit:
            memo[key] = saved(model, images, cells, per_cell, cell_text, forgotten_domains, domains, config,
                              classes, world, None, amp)[0]
        return memo[key], hit

    module._translated = translated
    try:
        yield
    finally:
        module._translated = saved


def _block_tokens(model, where, images: torch.Tensor, add=None, before=None):
    """(ℓ, y) of the class token at a GateSite-like ``where`` of the image tower: its MLP input after the
    norm, and the token leaving that block, fp32. ``add`` [n, width] is added to the class token leaving
    the block ``before`` (a module run ahead of ``where``)."""
    rows = iter(add.split(200)) if add is not None else None

    def plus(mod, inp, out):
        out = out.clone()
        (out[:, 0] if where.batch_first else out[0]).add_(next(rows))
        return out

    hook = before.register_forward_hook(plus) if add is not None else None
    try:
        x, hid = capture(model, where, images, 200, dict(device_type="cpu", enabled=False))
    finally:
        if hook is not None:
            hook.remove()
    W2, b2 = where.fc_out.weight.detach().float(), where.fc_out.bias.detach().float()
    return layer_norm(x, where.norm), x + hid @ W2.t() + b2


def _final_embedding(site, y: torch.Tensor) -> torch.Tensor:
    """The normalized image embedding of class tokens ``y`` leaving the last block."""
    return F.normalize(layer_norm(y, site.post_norm) @ site.proj.detach().float(), dim=-1)


def gate_map_ceiling(h: q.Harness, per_cell: int = 20) -> None:
    """How far the domain gate's kind of action can forget whole domains, apart from its detector: the
    three domain-complete requests with the action added to every held-out render of the forgotten
    domains and to no other (a perfect detector). The action is the library's: the rank-(k - 1) ridge fit
    from the class token's MLP input ℓ of ``gate.neutral_shift`` (every class alike), fitted on the
    library's prototypes (4 per cell) or on real renders (``per_cell`` per cell, render seed 5·10⁶: data,
    an upper bound), at two ridges; and the exact shift of each held-out render's own class token (what
    no map of ℓ computes). Forgotten accuracy per domain on the held-out renders and templates."""
    from clipforget_fast.gate import neutral_shift, reduced_rank_fit

    model = h.model
    site = gate_site(model)
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)

    def tokens(images):
        return _block_tokens(model, site, images)

    def embed(y):
        return _final_embedding(site, y)

    ell_t, y_t = tokens(h.images)
    base = evaluate_embeddings(embed(y_t), T_ho, h)
    assert torch.equal(base.correct, h.before["held-out"].correct), "the class-token path differs from encode_image"
    bank = synthesize_prototypes(model, h.tok, SPEC, h.config)
    fits = {"prototypes (library, 4 per cell)": tokens(prototype_set(bank, h.config.prototypes_per_cell)[0]),
            f"real renders ({per_cell} per cell)": tokens(prototype_set(real_bank(per_cell), per_cell)[0])}
    print("| request | action on every image of the forgotten domains | forgotten accuracy |\n|---|---|---|")
    for m, fc, fd in COMPLETE_REQUESTS:
        spec = q.spec_for(m, fc, fd)
        on = torch.isin(h.di, torch.tensor([D.index(d) for d in fd]))[:, None].float()
        rows = [("none", torch.zeros_like(y_t)), ("exact shift of each image's own class token",
                                                  neutral_shift(y_t, site.post_norm, site.proj, T_fit))]
        for name, (ell, y) in fits.items():
            delta = neutral_shift(y, site.post_norm, site.proj, T_fit)
            for ridge in (1e-5, 1e-3):
                A, alpha, Cm, _ = reduced_rank_fit(ell, delta, len(C) - 1, ridge)
                rows.append((f"map of ℓ fitted on {name}, ridge {ridge:g}", (ell_t @ A.t() + alpha) @ Cm.t()))
        for name, d in rows:
            s = q.score(spec, h.before["held-out"], evaluate_embeddings(embed(y_t + on * d), T_ho, h))
            print(f"| * @ {','.join(fd)} | {name} | {q.fmt_forget(s)} |", flush=True)


def gate_two_blocks(h: q.Harness) -> None:
    """The domain gate's action in two blocks: on the three domain-complete requests, a first map of
    the class token at the MLP input of the block before the last, fitted on the prototypes to the neutral
    shift of that block's output read as if it were the last, then the library's map in the last block,
    fitted on the prototypes after the first. Each acts on the images its gate passes: every image of the
    forgotten domains (perfect), or those a detector at its block fitted on the prototypes flags (the
    second one fitted after the first acts, like the map). Every map: rank k - 1, ridge 1e-5. Forgotten
    accuracy per domain and the other domains' drop on the held-out renders and templates."""
    from clipforget_fast.gate import neutral_shift, reduced_rank_fit

    model = h.model
    site = gate_site(model)
    blk = list(_class_token_tower(model, "--gate-two-blocks").transformer.resblocks)[-2]
    first = dataclasses.replace(site, prefix="", norm=blk.ln_2, fc_in=blk.mlp.c_fc, fc_out=blk.mlp.c_proj)
    with torch.no_grad():
        T_fit, T_ho = agnostic_text(model, h.tok), agnostic_text(model, h.tok, q.HELD_OUT_TEMPLATES)

    def tokens(where, images, add=None):     # with ``add`` on the class token leaving the block before the last
        return _block_tokens(model, where, images, add, blk)

    def fitted_map(ell, y):
        A, alpha, Cm, _ = reduced_rank_fit(ell, neutral_shift(y, site.post_norm, site.proj, T_fit), len(C) - 1, 1e-5)
        return lambda e: (e @ A.t() + alpha) @ Cm.t()

    def embed(y):
        return _final_embedding(site, y)

    bank = synthesize_prototypes(model, h.tok, SPEC, h.config)
    protos, _, di = prototype_set(bank, h.config.prototypes_per_cell)
    ell1_p, y1_p = tokens(first, protos)
    ell1_t, y1_t = tokens(first, h.images)
    ell_p, y_p = tokens(site, protos)
    ell_t, y_t = tokens(site, h.images)
    print("| request | gates | first block's gate: caught / flagged | last block's: caught / flagged | result |\n"
          "|---|---|---|---|---|")
    for m, fc, fd in COMPLETE_REQUESTS:
        spec = q.spec_for(m, fc, fd)
        idx = torch.tensor([D.index(d) for d in fd])
        fp, ft = torch.isin(di, idx), torch.isin(h.di, idx)

        def rates(on):
            return f"{100 * float(on[ft].float().mean()):.1f} % / {100 * float(on[~ft].float().mean()):.1f} %"

        def result(y):
            return fmt(q.score(spec, h.before["held-out"], evaluate_embeddings(embed(y), T_ho, h)))

        last = fitted_map(ell_p, y_p)
        w, b = detector(ell_p, fp)
        for name, on in (("last block only, perfect", ft), ("last block only, detector", ell_t @ w + b > 0)):
            print(f"| * @ {','.join(fd)} | {name} | | {rates(on)} | {result(y_t + last(ell_t) * on[:, None])} |")
        one = fitted_map(ell1_p, y1_p)
        w1, b1 = detector(ell1_p, fp)
        for name, on_p, on_t in (("two blocks, perfect", fp, ft),
                                 ("two blocks, detectors", ell1_p @ w1 + b1 > 0, ell1_t @ w1 + b1 > 0)):
            ell2_p, y2_p = tokens(site, protos, one(ell1_p) * on_p[:, None])
            ell2_t, y2_t = tokens(site, h.images, one(ell1_t) * on_t[:, None])
            two = fitted_map(ell2_p, y2_p)
            if name.endswith("perfect"):
                on2 = ft
            else:
                w2, b2 = detector(ell2_p, fp)
                on2 = ell2_t @ w2 + b2 > 0
            print(f"| * @ {','.join(fd)} | {name} | {rates(on_t)} | {rates(on2)} | "
                  f"{result(y2_t + two(ell2_t) * on2[:, None])} |", flush=True)


def committee_detector(X: torch.Tensor, y: torch.Tensor, units: int, ridge: float, steps: int = 600):
    """A read of more than one half-space: the mean of ``units`` ramps clipped to [0, 1] (each what two
    hidden units of one MLP compute, act(z) - act(z - 1), as the every-class gate's push is clipped) less
    a threshold t, so an image must pass several half-spaces by enough to score above 0. The threshold
    after the mean is not a unit's: a gate would act on the mean through its push's effect, so this
    bounds what such a read ranks rather than being a gate. Fitted on ``X``
    [n, f] (standardized) against ``y`` [n] bool by Adam on the log loss of a·(smoothly clipped mean - t)
    with the L2 penalty ``ridge``·|W|²/n (seed 0); returns the score function of raw features."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z, yf = (X - mu) / sd, y.float()
    torch.manual_seed(0)
    W = torch.nn.Parameter(0.1 * torch.randn(units, X.shape[1]))
    b = torch.nn.Parameter(torch.zeros(units))
    a, t = torch.nn.Parameter(torch.tensor(40.0)), torch.nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.Adam([W, b, a, t], lr=0.02)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            z = Z @ W.t() + b
            g = (F.softplus(4 * z) - F.softplus(4 * (z - 1))).div(4).mean(1)
            loss = F.binary_cross_entropy_with_logits(a * (g - t), yf) + ridge * W.pow(2).sum() / len(yf)
            loss.backward()
            opt.step()
    Wr = W.detach() / sd
    br = b.detach() - mu @ Wr.t()
    return lambda F_: (F_ @ Wr.t() + br).clamp(0, 1).mean(1) - float(t.detach())


def steady_detector(X: torch.Tensor, y: torch.Tensor, moved: torch.Tensor, ridge: float, steady: float):
    """The library's logistic detector (standardized features, L2 penalty ``ridge``·|w|²/n) with a second
    penalty ``steady``·wᵀ S w, S the second moment of ``moved`` [m, f] (the change of the features when
    an example is moved): a read kept to what does not change when an image moves, as real images' domain
    does not. (w, b) on the raw features."""
    with torch.enable_grad():
        mu, sd = X.mean(0), X.std(0) + 1e-6
        z, dz = (X - mu) / sd, moved / sd
        S = dz.t() @ dz / len(dz)
        w = torch.zeros(X.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
        yf = y.float()

        def closure():
            opt.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(z @ w + b, yf) + ridge * w.pow(2).sum() / len(yf)
                    + steady * (w @ S @ w))
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach() / sd
        return w, b.detach() - mu @ w


def _moved(images: torch.Tensor, how: str) -> torch.Tensor:
    """``images`` flipped left-right ("flip"), rolled by k pixels down and left ("shift k"), rotated by k
    degrees ("rotate k") or zoomed by k ("zoom k", reflected at the border)."""
    if how == "flip":
        return images.flip(-1)
    kind, k = how.split()
    if kind == "shift":
        return torch.roll(images, shifts=(int(k), -int(k)), dims=(-2, -1))
    c, s = (math.cos(math.radians(float(k))), math.sin(math.radians(float(k)))) if kind == "rotate" else (float(k), 0.0)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


# prototype banks made to read as their cell however they are moved: mirrored at random every step, and
# also rolled by up to 4 pixels (every phase of an 8-pixel patch grid) and kept moving to step 200 of 300
STEADY_BANKS = (("synthesized with random flips", {}),
                ("synthesized with random flips, rolls up to 4 pixels, moving to step 200 of 300",
                 dict(jitter=4, steps=300, min_steps=200)))
GATE_FORMS_DOMAINS = ("pixel_art", "cartoon")   # the domains whose detectors the gate's misses come from
STEADY = (0.01, 0.1, 1.0)                     # steady_detector's penalty on what moving changes
MOVES = (("flip",), ("shift 3", "shift -3"), ("rotate 15", "rotate -15"), ("zoom 0.85", "zoom 1.15"),
         ("flip", "shift 3", "shift -3", "rotate 15", "rotate -15", "zoom 0.85", "zoom 1.15"))


@contextlib.contextmanager
def _flipped_synthesis(seed: int = 0):
    """Within it, prototype synthesis and translation see each image mirrored left-right at random, every
    step (a seeded stream): prototypes made to read as their cell either way round, as real images do."""
    from clipforget_fast import synthesis

    library, gen = synthesis.encode_image, torch.Generator().manual_seed(seed)

    def flipping(model, x):
        mirror = (torch.rand(len(x), generator=gen) < 0.5).view(-1, 1, 1, 1).to(x.device)
        return library(model, torch.where(mirror, x.flip(-1), x))

    synthesis.encode_image = flipping
    try:
        yield
    finally:
        synthesis.encode_image = library


def gate_detector_forms(h: q.Harness, per_cell: int = 40) -> None:
    """Other forms of the every-class gate's detector, from its stand-in data and from real renders: a
    committee of clipped half-spaces (``committee_detector``: a nonlinear read of the same features); the
    linear detector fitted also on the stand-ins moved by flips, shifts, rotations and zooms (the real
    renders' nuisances), or held steady under those moves (``steady_detector``); and fitted on stand-ins
    from prototypes synthesized to read as their cell however they are moved (STEADY_BANKS, with
    ``_flipped_synthesis``), with the gate's result on them. Then how the model's own domain read of the
    prototypes and of real renders bears those moves. For each domain of GATE_FORMS_DOMAINS the stand-ins
    are the library's (prototypes and translated ones, bank seed 0, as ``forget`` builds them for every
    class @ that domain); real renders: ``per_cell`` per cell (render seed 5·10⁶). Scored on the held-out
    renders' class token at the gate's site: caught at 1 % of the others flagged, and caught / flagged at
    score 0 (where the units switch on)."""
    from clipforget_fast import gate, pipeline

    site = gate_site(h.model)
    off = dict(device_type="cpu", enabled=False)
    T = cell_text(h.model, h.tok)

    def ell(images):
        return layer_norm(capture(h.model, site, images, 200, off)[0], site.norm)

    def read(images, j, how):                   # the share the model's zero-shot domain read puts in domain j
        moved = images if how is None else _moved(images, how)
        with torch.no_grad():
            E = torch.cat([F.normalize(h.model.encode_image(moved[i:i + 200]), dim=-1)
                           for i in range(0, len(moved), 200)])
        return float(((E @ T.t()).argmax(1) % len(D) == j).float().mean())

    test = ell(h.images)
    imgs, _, di = pg.render(C, D, per_cell, seed=REAL_SEED)
    real = ell(imgs)
    seen, reads, gates = {}, [], []
    library = pipeline.gate_entries

    def recording(model, where, images, forgotten, class_emb, *a, **k):
        seen["images"], seen["domain"], seen["extra"] = images, k["domain_of"], k["extra"]
        return library(model, where, images, forgotten, class_emb, *a, **k)

    def stand_ins(dom, bank, config=None):      # the request's stand-ins, labels and prototypes of ``dom``
        res, _, _ = h.run(q.spec_for("domain-complete", None, [dom]), config)
        gates.append(f"| {bank} | {dom} | {fmt(res['held-out'])} |")
        j = D.index(dom)
        labels = torch.cat([seen["domain"], seen["extra"][1]]) == j
        return torch.cat([seen["images"], seen["extra"][0]]), labels, seen["images"][seen["domain"] == j]

    print("| domain | fitted on | detector | caught at 1 % flagged | caught at 0 | flagged at 0 |\n"
          "|---|---|---|---|---|---|")
    with _restored(pipeline, "gate_entries"):
        pipeline.gate_entries = recording
        for dom in GATE_FORMS_DOMAINS:
            j, on = D.index(dom), h.di == D.index(dom)

            def row(source, name, score):
                s = score(test)
                print(f"| {dom} | {source} | {name} | {100 * caught_at(s[on], s[~on], 0.01):.1f} % | "
                      f"{100 * float((s[on] > 0).float().mean()):.1f} % | "
                      f"{100 * float((s[~on] > 0).float().mean()):.2f} % |",
                      flush=True)

            stand, labels, protos = stand_ins(dom, "the library's")
            base = ell(stand)
            for source, X, y in ((f"stand-ins ({len(labels)})", base, labels),
                                 (f"real renders ({per_cell} per cell)", real, di == j)):
                w, b = detector(X, y, gate.COLLAPSE_RIDGE)
                row(source, "linear (the library's)", lambda F_: F_ @ w + b)
                for units in (4, 8, 16):
                    for ridge in (10.0, 100.0):
                        row(source, f"committee of {units}, ridge {ridge:g}", committee_detector(X, y, units, ridge))
            for moves in MOVES:
                X = torch.cat([base] + [ell(_moved(stand, m)) for m in moves])
                w, b = detector(X, labels.repeat(1 + len(moves)), gate.COLLAPSE_RIDGE * (1 + len(moves)))
                row(f"stand-ins and {' + '.join(moves)}", "linear (the library's)", lambda F_: F_ @ w + b)
            change = X[len(base):] - base.repeat(len(MOVES[-1]), 1)     # every move of the last, widest set
            for steady in STEADY:
                w, b = steady_detector(base, labels, change, gate.COLLAPSE_RIDGE, steady)
                row(f"stand-ins ({len(labels)})", f"linear, held steady under the moves ({steady:g})",
                    lambda F_: F_ @ w + b)
            reads += [(dom, "the library's", m, read(protos, j, m), read(h.images[on], j, m))
                      for m in (None,) + MOVES[-1]]
            for bank, synthesis in STEADY_BANKS:
                banks, h.banks = h.banks, {}
                try:
                    with _flipped_synthesis():
                        stand, labels, protos = stand_ins(dom, bank, h.config.replace(**synthesis))
                finally:
                    h.banks = banks
                w, b = detector(ell(stand), labels, gate.COLLAPSE_RIDGE)
                row(f"stand-ins from prototypes {bank} ({len(labels)})", "linear (the library's)",
                    lambda F_: F_ @ w + b)
                reads += [(dom, bank, m, read(protos, j, m), read(h.images[on], j, m))
                          for m in (None, "flip", "shift 3", "shift -3")]
    print("\nThe model's own read of the domain (the best of every cell's prompts) on the prototypes and the held-out "
          "renders of a domain, moved:\n\n"
          "| domain | prototypes | moved | prototypes read as the domain | real renders |"
          "\n|---|---|---|---|---|")
    for dom, bank, m, a, b_ in reads:
        print(f"| {dom} | {bank} | {m or 'no'} | {100 * a:.1f} % | {100 * b_:.1f} % |")
    print("\nThe every-class gate on each bank (forgotten accuracy / the other domains' drop):\n\n| prototypes | "
          "domain | held-out templates |\n|---|---|---|\n" + "\n".join(gates))


def evaluate_embeddings(E: torch.Tensor, T: torch.Tensor, h: q.Harness):
    """An AccuracyMatrix of the held-out renders from their embeddings E and class embeddings T."""
    from clipforget_fast.evaluate import AccuracyMatrix

    pred = (E @ F.normalize(T, dim=-1).t()).argmax(1)
    idx = h.ci * len(D) + h.di
    correct = torch.bincount(idx[pred == h.ci], minlength=len(C) * len(D)).view(len(C), len(D))
    total = torch.bincount(idx, minlength=len(C) * len(D)).view(len(C), len(D))
    return AccuracyMatrix(correct, total, tuple(C), tuple(D))


def main(argv=None) -> int:
    # each measurement: its flag and how it runs on the harness and the parsed arguments, in this order;
    # those over prototype banks take the --bank-seeds (``seeds``) as well
    plain = {
        "oracle": lambda h, a: oracle(h),
        "transfer": lambda h, a: transfer(h),
        "image-redirect": lambda h, a: image_redirect(h),
        "fitted": lambda h, a: fitted(h),
        "combined": lambda h, a: combined(h, a.blocks, a.steps, a.fit_per_cell, a.mode),
        "mlp-input": lambda h, a: mlp_input(h),
        "detect": lambda h, a: detect(h),
        "patch-read": lambda h, a: patch_read(h),
        "class-token-mlp": lambda h, a: class_token_mlp(h, a.steps),
        "class-token-gate": lambda h, a: class_token_gate(h, steps=a.steps),
        "gate-detector": lambda h, a: gate_detector(h),
        "gate-keep-order": lambda h, a: gate_keep_order(h),
    }
    banked = {
        "gate-map-ridge": lambda h, a, seeds: gate_map_ridge(h, seeds),
        "gate-collapse": lambda h, a, seeds: gate_collapse(h, seeds),
        "gate-translate": lambda h, a, seeds: gate_translate(h, seeds),
        "gate-collapse-ridge": lambda h, a, seeds: gate_collapse_ridge(h, seeds),
        "gate-map-translate": lambda h, a, seeds: gate_map_translate(h, seeds),
        "gate-map-per-domain": lambda h, a, seeds: gate_map_per_domain(h, seeds),
        "gate-map-threshold": lambda h, a, seeds: gate_map_threshold(h, seeds),
        "gate-synthesis": lambda h, a, seeds: gate_synthesis(h, seeds),
        "gate-collapse-threshold": lambda h, a, seeds: gate_collapse_threshold(h, seeds),
        "gate-min-steps": lambda h, a, seeds: gate_min_steps(h, seeds, a.min_steps),
        "gate-map-class-weight": lambda h, a, seeds: gate_map_class_weight(h, seeds),
        "gate-collapse-cap": lambda h, a, seeds: gate_collapse_cap(h, seeds),
        "gate-complete-banks": lambda h, a, seeds: gate_complete_banks(h, seeds),
        "gate-complete-push": lambda h, a, seeds: gate_complete_push(h, seeds),
    }
    last = {
        "gate-real-detectors": lambda h, a: gate_real_detectors(h),
        "gate-map-ceiling": lambda h, a: gate_map_ceiling(h),
        "gate-two-blocks": lambda h, a: gate_two_blocks(h),
        "gate-detector-forms": lambda h, a: gate_detector_forms(h),
    }
    measurements = {**plain, **{flag: (lambda h, a, run=run: run(h, a, a.seeds)) for flag, run in banked.items()},
                    **last}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-cell", type=int, default=20, help="held-out renders per cell")
    for flag in measurements:
        ap.add_argument(f"--{flag}", action="store_true")
    ap.add_argument("--bank-seeds", default=None,
                    help=", ".join(f"--{flag}" for flag in banked) + ": prototype bank seeds, comma-separated "
                         "(default 0)")
    ap.add_argument("--min-steps", default=",".join(map(str, MIN_STEPS)),
                    help="--gate-min-steps: the values, comma-separated")
    ap.add_argument("--weights", default=None, help="another proving-ground checkpoint")
    ap.add_argument("--blocks", type=int, default=1, help="--combined: how many last blocks' mlp.c_proj to fit")
    ap.add_argument("--steps", type=int, default=300, help="--combined: Adam steps")
    ap.add_argument("--fit-per-cell", type=int, default=20, help="--combined: real renders per cell to fit on")
    ap.add_argument("--mode", choices=("global", "domain", "domain-complete"), help="--combined: only this mode")
    args = ap.parse_args(argv)
    args.seeds = tuple(int(v) for v in (args.bank_seeds or "0").split(","))
    args.min_steps = tuple(int(v) for v in args.min_steps.split(","))
    chosen = [flag for flag in measurements if getattr(args, flag.replace("-", "_"))]
    if not chosen:
        ap.error("choose at least one of " + ", ".join(f"--{flag}" for flag in measurements))
    if args.bank_seeds is not None and not set(chosen) & set(banked):
        ap.error("--bank-seeds goes with one of " + ", ".join(f"--{flag}" for flag in banked))
    torch.manual_seed(0)
    h = q.Harness(args.per_cell, ForgetConfig(), args.weights)
    for flag in chosen:
        measurements[flag](h, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
