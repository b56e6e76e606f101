"""Multi-layer low-rank update, ``W_l += scale · L_l R_lᵀ`` for every layer of a patch, in one launch.

The apply step of DESIGN §2.6–2.7: each weight is read once and written once, the rank-k product is
accumulated in fp32 and rounded once to the weight's dtype. Torch twin: ``reference.lowrank_update_``.

Algorithm (one program per output tile, all layers in one flat tile index)
-----------------------------------------------------------------------
Host side, per launch (one launch per weight dtype):

    table[l] = (addr W_l, addr L_l, addr R_l, m_l, n_l, k_l, row stride of W_l, tiles_n_l)   int64
    start[l] = Σ_{j<l} cdiv(m_j, BLOCK_M) · cdiv(n_j, BLOCK_N);   start[L] = total tiles

Kernel, program t ∈ [0, total):

    l      = largest l with start[l] <= t          # binary search, ⌈log2(L+1)⌉ fixed steps
    i, j   = divmod(t - start[l], tiles_n_l)       # tile row / column inside layer l
    w      = W_l[i-block, j-block].f32             # masked at the ragged edges
    acc    = 0
    if k_max >= 16:  for k0 in 0..k_l step BLOCK_K:  acc += L_l[i-block, k0:] @ R_l[j-block, k0:]ᵀ
    else:            for r in 0..k_l:                acc += L_l[i-block, r] ⊗ R_l[j-block, r]
    W_l[i-block, j-block] = (w + scale · acc).to(W dtype)

Addresses come from ``tensor.data_ptr()`` stored in an int64 table and are cast to typed pointers in
the kernel (``.to(tl.pointer_type(...))``, as in Triton's grouped-GEMM tutorial); this also runs under
the interpreter. Pointers read from memory carry no alignment facts, so when every weight allows it
(16-byte aligned base, row stride and width multiples of 16 bytes) the launcher sets ``ALIGNED`` and
the kernel states those facts with ``tl.multiple_of``, which lets the compiler issue vector loads.

The kernel is not autotuned: it updates weights in place through addresses the autotuner cannot see,
so its benchmark replays would apply the update several times. The tile shape is fixed instead: the
op is memory bound (k ≤ a few dozen), so any tile of a few thousand elements streams at bandwidth.
The dot runs in fp32 ("ieee") for fp32 weights and as three tf32 products ("tf32x3", about fp32
accuracy) for 16-bit weights, where plain fp32 FMAs would make the op compute bound on an H100/H200.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_WEIGHT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_NCOL = 8            # columns of the per-layer table (see the module docstring)
_BLOCK_M, _BLOCK_N = 64, 128
_MIN_DOT_K = 16      # tl.dot needs K ≥ 16; smaller ranks use rank-1 updates


@triton.jit
def _lowrank_update_kernel(table_ptr, start_ptr, num_layers, scale,
                           W_DTYPE: tl.constexpr, NCOL: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           ALIGN: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    # Find the layer: invariant start[lo] <= t < start[hi].
    lo = t * 0
    hi = lo + num_layers
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(start_ptr + mid) <= t
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    row = table_ptr + lo * NCOL
    w_ptr = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
    a_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    m = tl.load(row + 3)
    n = tl.load(row + 4)
    k = tl.load(row + 5)
    ldw = tl.load(row + 6)
    tiles_n = tl.load(row + 7)
    if ALIGN > 1:
        w_ptr = tl.multiple_of(w_ptr, 16)
        n = tl.multiple_of(n, ALIGN)
        ldw = tl.multiple_of(ldw, ALIGN)
    local = t - tl.load(start_ptr + lo)
    tile_m = local // tiles_n
    tile_n = local % tiles_n

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # [BM] int64
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # [BN] int64
    mask_m = rm < m
    mask_n = rn < n
    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + rm[:, None] * ldw + rn[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)         # [BM, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_DOT:
        for k0 in range(0, k, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < k
            a = tl.load(a_ptr + rm[:, None] * k + rk[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)      # [BM, BK]
            b = tl.load(b_ptr + rn[None, :] * k + rk[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)      # [BK, BN]
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        for r in range(0, k):
            a = tl.load(a_ptr + rm * k + r, mask=mask_m, other=0.0)             # [BM]
            b = tl.load(b_ptr + rn * k + r, mask=mask_n, other=0.0)             # [BN]
            acc += a[:, None] * b[None, :]
    tl.store(w_ptrs, (w + scale * acc).to(W_DTYPE), mask=mask)


def _check(weights, lefts, rights) -> None:
    if not (isinstance(weights, (list, tuple)) and isinstance(lefts, (list, tuple))
            and isinstance(rights, (list, tuple))):
        raise TypeError("weights, lefts and rights must be lists of tensors")
    if not len(weights) == len(lefts) == len(rights):
        raise ValueError(f"weights, lefts, rights have lengths {len(weights)}, {len(lefts)}, "
                         f"{len(rights)}; they must match")
    for i, (w, a, b) in enumerate(zip(weights, lefts, rights)):
        if w.dtype not in _WEIGHT_DTYPES:
            raise TypeError(f"weights[{i}].dtype is {w.dtype}; expected float32, float16 or bfloat16")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError(f"lefts[{i}] ({a.dtype}) and rights[{i}] ({b.dtype}) must be floating")
        if w.dim() != 2 or a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"layer {i}: weights, lefts and rights must be 2-D, got "
                             f"{tuple(w.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
        m, n = w.shape
        if a.shape[0] != m or b.shape[0] != n or a.shape[1] != b.shape[1]:
            raise ValueError(f"layer {i}: W {tuple(w.shape)}, L {tuple(a.shape)}, R {tuple(b.shape)} "
                             "do not fit W += L Rᵀ (need L [m, k], R [n, k])")
        if w.device != weights[0].device:
            raise ValueError(f"weights[{i}] is on {w.device}, weights[0] on {weights[0].device}; "
                             "all weights of one launch must share a device")
        if n > 1 and w.stride(1) != 1:                   # a single row [1, n] too: it is read as contiguous
            raise ValueError(f"weights[{i}] has column stride {w.stride(1)}; rows must be contiguous "
                             "(pass the transposed layer's factors swapped instead)")


def lowrank_update_triton(weights: list[torch.Tensor], lefts: list[torch.Tensor],
                          rights: list[torch.Tensor], scale: float = 1.0) -> None:
    """In place: ``W_l += scale * L_l @ R_lᵀ`` for every l; one kernel launch per weight dtype.

    weights[l]: [m_l, n_l] fp32/fp16/bf16, rows contiguous (any row stride), all on one device.
    lefts[l]:   [m_l, k_l] float (converted to contiguous fp32 on W's device).
    rights[l]:  [n_l, k_l] float (likewise).
    """
    _check(weights, lefts, rights)
    groups: dict[torch.dtype, list[int]] = {}
    for i, (w, a) in enumerate(zip(weights, lefts)):
        if w.numel() and a.shape[1]:                     # empty layers and rank 0: nothing to do
            groups.setdefault(w.dtype, []).append(i)
    for dtype, idx in groups.items():
        device = weights[idx[0]].device
        elsize = weights[idx[0]].element_size()
        keep, rows, starts, total = [], [], [0], 0
        for i in idx:
            w = weights[i]
            a = lefts[i].to(device=device, dtype=torch.float32).contiguous()
            b = rights[i].to(device=device, dtype=torch.float32).contiguous()
            keep += [a, b]                               # alive until the launch is queued
            m, n = w.shape
            tiles_n = triton.cdiv(n, _BLOCK_N)
            rows.append([w.data_ptr(), a.data_ptr(), b.data_ptr(), m, n, a.shape[1],
                         w.stride(0) if m > 1 else n, tiles_n])
            total += triton.cdiv(m, _BLOCK_M) * tiles_n
            starts.append(total)
        vec = 16 // elsize                               # elements per 16-byte vector
        aligned = all(r[0] % 16 == 0 and r[4] % vec == 0 and r[6] % vec == 0 for r in rows)
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        start = torch.tensor(starts, dtype=torch.int64).to(device)
        kmax = max(r[5] for r in rows)
        use_dot = kmax >= _MIN_DOT_K
        block_k = min(64, triton.next_power_of_2(kmax)) if use_dot else _MIN_DOT_K
        _lowrank_update_kernel[(total,)](
            table, start, len(rows), float(scale),
            W_DTYPE=_WEIGHT_DTYPES[dtype], NCOL=_NCOL,
            SEARCH_STEPS=max(1, math.ceil(math.log2(len(rows) + 1))),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=block_k, USE_DOT=use_dot,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32x3",
            ALIGN=vec if aligned else 1, num_warps=4)
