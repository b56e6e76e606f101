"""One prototype-synthesis step for a whole batch, in two launches that each read the batch once.

The update of DESIGN §2.3 (Kravets & Namboodiri, WACV 2025, batched); torch twin and exact
semantics: ``reference.synth_update``. For prototype i, channel c, pixel (h, w):

    g(h, w)   = grad_in((h + dy_in) mod H, (w + dx_in) mod W)        # un-roll this step's jitter
    u(h, w)   = x(h, w) · (1 - lr·decay) - lr · g(h, w) / (rms_i + eps),   rms_i = sqrt(mean_i g²)
    v(h, w)   = Σ_{a,b ∈ {-1,0,1}} β_a β_b u(clampH(h+a), clampW(w+b))  if blur else u(h, w)
                (β = [1, 2, 1] / 4: the separable blur with replicated edges, as one 3×3 stencil)
    x_new     = clamp(v, lo[c], hi[c])  if active_i else x
    x_in_next((h + dy_out) mod H, (w + dx_out) mod W) = x_new(h, w)  # roll for the next step

Launch 1, ``_sumsq_kernel``, grid (N, SPLIT): program (i, s) sums g² over the s-th slice of
prototype i (the roll only permutes pixels, so grad_in is read as stored) and writes one partial
sum; inactive prototypes read nothing. Launch 2, ``_synth_update_kernel``, grid (N·C, tiles of
H×W): each program sums the SPLIT partials of its prototype (deterministic, no atomics), then
computes a BLOCK_H × BLOCK_W tile of x_new from x and grad_in, with the blur's neighbours
recomputed from their own x and grad (cache hits, not extra DRAM passes), and stores x_new and its
rolled copy. The norm couples every pixel of a prototype, hence two launches; each reads grad once
from DRAM and launch 2 reads x once, writing two outputs: the bytes floor of the step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUMSQ_BLOCK = 1024
_MAX_SPLIT = 16          # partial sums per prototype: enough programs to fill a GPU at N ≈ 50
GRAD_EPS = 1e-12         # as reference.GRAD_EPS


def _first_config_on_cpu(configs, named_args, **kwargs):
    """The interpreter (CPU tensors) cannot time configs; use the first one there."""
    return configs[:1] if named_args["x_ptr"].device.type == "cpu" else configs


@triton.jit
def _sumsq_kernel(g_ptr, act_ptr, partial_ptr, numel, chunk,
                  SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    item = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    active = tl.load(act_ptr + item) != 0
    begin = part * chunk
    end = tl.minimum(begin + chunk, numel)
    end = tl.where(active, end, begin)                 # inactive prototypes read nothing
    base = g_ptr + item * numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(begin, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        g = tl.load(base + idx, mask=idx < end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(partial_ptr + item * SPLIT + part, tl.sum(acc, axis=0))


@triton.autotune(
    configs=[triton.Config({"BLOCK_H": 16, "BLOCK_W": 32}, num_warps=4),
             triton.Config({"BLOCK_H": 8, "BLOCK_W": 64}, num_warps=4),
             triton.Config({"BLOCK_H": 32, "BLOCK_W": 32}, num_warps=8)],
    key=["H", "W", "BLUR"],
    prune_configs_by={"early_config_prune": _first_config_on_cpu},
)
@triton.jit
def _synth_update_kernel(x_ptr, g_ptr, act_ptr, lo_ptr, hi_ptr, partial_ptr, xnew_ptr, xnext_ptr,
                         C, H, W, in_dy, in_dx, out_dy, out_dx, keep, lr, inv_numel, eps,
                         SPLIT: tl.constexpr, BLUR: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_nc = tl.program_id(0).to(tl.int64)            # prototype · C + channel
    pid_t = tl.program_id(1)
    item = pid_nc // C
    chan = pid_nc % C
    tiles_w = tl.cdiv(W, BLOCK_W)
    h = (pid_t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]     # [BH, 1]
    w = (pid_t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]      # [1, BW]
    mask = (h < H) & (w < W)

    active = tl.load(act_ptr + item) != 0
    sumsq = tl.sum(tl.load(partial_ptr + item * SPLIT + tl.arange(0, SPLIT)), axis=0)
    coef = lr / (tl.sqrt(sumsq * inv_numel) + eps)     # lr / (rms + eps)
    gmask = mask & active                              # inactive: never read grad
    x_img = x_ptr + pid_nc * H * W
    g_img = g_ptr + pid_nc * H * W

    x0 = tl.load(x_img + h * W + w, mask=mask, other=0.0)
    if BLUR:
        v = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for a in tl.static_range(3):
            hh = tl.minimum(tl.maximum(h + (a - 1), 0), H - 1)
            hg = (hh + in_dy) % H
            for b in tl.static_range(3):
                ww = tl.minimum(tl.maximum(w + (b - 1), 0), W - 1)
                wg = (ww + in_dx) % W
                xv = tl.load(x_img + hh * W + ww, mask=mask, other=0.0)
                gv = tl.load(g_img + hg * W + wg, mask=gmask, other=0.0).to(tl.float32)
                weight = (2 - (a - 1) * (a - 1)) * (2 - (b - 1) * (b - 1)) * 0.0625
                v += weight * (xv * keep - coef * gv)
    else:
        gv = tl.load(g_img + ((h + in_dy) % H) * W + (w + in_dx) % W,
                     mask=gmask, other=0.0).to(tl.float32)
        v = x0 * keep - coef * gv
    v = tl.maximum(tl.minimum(v, tl.load(hi_ptr + chan)), tl.load(lo_ptr + chan))
    v = tl.where(active, v, x0)
    out_off = pid_nc * H * W
    tl.store(xnew_ptr + out_off + h * W + w, v, mask=mask)
    tl.store(xnext_ptr + out_off + ((h + out_dy) % H) * W + (w + out_dx) % W, v, mask=mask)


def synth_update_triton(x: torch.Tensor, grad_in: torch.Tensor, active: torch.Tensor, *, lr: float,
                        decay: float, lo: torch.Tensor, hi: torch.Tensor, in_shift: tuple[int, int],
                        out_shift: tuple[int, int], blur: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthesis step; same arguments and results as ``reference.synth_update``.

    x: [N, C, H, W] fp32; grad_in: [N, C, H, W] fp32/fp16/bf16; active: [N] bool;
    lo, hi: [C] (any float dtype, used as fp32). Returns (x_new, x_in_next), both [N, C, H, W] fp32.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"x.dtype is {x.dtype}; expected torch.float32")
    if grad_in.dtype not in _GRAD_DTYPES:
        raise TypeError(f"grad_in.dtype is {grad_in.dtype}; expected float32, float16 or bfloat16")
    if active.dtype != torch.bool:
        raise TypeError(f"active.dtype is {active.dtype}; expected torch.bool")
    if x.dim() != 4 or grad_in.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and grad_in {tuple(grad_in.shape)} must be the same "
                         "[N, C, H, W] shape")
    n, c, hgt, wid = x.shape
    if active.shape != (n,):
        raise ValueError(f"active has shape {tuple(active.shape)}; expected ({n},)")
    if lo.shape != (c,) or hi.shape != (c,):
        raise ValueError(f"lo {tuple(lo.shape)} and hi {tuple(hi.shape)} must have shape ({c},)")
    for name, t in (("grad_in", grad_in), ("active", active), ("lo", lo), ("hi", hi)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if len(in_shift) != 2 or len(out_shift) != 2:
        raise ValueError(f"in_shift {in_shift} and out_shift {out_shift} must be (dy, dx) pairs")
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format)
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return x_new, x_next
    x = x.contiguous()
    grad_in = grad_in.contiguous()
    act = active.to(torch.int8)
    lo = lo.to(torch.float32).contiguous()
    hi = hi.to(torch.float32).contiguous()
    numel = c * hgt * wid
    split = min(_MAX_SPLIT, triton.next_power_of_2(triton.cdiv(numel, _SUMSQ_BLOCK)))
    partial = torch.empty((n, split), dtype=torch.float32, device=x.device)
    _sumsq_kernel[(n, split)](grad_in, act, partial, numel, triton.cdiv(numel, split),
                              SPLIT=split, BLOCK=_SUMSQ_BLOCK, num_warps=4)
    grid = lambda meta: (n * c, triton.cdiv(hgt, meta["BLOCK_H"]) * triton.cdiv(wid, meta["BLOCK_W"]))
    _synth_update_kernel[grid](
        x, grad_in, act, lo, hi, partial, x_new, x_next,
        c, hgt, wid, in_shift[0] % hgt, in_shift[1] % wid, out_shift[0] % hgt, out_shift[1] % wid,
        1.0 - lr * decay, float(lr), 1.0 / numel, GRAD_EPS, SPLIT=split, BLUR=bool(blur))
    return x_new, x_next
