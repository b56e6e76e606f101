"""What the key of a bank's kept translations costs: ``layers.image_tower_digest`` (SHA-256 of every byte
of the image tower's weights), first in one thread, then in the default threads, then memoized.

    python bench/bench_digest.py --model ViT-H-14 [--dtype bfloat16]

A real open_clip architecture with random weights. Each cold row clears the digest memo first (as a
tower whose every weight changed would find it); the median of ``--reps`` runs taken in turn.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

import open_clip  # noqa: E402

from clipforget_fast import layers  # noqa: E402
from clipforget_fast.images import default_workers  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-H-14")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    model = open_clip.create_model(args.model, pretrained=None).to(args.device, getattr(torch, args.dtype)).eval()
    tower = [p for n, p in model.named_parameters() if n.startswith(layers.IMAGE_PREFIXES)]
    nbytes = sum(p.numel() * p.element_size() for p in tower)
    workers = default_workers()

    def cold(w):
        def run():
            layers._DIGESTS._held.clear()
            return layers.image_tower_digest(model, workers=w)
        return run

    rows = [("cold, 1 thread", cold(1)), (f"cold, {workers} threads (the default)", cold(None)),
            ("memoized (an unchanged tower)", lambda: layers.image_tower_digest(model))]
    times = [[] for _ in rows]
    digests = set()
    for _ in range(args.reps):
        for k, (_, fn) in enumerate(rows):
            t = time.perf_counter()
            digests.add(fn())
            times[k].append(time.perf_counter() - t)
    t = [statistics.median(ts) for ts in times]
    lines = [f"{args.model} image tower ({len(tower)} tensors, {nbytes / 1e9:.2f} GB in {args.dtype}), device "
             f"{args.device}; median of {args.reps}, taken in turn", "",
             "| digest | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.3f} | {nbytes / sec / 1e9:.2f} |" for (name, _), sec in zip(rows[:2], t)]
    lines += [f"| {rows[2][0]} | {t[2]:.3f} | — |"]
    lines += ["", f"{workers} threads against 1: **{t[0] / t[1]:.2f}×**; every run gave the same digest: "
              f"{len(digests) == 1}"]
    print("\n".join(lines))
    if not args.no_record:
        append_results(f"bench_digest {args.model}", lines)
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
