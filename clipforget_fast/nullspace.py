"""Nullspace: the directions that carry the forget set F and not the keep set R (DESIGN §2.5).

Per layer, from the second moments G_F, G_R ([d, d], symmetric PSD):

    U_R  = leading eigenvectors of G_R holding a fraction ``retain_energy`` (1 - ε) of its trace
    Q    = orthonormal basis of [U_R, U_prior]         (U_prior: earlier patches' forget directions)
    G̃_F  = (I - Q Qᵀ) G_F (I - Q Qᵀ)
    U_F  = leading eigenvectors of G̃_F holding ``forget_energy`` of its trace, at most ``max_rank``

Eigen-solvers: exact ``torch.linalg.eigh`` (the reference, used for small d), and a randomized range
finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.3: Gaussian sketch with oversampling, subspace
iterations re-orthonormalized by QR, Rayleigh–Ritz on the small projected matrix), which grows its
rank until the energy target is reached.
"""
from __future__ import annotations

import torch

# Below this d, exact eigh is as fast as sketching, and exact.
EXACT_BELOW = 1024
# Relative eigenvalue floor: directions whose energy is below this fraction of the largest are noise.
REL_FLOOR = 1e-6
# The forget Gram's share left outside the kept directions below which it is rounding, not signal: a
# full-rank keep set at d = 64 (tests/test_nullspace.py's case) leaves 5e-9 to 4e-8 of the trace in fp32.
# Where rounding leaves more (larger d), its directions lie mostly along K, and forget_basis drops those.
LEFT_FLOOR = 1e-6


def _rank_for_energy(evals: torch.Tensor, total: float, energy: float) -> int:
    """Smallest r with sum(evals[:r]) ≥ energy · total (evals sorted descending)."""
    if total <= 0:
        return 0
    cum = torch.cumsum(evals, 0)
    r = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=cum.dtype, device=cum.device)))
    return min(r + 1, evals.numel())


def exact_eig(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of symmetric G [d, d], descending: (evals [d], evecs [d, d]), fp64 inside."""
    ev, V = torch.linalg.eigh(G.double())
    return ev.flip(0).clamp_min(0).to(G.dtype), V.flip(1).to(G.dtype)


def randomized_eig(G: torch.Tensor, rank: int, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``rank`` eigenpairs of symmetric PSD G [d, d]: (evals [rank], evecs [d, rank]).

    Range finder: Y = G Ω (Ω: d × (rank + oversample) Gaussian), ``power_iters`` rounds of
    Q = qr(G Q), then the eigenpairs of the small matrix Qᵀ G Q lifted back by Q.
    """
    d = G.shape[0]
    m = min(d, rank + oversample)
    omega = torch.randn(d, m, device=G.device, dtype=G.dtype, generator=generator)
    Q, _ = torch.linalg.qr(G @ omega)
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(G @ Q)
    small = Q.t() @ G @ Q
    ev, V = torch.linalg.eigh(((small + small.t()) * 0.5).double())
    ev, V = ev.flip(0)[:rank].clamp_min(0), V.flip(1)[:, :rank]
    return ev.to(G.dtype), Q @ V.to(G.dtype)


def _adaptive_range(G: torch.Tensor, target: float, cap: int, block: int, power_iters: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Orthonormal Q [d, m] whose span holds ``target`` of G's energy (trace(QᵀGQ) ≥ target), or
    m = cap. Blocks of Gaussian columns are deflated against the Q found so far, refined by
    ``power_iters`` subspace iterations on (I - QQᵀ) G, and appended (Halko et al. Alg. 4.2 with
    blocking): no restart when the rank guess was too small."""
    d = G.shape[0]
    Q = G.new_zeros(d, 0)
    captured, extra = 0.0, None
    while Q.shape[1] < cap:
        if captured >= target:
            if extra is not None:
                break
            # target reached: one more block of oversampling so the Ritz vectors near the energy
            # cut-off are accurate too (a quarter of the rank found, at least ``block`` columns)
            extra = max(block, Q.shape[1] // 4)
        b = min(extra or block, cap - Q.shape[1])
        Y = G @ torch.randn(d, b, device=G.device, dtype=G.dtype, generator=generator)
        for _ in range(power_iters):
            Y = Y - Q @ (Q.t() @ Y)
            Y, _ = torch.linalg.qr(Y)
            Y = G @ Y
        for _ in range(2):                            # twice is enough (Giraud et al. 2005)
            Y = Y - Q @ (Q.t() @ Y)
        Y, _ = torch.linalg.qr(Y)
        GY = G @ Y
        captured += float((Y * GY).sum())             # trace(Yᵀ G Y): the block's share of the energy
        Q = torch.cat([Q, Y], dim=1)
    return Q


def energy_basis(G: torch.Tensor, energy: float, max_rank: int | None = None, solver: str = "auto",
                 oversample: int = 10, power_iters: int = 2,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis U [d, r] of the leading eigenvectors of PSD G that hold ``energy`` of its
    trace (r ≤ max_rank when given), and their eigenvalues [r].

    The randomized solver grows an orthonormal range Q block by block until it holds the energy
    target (or max_rank + oversample columns), then takes the Ritz pairs of QᵀGQ.
    """
    d = G.shape[0]
    cap = d if max_rank is None else min(d, max_rank)
    total = float(torch.trace(G))
    if total <= 0 or cap == 0:
        return G.new_zeros(d, 0), G.new_zeros(0)
    if solver == "exact" or (solver == "auto" and d < EXACT_BELOW):
        ev, V = exact_eig(G)
    else:
        limit = min(d, cap + oversample)
        # with max_rank set, one block of max_rank + oversample columns; else blocks of 64
        block = limit if max_rank is not None else max(64, oversample)
        Q = _adaptive_range(G, energy * total, limit, block, power_iters, generator)
        small = Q.t() @ G @ Q
        ev, V = torch.linalg.eigh(((small + small.t()) * 0.5).double())
        ev, V = ev.flip(0).clamp_min(0).to(G.dtype), Q @ V.flip(1).to(G.dtype)
    r = min(_rank_for_energy(ev, total, energy), cap)
    r = min(r, int((ev > REL_FLOOR * ev[0]).sum()))
    return V[:, :r].contiguous(), ev[:r]


def forget_basis(G_F: torch.Tensor, G_R: torch.Tensor, *, retain_energy: float, forget_energy: float,
                 max_rank: int, prior: torch.Tensor | None = None, solver: str = "auto",
                 oversample: int = 10, power_iters: int = 2,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """U_F [d, k]: orthonormal forget directions, orthogonal to U_R and to ``prior`` [d, p].

    Returns (U_F, info) where info has the ranks of U_R and U_F and the fraction of G_F's energy
    that U_F holds.
    """
    kw = dict(solver=solver, oversample=oversample, power_iters=power_iters, generator=generator)
    U_R, _ = energy_basis(G_R, retain_energy, **kw)
    keep = U_R if prior is None or prior.numel() == 0 else torch.cat([U_R, prior.to(U_R)], dim=1)
    if keep.shape[1]:
        K, _ = torch.linalg.qr(keep)                              # [d, r]
        # (I - KKᵀ) G_F (I - KKᵀ) in O(d² r), without forming the d × d projector
        GK = G_F @ K                                              # [d, r]
        G_t = G_F - K @ GK.t() - GK @ K.t() + K @ (K.t() @ GK) @ K.t()
        G_t = (G_t + G_t.t()) * 0.5
    else:
        G_t = G_F
    tF = float(torch.trace(G_F))
    if keep.shape[1] and float(torch.trace(G_t)) <= LEFT_FLOOR * tF:
        G_t = torch.zeros_like(G_t)                               # what is left outside K is rounding
    U_F, ev = energy_basis(G_t, forget_energy, max_rank=max_rank, **kw)
    if keep.shape[1] and U_F.shape[1]:
        # eigenvectors of small eigenvalues carry rounding-level components along K: remove them, and
        # drop a direction that was mostly along K (rounding's eigenvector, not the forget set's)
        res = U_F - K @ (K.t() @ U_F)
        U_F, _ = torch.linalg.qr(res[:, res.norm(dim=0) > 0.5])
    info = {"rank_R": U_R.shape[1], "rank_F": U_F.shape[1],
            "forget_energy_removed": float(torch.trace(U_F.t() @ G_F @ U_F)) / tF if tF > 0 else 0.0}
    return U_F, info


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of U [d, p] and V [d, q].

    Both are re-orthonormalized in fp64; small angles come from the sines (svd of V - U UᵀV),
    large ones from the cosines (svd of UᵀV), as arccos alone loses small angles to rounding
    (Knyazev & Argentati 2002).
    """
    U, _ = torch.linalg.qr(U.double())
    V, _ = torch.linalg.qr(V.double())
    cos = torch.linalg.svdvals(U.t() @ V).clamp(0, 1)                 # descending = angles ascending
    sin = torch.linalg.svdvals(V - U @ (U.t() @ V)).clamp(0, 1).flip(0)[:cos.numel()]
    return torch.where(cos * cos < 0.5, torch.arccos(cos), torch.arcsin(sin))
