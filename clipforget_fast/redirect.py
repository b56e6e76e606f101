"""Class redirect: a low-rank edit of the text projection that moves each forgotten class's prompts
to new outputs while holding the kept prompts (an alternative to projecting the forget directions out,
measured in bench/quality.py and README, "Quality status").

For the text projection y = W x (W: [d_out, d_in]) with forget directions U [d_in, k] (from
``nullspace.forget_basis``: the part of the moved prompts' features outside the held prompts'
subspace), the update is W' = W + A Uᵀ with A [d_out, k] the ridge least-squares solution of

    min_A  Σ_{i∈M} ‖A Uᵀx_i - d_i‖² + ρ Σ_{r∈H} ‖A Uᵀx_r‖² + λ‖A‖²,

i.e. Aᵀ = (UᵀG_M U + ρ UᵀG_H U + λI)⁻¹ Σ_M (Uᵀx_i) d_iᵀ, with G_M, G_H the captured second moments
of the moved prompts M (every prompt of a forgotten class) and the held prompts H (every other class).
The wanted output changes d_i depend on where the class is forgotten:

- everywhere (``class_targets``): d_i = -g (w_c · W x_i) w_c, w_c the normalized mean output of class
  c's prompts: the class's text embedding turns away from all its images;
- in some domains only (``class_shifts``): d_i = ‖W x_i‖ r_c δ_c (r_c = ‖mean of the class's
  normalized outputs‖), so that the class's normalized embedding T_c moves to T_c + δ_c. δ_c is
  fitted so that the zero-shot classifier misses the forgotten cells and keeps every other prediction,
  on pseudo image embeddings: each cell's text embedding moved by the modality gap, which the
  synthesized prototypes' mean embedding locates (``pseudo_images``).

Requests that forget every class somewhere (``domain-complete``) leave no class to hold the text side;
the redirect refuses them (``edit="project"`` takes them).
"""
from __future__ import annotations

import torch

from .layers import Layer
from .patch import PatchEntry


def class_targets(out: torch.Tensor, classes: list[str], gain: float) -> torch.Tensor:
    """[n, d_out] output changes that turn each class's prompts against their own class direction.

    out:     [n, d_out] the prompts' current outputs W x_i.
    classes: the class of each row.
    """
    D = torch.empty_like(out)
    for cls in set(classes):
        rows = torch.tensor([c == cls for c in classes], device=out.device)
        w = torch.nn.functional.normalize(out[rows].mean(0), dim=0)
        D[rows] = -gain * (out[rows] @ w)[:, None] * w[None, :]
    return D


def pseudo_images(cell_text: torch.Tensor, proto_emb: torch.Tensor) -> torch.Tensor:
    """[n_cells, D] stand-ins for the image embeddings of each cell: the cell's normalized text
    embedding moved by the modality gap (mean prototype embedding minus mean cell text embedding),
    normalized again.

    cell_text: [n_cells, D] the cells' text embeddings (every cell of the vocabulary).
    proto_emb: [n, D] normalized image embeddings of the prototypes (any cells, a few per cell).
    On the proving ground a cell's text embedding names the cell of a held-out render 98 % of the time
    (nearest of the 100 cells), the mean embedding of the cell's prototypes 84 % (bench/RESULTS.md); the
    prototypes' overall mean still places the image cone, which the text embeddings alone get wrong.
    """
    ct = torch.nn.functional.normalize(cell_text.float(), dim=-1)
    gap = proto_emb.float().mean(0) - ct.mean(0)
    return torch.nn.functional.normalize(ct + gap, dim=-1)


def class_shifts(pseudo: torch.Tensor, cell_class: torch.Tensor, forgotten: torch.Tensor,
                 class_emb: torch.Tensor, free: list[int], scale: float, keep_weight: float,
                 steps: int = 1000, lr: float = 0.01) -> tuple[dict, dict]:
    """The change δ_c of the normalized embedding of each class in ``free`` that makes the zero-shot
    classifier miss the forgotten cells and keep every other prediction, fitted on pseudo images.

    pseudo:     [n, D] normalized pseudo image embeddings (``pseudo_images``), one or more per cell.
    cell_class: [n] long, the class index (row of ``class_emb``) of each pseudo image.
    forgotten:  [n] bool, whether its cell is forgotten.
    class_emb:  [n_classes, D] normalized class embeddings (the zero-shot classifier).
    free:       class indices whose embedding may move (the partly forgotten classes).
    scale:      the model's logit scale.

    Minimizes mean_forgotten -log(1 - p(true class)) + keep_weight · KL(p_before ‖ p_after) over the
    other pseudo images, p = softmax(scale · pseudo · normalize(T + Δ)ᵀ), Δ zero outside ``free``,
    with Adam from Δ = 0 (deterministic). Returns ({class index: δ [D]}, info) with
    δ_c = normalize(T_c + Δ_c) - T_c.
    """
    with torch.inference_mode(False), torch.enable_grad():     # whatever the caller's mode
        return _fit_shifts(pseudo.float().clone(), cell_class.clone(), forgotten.clone(), class_emb.float().clone(),
                           free, scale, keep_weight, steps, lr)


def forget_keep_terms(X: torch.Tensor, T: torch.Tensor, cell_class: torch.Tensor, forgotten: torch.Tensor,
                      scale: float, p0: torch.Tensor):
    """The two terms ``class_shifts`` minimizes, for image embeddings X [n, D] against class embeddings
    T [n_classes, D] (normalized here): mean_forgotten -log(1 - p(true class)) and KL(p0 ‖ p) over the
    other rows (p0: [n, n_classes] log-probabilities before the edit); also the log-probabilities."""
    lg = torch.log_softmax(scale * X @ torch.nn.functional.normalize(T, dim=-1).t(), -1)
    # log(1 - p(true class)) as the log-sum-exp of the other classes' log-probabilities: exact and with a
    # gradient even where p(true) rounds to 1 (a small, confident vocabulary), where log1p(-p) has none
    others = lg.scatter(1, cell_class[:, None], float("-inf"))
    lf = -torch.logsumexp(others[forgotten], dim=1).mean()
    lk = torch.nn.functional.kl_div(lg[~forgotten], p0[~forgotten], log_target=True, reduction="batchmean")
    return lf, lk, lg


def _fit_shifts(X, cell_class, forgotten, class_emb, free, scale, keep_weight, steps, lr):
    T = torch.nn.functional.normalize(class_emb, dim=-1)
    idx = torch.tensor(free, dtype=torch.long, device=T.device)
    keep = ~forgotten
    with torch.no_grad():
        p0 = torch.log_softmax(scale * X @ T.t(), dim=-1)
        kept_before = float((p0.argmax(1) == cell_class)[keep].float().mean())
    delta = torch.zeros(len(free), T.shape[1], device=T.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def terms():
        return forget_keep_terms(X, T.index_add(0, idx, delta), cell_class, forgotten, scale, p0)

    for _ in range(steps):
        lf, lk, _ = terms()
        opt.zero_grad()
        (lf + keep_weight * lk).backward()
        opt.step()
    with torch.no_grad():
        lf, lk, lg = terms()
        hit = lg.argmax(1) == cell_class
        new = torch.nn.functional.normalize(T.index_add(0, idx, delta), dim=-1)
    shifts = {int(c): (new[c] - T[c]) for c in free}
    info = {"forget_loss": round(float(lf), 4), "keep_kl": round(float(lk), 5),
            "pseudo_forgotten_acc": round(float(hit[forgotten].float().mean()), 4),
            "pseudo_kept_acc": round(float(hit[keep].float().mean()), 4),
            "pseudo_kept_acc_before": round(kept_before, 4),
            "shift_norms": [round(float(shifts[c].norm()), 4) for c in free]}
    return shifts, info


def redirect_entry(layer: Layer, U: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                   G_M: torch.Tensor, G_H: torch.Tensor, *, retain_weight: float,
                   ridge: float = 1e-3) -> PatchEntry:
    """The patch entry W' = W + A Uᵀ that moves the rows ``keys`` [n, d_in] by ``targets`` [n, d_out]
    while holding the inputs whose second moment is G_H (G_M: the moved inputs' second moment)."""
    W = layer.weight_out_in().detach().float()
    U = U.to(W.device, torch.float32)
    Z = keys.to(W.device, torch.float32) @ U                    # [n, k]
    MM, MH = U.t() @ G_M.to(U) @ U, U.t() @ G_H.to(U) @ U      # [k, k]
    k = U.shape[1]
    M = MM + retain_weight * MH + ridge * float(torch.trace(MM)) / k * torch.eye(k, device=U.device)
    At = torch.linalg.solve(M, Z.t() @ targets.to(W.device, torch.float32))   # [k, d_out]
    return PatchEntry.on(layer.name, layer.layout, At.t().contiguous().cpu(), U.contiguous().cpu(), layer.param)
