"""Batched prototype synthesis versus the one-prototype-at-a-time peer recipe (Kravets &
Namboodiri, WACV 2025): accepted prototypes per second, same model, same acceptance threshold.

    python bench/bench_synthesis.py [--cells 40] [--per-cell 4] [--baseline 12]

The baseline is a plain loop per prototype: randn start, jittered input, cross-entropy against every
cell's text embedding, RMS-normalized gradient step with L2 decay, a blur every n steps, clamp, stop
at p(target) ≥ threshold. The candidate is ``clipforget_fast.synthesis.synthesize`` (all prototypes
batched, per-item acceptance mask, fused update, compaction). Model: the proving-ground CLIP (real
acceptances), or ``--model NAME`` for an open_clip architecture with random weights.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from clipforget_fast import ForgetConfig, ForgetSpec  # noqa: E402
from clipforget_fast.layers import image_geometry  # noqa: E402
from clipforget_fast import reference  # noqa: E402
from clipforget_fast.synthesis import autocast_dtype, frozen, initial_noise, synthesize  # noqa: E402
from clipforget_fast.text import class_embeddings  # noqa: E402


def peer_one_at_a_time(model, cell_text, target, cfg: ForgetConfig, device) -> tuple[int, float]:
    """The peer recipe, one prototype after another, its encoder under the autocast ``synthesize`` uses
    (bf16 on CUDA); returns (accepted, seconds)."""
    device = torch.device(device)
    amp = autocast_dtype(cfg, device)
    (H, W), mean, std = image_geometry(model)
    lo, hi = ((0 - mean) / std).to(device), ((1 - mean) / std).to(device)
    keep = torch.ones(1, dtype=torch.bool, device=device)
    scale = float(model.logit_scale.detach().exp())
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    accepted = 0
    t0 = time.perf_counter()
    with frozen(model):
        for tgt in target.tolist():
            x = initial_noise(1, (H, W), lo, hi, gen)
            y = torch.tensor([tgt], device=device)
            for step in range(cfg.steps):
                dy, dx = rng.randint(-cfg.jitter, cfg.jitter), rng.randint(-cfg.jitter, cfg.jitter)
                xj = torch.roll(x, (dy, dx), dims=(2, 3)).requires_grad_(True)
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    feats = model.encode_image(xj)
                logits = scale * F.normalize(feats.float(), dim=-1) @ cell_text.t()
                if logits.softmax(-1)[0, tgt] >= cfg.accept_prob:
                    accepted += 1
                    break
                (g,) = torch.autograd.grad(F.cross_entropy(logits, y), xj)
                with torch.no_grad():                    # the same update math, one image at a time
                    x, _ = reference.synth_update(
                        x, g, keep, lr=cfg.step_size, decay=cfg.pixel_decay, lo=lo, hi=hi,
                        in_shift=(dy, dx), out_shift=(0, 0),
                        blur=bool(cfg.blur_every) and (step + 1) % cfg.blur_every == 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return accepted, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="open_clip architecture with random weights (default: proving ground)")
    ap.add_argument("--cells", type=int, default=40, help="cells (classes × domains) synthesized")
    ap.add_argument("--per-cell", type=int, default=4, help="prototypes per cell for the batched run")
    ap.add_argument("--baseline", type=int, default=12, help="prototypes the one-at-a-time baseline makes")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--accept", type=float, default=0.9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    if args.model:
        import open_clip

        model = open_clip.create_model(args.model, pretrained=None).to(args.device).eval()
        tok = open_clip.get_tokenizer(args.model)
        classes, domains = [f"object {i}" for i in range(20)], ["photo", "sketch", "cartoon", "painting", "pixel_art"]
        phrases, name = {}, f"{args.model} (random weights)"
    else:
        from clipforget_fast import proving_ground as pg

        model, tok, _ = pg.load(args.device)
        classes, domains, phrases, name = list(pg.CLASSES), list(pg.DOMAINS), pg.CLASS_PHRASES, "proving ground"
    spec = ForgetSpec(classes, domains, forget_classes=classes[:1], class_phrases=phrases)
    cells = spec.cells[:args.cells]
    cell_text = class_embeddings(model, tok, [spec.prompts(c) for c in cells], args.device)
    cfg = ForgetConfig(steps=args.steps, accept_prob=args.accept, batch_size=256)
    target = torch.arange(len(cells), device=args.device).repeat_interleave(args.per_cell)
    # untimed warm-up of both paths (CUDA and cuBLAS start-up, the Triton kernel's compile and autotune,
    # a blurring step included)
    warm = cfg.replace(steps=max(2, cfg.blur_every), accept_prob=1.0)
    synthesize(model, cell_text, target[:2], warm, args.device)
    peer_one_at_a_time(model, cell_text, target[:1], warm, args.device)
    res = synthesize(model, cell_text, target, cfg, args.device)
    b_acc, b_s = int(res.accepted.sum()), res.seconds
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[:args.baseline]
    p_acc, p_s = peer_one_at_a_time(model, cell_text, target[order], cfg, args.device)
    b_rate, p_rate = b_acc / b_s, p_acc / p_s
    lines = [f"{name}, {len(cells)} cells, threshold p ≥ {args.accept}, ≤ {args.steps} steps, device {args.device}", "",
             "| run | prototypes | accepted | seconds | accepted/s |", "|---|---|---|---|---|",
             f"| batched (synthesize) | {len(target)} | {b_acc} | {b_s:.1f} | {b_rate:.2f} |",
             f"| one at a time (peer recipe) | {args.baseline} | {p_acc} | {p_s:.1f} | {p_rate:.3f} |", "",
             f"speed-up in accepted prototypes per second: {b_rate / p_rate:.1f}×" if p_rate > 0 else
             "speed-up: the baseline accepted none"]
    print("\n".join(lines))
    if not args.no_record:
        append_results("bench_synthesis: batched vs one at a time", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
