"""The mathematics of the nullspace and the projection, on synthetic features with known subspaces."""
import math

import pytest
import torch

from clipforget_fast.nullspace import energy_basis, exact_eig, forget_basis, principal_angles, randomized_eig


def _orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :k]


def _features(basis, n, scales, seed):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(n, basis.shape[1], generator=g, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)
    return coef @ basis.t()


@pytest.fixture
def known_subspaces():
    """d = 48: retain features live in span Q[:, :12], forget features in span Q[:, :12] + Q[:, 12:15]."""
    d = 48
    Q = _orthonormal(d, d)
    X_R = _features(Q[:, :12], 400, [3.0] * 12, 1)
    X_F = _features(Q[:, :15], 60, [1.0] * 12 + [5.0, 4.0, 3.0], 2)
    return Q, X_F.float(), X_R.float()


def test_forget_basis_finds_the_forget_only_directions(known_subspaces):
    Q, X_F, X_R = known_subspaces
    U, info = forget_basis(X_F.t() @ X_F, X_R.t() @ X_R, retain_energy=0.999999, forget_energy=0.999,
                           max_rank=10)
    assert info["rank_F"] == 3 and info["rank_R"] == 12
    assert principal_angles(U, Q[:, 12:15].float()).max() < 1e-3
    assert (Q[:, :12].float().t() @ U).abs().max() < 1e-4       # orthogonal to the kept span


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_projection_annihilates_forget_and_keeps_retain(known_subspaces, alpha):
    Q, X_F, X_R = known_subspaces
    U, _ = forget_basis(X_F.t() @ X_F, X_R.t() @ X_R, retain_energy=0.999999, forget_energy=0.999,
                        max_rank=10)
    W = torch.randn(20, 48)
    W2 = W - alpha * (W @ U) @ U.t()                            # W + A Bᵀ, A = -α W U, B = U
    for j in range(12, 15):
        u = Q[:, j].float()
        assert torch.linalg.norm(W2 @ u) <= (1 - alpha) * torch.linalg.norm(W @ u) + 1e-5 * torch.linalg.norm(W)
        if alpha == 0.5:
            assert torch.allclose(W2 @ u, 0.5 * (W @ u), atol=1e-5 * float(torch.linalg.norm(W)))
    kept = X_R[:50].t()
    rel = torch.linalg.norm(W2 @ kept - W @ kept) / torch.linalg.norm(W @ kept)
    assert rel <= 1e-5


def test_prior_directions_are_excluded(known_subspaces):
    Q, X_F, X_R = known_subspaces
    prior = Q[:, 12:13].float()
    U, info = forget_basis(X_F.t() @ X_F, X_R.t() @ X_R, retain_energy=0.999999, forget_energy=0.999,
                           max_rank=10, prior=prior)
    assert info["rank_F"] == 2
    assert (prior.t() @ U).abs().max() < 1e-5


def test_randomized_matches_exact_with_a_spectral_gap():
    d, k = 300, 10
    Q = _orthonormal(d, d, seed=3).float()
    ev = torch.cat([torch.linspace(100, 50, k), torch.full((d - k,), 1e-2) * torch.rand(d - k)])
    G = (Q * ev) @ Q.t()
    g = torch.Generator().manual_seed(0)
    evr, Ur = randomized_eig(G, k, oversample=10, power_iters=2, generator=g)
    eve, Ue = exact_eig(G)
    assert principal_angles(Ur, Ue[:, :k]).max() <= 1e-4
    assert torch.allclose(evr, eve[:k], rtol=1e-4)


def test_energy_basis_rank_and_solvers_agree():
    d = 1100                                                     # above EXACT_BELOW: auto = randomized
    Q = _orthonormal(d, 40, seed=4).float()
    ev = torch.tensor([2.0 ** -i for i in range(40)])
    G = (Q * ev) @ Q.t()
    U1, e1 = energy_basis(G, 0.99, solver="randomized", generator=torch.Generator().manual_seed(0))
    U2, e2 = energy_basis(G, 0.99, solver="exact")
    # the top 7 eigenvalues of 1, 1/2, 1/4, ... hold 1 - 2^-7 ≥ 0.99 of the energy
    assert U1.shape[1] == U2.shape[1] == 7
    assert principal_angles(U1, U2).max() <= 1e-3


def test_empty_and_zero_grams():
    G0 = torch.zeros(8, 8)
    U, info = forget_basis(G0, G0, retain_energy=0.99, forget_energy=0.9, max_rank=4)
    assert U.shape == (8, 0) and info["rank_F"] == 0
    assert math.isclose(float(principal_angles(torch.eye(4)[:, :2], torch.eye(4)[:, :2]).max()), 0.0, abs_tol=1e-6)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("retain_energy", [0.9999, 1.0])
def test_a_keep_set_that_spans_everything_leaves_nothing_to_forget(solver, retain_energy):
    """Where the kept directions span the whole input, what is left of the forget Gram is rounding:
    both solvers return no direction (the exact one used to normalize rounding into one)."""
    for seed in range(1, 6):
        g = torch.Generator().manual_seed(seed)
        XR, XF = torch.randn(500, 64, generator=g), torch.randn(30, 64, generator=g)
        U, info = forget_basis(XF.t() @ XF, XR.t() @ XR, retain_energy=retain_energy, forget_energy=0.95,
                               max_rank=32, solver=solver, generator=torch.Generator().manual_seed(0))
        assert info["rank_R"] == 64 and U.shape == (64, 0) and info["rank_F"] == 0, seed
