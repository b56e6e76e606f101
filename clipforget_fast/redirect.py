"""Class redirect: a low-rank edit of the text projection that sends each forgotten class's prompts
against their own class direction, while holding the kept prompts (an alternative to projecting the
forget directions out, measured in bench/quality.py and README, "Quality status").

For the text projection y = W x (W: [d_out, d_in]) with forget directions U [d_in, k] (from
``nullspace.forget_basis``: the part of the forget prompts' features outside the kept prompts'
subspace), the update is W' = W + A Uᵀ with A [d_out, k] the ridge least-squares solution of

    min_A  Σ_{i∈F} ‖A Uᵀx_i - d_i‖² + ρ Σ_{r∈R} ‖A Uᵀx_r‖² + λ‖A‖²,
    d_i = -g (w_c · W x_i) w_c,   w_c = normalized mean of W x_i over the prompts of class c,

i.e. Aᵀ = (UᵀG_F U + ρ UᵀG_R U + λI)⁻¹ Σ_F (Uᵀx_i) d_iᵀ, with G_F, G_R the captured second moments.
The forgotten classes' text embeddings turn away from their images; kept prompts move only by their
small components along U. It edits the text side only, so it cannot tell domains apart: use it for
``global`` requests.
"""
from __future__ import annotations

import torch

from .layers import Layer
from .patch import PatchEntry, tensor_hash


def class_redirect_entry(layer: Layer, U: torch.Tensor, keys_F: torch.Tensor, classes_F: list[str],
                         G_F: torch.Tensor, G_R: torch.Tensor, *, gain: float, retain_weight: float,
                         ridge: float = 1e-3) -> PatchEntry:
    """The patch entry W' = W + A Uᵀ for ``layer`` (the text projection).

    U:         [d_in, k] orthonormal forget directions.
    keys_F:    [n_F, d_in] the layer's inputs for every forgotten prompt.
    classes_F: the class of each row of keys_F.
    G_F, G_R:  [d_in, d_in] second moments of the forget and keep inputs.
    """
    W = layer.weight_out_in().detach().float()                  # [d_out, d_in]
    U = U.to(W.device, torch.float32)
    X = keys_F.to(W.device, torch.float32)
    out = X @ W.t()                                             # [n_F, d_out]
    D = torch.empty_like(out)
    for cls in set(classes_F):
        rows = torch.tensor([c == cls for c in classes_F], device=W.device)
        w = torch.nn.functional.normalize(out[rows].mean(0), dim=0)
        D[rows] = -gain * (out[rows] @ w)[:, None] * w[None, :]
    Z = X @ U                                                   # [n_F, k]
    MF, MR = U.t() @ G_F.to(U) @ U, U.t() @ G_R.to(U) @ U      # [k, k]
    k = U.shape[1]
    M = MF + retain_weight * MR + ridge * float(torch.trace(MF)) / k * torch.eye(k, device=U.device)
    At = torch.linalg.solve(M, Z.t() @ D)                       # [k, d_out]
    return PatchEntry(layer.name, layer.layout, At.t().contiguous().cpu(), U.contiguous().cpu(),
                      tensor_hash(layer.param))
