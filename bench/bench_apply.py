"""Benchmark (c): the multi-layer apply ``W_l += scale · L_l R_lᵀ`` over every 2-D weight of a CLIP
(all linear layers, the fused attention in-projections and both projections; ViT-H-14 by default,
random weights), rank k = 32, against the copy bandwidth measured over the same tensors in the same
run (``w.copy_(w2)``: each weight read once and written once, the floor of DESIGN §3).

Candidates: ``dispatch.lowrank_update_`` (Triton on CUDA, the torch reference on CPU), the C++ CPU
kernel (CPU only, when it builds), and a naive per-layer torch loop with full-size fp32 temporaries.
Effective GB/s counts 2 × the bytes of each weight (one read, one write). Appends to bench/RESULTS.md.

    python bench/bench_apply.py [--model ViT-H-14] [--rank 32] [--dtypes float32,bfloat16,float16]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, fmt_time, machine, measure, peak_memory  # noqa: E402

SCALE = 1e-3   # small, so repeated timed applications leave the weights near their start


def model_weights(name: str) -> list[torch.Tensor]:
    """Every 2-D weight of open_clip ``name`` with random init, fp32 on CPU (embeddings excluded)."""
    try:
        import open_clip
    except ImportError as err:
        raise SystemExit(f"bench_apply needs open_clip_torch ({err})") from err
    model = open_clip.create_model(name, pretrained=None)
    return [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n]


def per_layer_loop(weights, lefts, rights, scale=1.0):
    """The plain torch baseline: one full-size fp32 temporary per layer."""
    for w, a, b in zip(weights, lefts, rights):
        w.copy_(torch.addmm(w.float(), a, b.t(), alpha=scale))


def copy_all(dst, src):
    for d, s in zip(dst, src):
        d.copy_(s)


def run(weights32, rank: int, dtype: torch.dtype, device: torch.device, reps: int) -> tuple[list, dict]:
    from clipforget_fast import dispatch

    gen = torch.Generator().manual_seed(0)
    ws = [w.to(device=device, dtype=dtype, copy=True) for w in weights32]
    src = [w.clone() for w in ws]
    lefts = [torch.randn(w.shape[0], rank, generator=gen).to(device) for w in ws]
    rights = [torch.randn(w.shape[1], rank, generator=gen).to(device) for w in ws]
    nbytes = 2 * sum(w.numel() * w.element_size() for w in ws)
    cands = {"copy (floor)": lambda: copy_all(ws, src),
             f"dispatch ({dispatch.backend_for(ws[0])})": lambda: dispatch.lowrank_update_(ws, lefts, rights, SCALE),
             "per-layer torch loop": lambda: per_layer_loop(ws, lefts, rights, SCALE)}
    if device.type == "cpu":
        from clipforget_fast import _cpp

        mod = _cpp.load()
        if mod is not None:
            cands["C++ kernel"] = lambda: mod.lowrank_update_(ws, lefts, rights, SCALE)
    stats = {}
    for label, fn in cands.items():
        gc.collect()
        peak = peak_memory(fn, device=device)               # doubles as the warm-up run
        t = measure(fn, reps=reps, warmup=0, device=device)
        t["peak_bytes"] = peak
        stats[label] = t
    copy_t = stats["copy (floor)"]["median"]
    loop_t = stats["per-layer torch loop"]["median"]
    rows = []
    for label, t in stats.items():
        gbs = nbytes / t["median"] / 1e9
        rows.append([str(dtype).replace("torch.", ""), label, fmt_time(t), f"{gbs:.1f}",
                     f"{100 * copy_t / t['median']:.0f}%", f"{loop_t / t['median']:.2f}×",
                     f"{t['peak_bytes'] / 2**20:.0f}"])
    summary = {"layers": len(ws), "weight_bytes": nbytes // 2, "stats": stats}
    del ws, src, lefts, rights
    gc.collect()
    return rows, summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-H-14", help="open_clip architecture (random weights)")
    ap.add_argument("--rank", type=int, default=32, help="k of every layer's update")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="weight dtypes, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per candidate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights32 = model_weights(args.model)
    head = ["dtype", "candidate", "time (median ±half-spread)", "GB/s", "% of copy", "vs per-layer", "peak extra MiB"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(f"{args.model}: {len(weights32)} weights, {sum(w.numel() for w in weights32) / 1e6:.0f} M "
          f"elements, rank {args.rank}, {machine()}")
    print(" | ".join(head))
    for name in args.dtypes.split(","):
        rows, _ = run(weights32, args.rank, getattr(torch, name.strip()), device, args.reps)
        for r in rows:
            print(" | ".join(r))
            table.append("| " + " | ".join(r) + " |")
    if not args.no_append:
        append_results(f"bench_apply: multi-layer apply, {args.model}, rank {args.rank}",
                       [f"{len(weights32)} weights, {sum(w.numel() for w in weights32) / 1e6:.0f} M "
                        "elements; GB/s counts each weight read once and written once; peak extra "
                        "memory sampled from RSS on CPU, the allocator's peak on CUDA.", ""] + table)


if __name__ == "__main__":
    main()
