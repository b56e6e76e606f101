"""Pure-PyTorch twins of the GPU kernels: the reference every kernel is tested against, and the
CPU fallback.

Each function here has exactly the signature of its Triton launcher in ``clipforget_fast.kernels``;
``clipforget_fast.dispatch`` chooses between them. The math follows docs/design.md:

* ``lowrank_update_``: ``W_l += scale * L_l R_lᵀ`` for every layer of a patch, fp32 arithmetic,
  rounded once to the weight's dtype (DESIGN §2.6–2.7).
* ``synth_update``: one step of prototype synthesis (Kravets & Namboodiri, WACV 2025, batched):
  RMS-normalized gradient step, L2 decay, optional 3×3 blur, per-channel clamp, acceptance mask and
  the jitter roll of the next step's encoder input.
"""
from __future__ import annotations

import torch

# Rows handled per chunk by the CPU fallback of lowrank_update_: bounds the fp32 temporary to
# ROW_CHUNK × n floats (16 MB at n = 1024) instead of a full-size copy of a ViT-H weight.
ROW_CHUNK = 4096
# Keeps the normalized step finite when a prototype's gradient is exactly zero.
GRAD_EPS = 1e-12


def lowrank_update_(weights: list[torch.Tensor], lefts: list[torch.Tensor],
                    rights: list[torch.Tensor], scale: float = 1.0) -> None:
    """In place: ``W_l += scale * L_l @ R_lᵀ`` for every l.

    weights[l]: [m_l, n_l] fp32/fp16/bf16, updated in place (any strides).
    lefts[l]:   [m_l, k_l] fp32.
    rights[l]:  [n_l, k_l] fp32.
    The product and the sum are computed in fp32 and rounded once to W's dtype.
    """
    for w, left, right in zip(weights, lefts, rights):
        rt = right.to(device=w.device, dtype=torch.float32).t()          # [k, n]
        left = left.to(device=w.device, dtype=torch.float32)             # [m, k]
        if w.dtype == torch.float32:                                     # in place, no temporary
            w.addmm_(left, rt, alpha=scale)
            continue
        for r0 in range(0, w.shape[0], ROW_CHUNK):
            rows = w[r0:r0 + ROW_CHUNK]
            upd = torch.addmm(rows.float(), left[r0:r0 + ROW_CHUNK], rt, alpha=scale)
            rows.copy_(upd)


def _blur3x3(x: torch.Tensor) -> torch.Tensor:
    """Separable [1, 2, 1]/4 ⊗ [1, 2, 1]/4 blur per channel, edges replicated. x: [N, C, H, W]."""
    xp = torch.nn.functional.pad(x, (1, 1, 0, 0), mode="replicate")
    x = (xp[..., :-2] + 2 * xp[..., 1:-1] + xp[..., 2:]) * 0.25
    xp = torch.nn.functional.pad(x, (0, 0, 1, 1), mode="replicate")
    return (xp[..., :-2, :] + 2 * xp[..., 1:-1, :] + xp[..., 2:, :]) * 0.25


def synth_update(x: torch.Tensor, grad_in: torch.Tensor, active: torch.Tensor, *, lr: float,
                 decay: float, lo: torch.Tensor, hi: torch.Tensor, in_shift: tuple[int, int],
                 out_shift: tuple[int, int], blur: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthesis step for a batch of prototypes.

    x:       [N, C, H, W] fp32, the prototypes (unshifted).
    grad_in: [N, C, H, W] any float dtype, d loss / d (encoder input), where the encoder input of
             this step was ``roll(x, in_shift, dims=(2, 3))``.
    active:  [N] bool; inactive prototypes are carried over unchanged.
    lo, hi:  [C] fp32, the valid (normalized) pixel range per channel.
    in_shift, out_shift: (dy, dx) jitter of this step's and of the next step's encoder input.
    blur:    apply a 3×3 blur to the updated image (before the clamp).

    Returns ``(x_new, x_in_next)``, both [N, C, H, W] fp32:
      g       = roll(grad_in, (-dy, -dx))                     (gradient w.r.t. x)
      x_new   = x (1 - lr·decay) - lr · g / (rms(g) + eps)    (rms over each prototype)
      x_new   = clamp(blur(x_new) if blur else x_new, lo[c], hi[c]);  x_new = x where not active
      x_in_next = roll(x_new, out_shift)
    """
    # fp32 arithmetic (fp64 for fp64 prototypes: the float64 twin the GPU check measures errors against)
    g = torch.roll(grad_in.to(torch.promote_types(x.dtype, torch.float32)), shifts=(-in_shift[0], -in_shift[1]),
                   dims=(2, 3))
    rms = g.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, 1, 1, 1)
    x_new = x * (1.0 - lr * decay) - lr * g / (rms + GRAD_EPS)
    if blur:
        x_new = _blur3x3(x_new)
    x_new = torch.maximum(torch.minimum(x_new, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))
    x_new = torch.where(active.view(-1, 1, 1, 1), x_new, x)
    return x_new, torch.roll(x_new, shifts=tuple(out_shift), dims=(2, 3))
