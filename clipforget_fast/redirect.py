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
- in some domains only (``domain_shifts``): d_i = ‖W x_i‖ r_c δ_c (r_c = ‖mean of the class's
  normalized outputs‖), so that the class's normalized embedding T_c moves to T_c + δ_c, built from
  Δ_c = -g Σ_{d forgotten} m_{c,d} u_d, where u_d is a linear detector of domain d on image embeddings
  (≈ 1 on images of d, ≈ 0 on the others), fitted on the synthesized prototypes inside the span of the
  domains' text embeddings, and m_{c,d} the score margin by which class c wins on its (c, d)
  prototypes. The class's score drops by about g·m on images of the forgotten domains and, thanks to
  a compensating term, stays about where it was on the others.

A text-side edit cannot forget every class of a domain (shifting all classes along one domain
direction leaves their order unchanged): ``domain-complete`` requests need ``edit="project"``.
"""
from __future__ import annotations

import torch

from .layers import Layer
from .patch import PatchEntry, tensor_hash


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


def domain_detectors(proto: torch.Tensor, proto_domain: torch.Tensor, domain_text: torch.Tensor,
                     ridge: float = 1e-4) -> torch.Tensor:
    """[n_domains, D] one linear domain detector per domain, on L2-normalized image embeddings.

    proto:        [n, D] normalized image embeddings of the prototypes (all cells).
    proto_domain: [n] long, the domain index of each prototype.
    domain_text:  [n_domains, D] normalized text embedding of each domain (mean over its cells).
    Detector d is u_d = Bᵀa_d with B = domain_text: least squares of the prototypes' responses onto 1
    for domain d and 0 for the others, scaled to a mean response of 1 on domain d's prototypes. The
    span of the domains' text embeddings keeps the fit to n_domains numbers per detector, which carries
    over from prototypes to real images far better than a free fit in the whole embedding space.
    """
    B = domain_text.float()
    Z = proto.float() @ B.t()                                   # [n, n_domains]
    nd = B.shape[0]
    M = Z.t() @ Z
    M = M + ridge * float(M.trace()) / nd * torch.eye(nd, device=M.device)
    Y = torch.nn.functional.one_hot(proto_domain, nd).to(Z)     # [n, n_domains]
    U = torch.linalg.solve(M, Z.t() @ Y).t() @ B                # [n_domains, D]
    for d in range(nd):
        mine = proto_domain == d
        if mine.any():
            U[d] /= (proto[mine].float() @ U[d]).mean().clamp_min(1e-6)
    return U


def domain_shifts(proto: dict, class_emb: torch.Tensor, classes: list[str], detectors: torch.Tensor,
                  domains: list[str], forget: dict, gain: float, min_margin: float = 0.01) -> tuple[dict, dict]:
    """The change δ_c of the normalized class embedding of every partly forgotten class, and the margins.

    proto:     {(class, domain): [P, D] normalized prototype embeddings}.
    class_emb: [n_classes, D] normalized domain-agnostic class embeddings, rows in ``classes`` order.
    detectors: [n_domains, D] from ``domain_detectors``, rows in ``domains`` order.
    forget:    {class: [domains where it is forgotten]}.

    The raw shift is Δ_c = -g Σ_d m_{c,d} u_d. A class embedding is used normalized, and
    normalize(T_c + Δ_c) scales class c's score down on every image; a term b·μ along the prototypes'
    mean embedding μ (about the same dot product with every image) is added, with b chosen so that the
    prototypes of the domains where c is kept score c as before on average:
    δ_c = normalize(T_c + Δ_c + b μ) - T_c.
    """
    everything = torch.cat(list(proto.values())).float()
    mu = torch.nn.functional.normalize(everything.mean(0), dim=0)
    shifts, info = {}, {}
    for cls, doms in forget.items():
        i = classes.index(cls)
        T = class_emb[i].float()
        delta = torch.zeros_like(T)
        for d in doms:
            s = proto[(cls, d)].float() @ class_emb.t().float()  # [P, n_classes]
            other = s.clone()
            other[:, i] = float("-inf")
            m = max(float((s[:, i] - other.max(1).values).mean()), min_margin)
            info[f"{cls}@{d}"] = {"margin": round(m, 4)}
            delta = delta - gain * m * detectors[domains.index(d)].float()
        kept = torch.cat([v for (c, d), v in proto.items() if d not in doms]).float()
        want = float((kept @ T).mean())

        def score(b):
            return float((kept @ torch.nn.functional.normalize(T + delta + b * mu, dim=0)).mean())

        lo, hi = -2.0, 2.0
        for _ in range(50):                                     # score(b) rises with b here
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if score(mid) < want else (lo, mid)
        b = 0.5 * (lo + hi)
        shifts[cls] = torch.nn.functional.normalize(T + delta + b * mu, dim=0) - T
        info[cls] = {"compensation": round(b, 4), "shift_norm": round(float(shifts[cls].norm()), 4)}
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
    return PatchEntry(layer.name, layer.layout, At.t().contiguous().cpu(), U.contiguous().cpu(),
                      tensor_hash(layer.param))
