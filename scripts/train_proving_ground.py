"""Train the proving-ground CLIP contrastively on freshly rendered, captioned images (CPU).

Every step renders a balanced batch (`--per-cell` images of each of the 20 x 5 class/domain cells, new
seed per step) and captions each image with a random template naming its domain and class, sometimes
its colour. The loss is CLIP's symmetric InfoNCE with multiple positives: captions of the same
(class, domain) cell count as matches (target spread uniformly over them), so the batch supplies hard
negatives of the same class in every other domain. AdamW, linear warmup then cosine decay, learnable
logit scale started at 30 (config `init_logit_scale`), clamped at 100 as in CLIP.

Held-out accuracy (render seeds >= 10**6, never used for training) is logged every `--eval-every`
steps as JSON lines, and the fp16 checkpoint is rewritten each time, so a usable model exists early.

    python scripts/train_proving_ground.py --steps 4500 --threads 1 --out clipforget_fast/proving_ground/weights

`--evaluate N` instead measures the checkpoint `--out` on N fresh renders per cell (seed FINAL_SEED)
and prints the accuracy table of the model card.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipforget_fast.proving_ground import metrics  # noqa: E402
from clipforget_fast.proving_ground.model import (POOL_TYPES, WEIGHTS_PATH, build_model,  # noqa: E402
                                                  checkpoint_pool_type, checkpoint_vision_layers,
                                                  get_tokenizer)
from clipforget_fast.proving_ground.render import (CLASS_PHRASES, CLASSES, COLOUR_NAMES,  # noqa: E402
                                                   DOMAIN_PHRASES, DOMAINS, render, render_raw,
                                                   to_model_input)

EVAL_SEED = 10 ** 6  # evaluation renders use seeds from here on; training seeds stay below
FINAL_SEED = 2 * 10 ** 6  # the model card's table; distinct from the seed monitored during training

TEMPLATES = (
    "a {d} of a {c}.",
    "a {d} of a {k} {c}.",
    "a {d} showing a {c}.",
    "a {c} in a {d}.",
    "a {k} {c}, {d}.",
    "this {d} shows a {c}.",
    "a {d} of the {c}.",
    "{c}, {d}.",
)


def captions(cls, dom, col, rng):
    """One caption per image from a random template; about a third of templates name the colour."""
    out = []
    for c, d, k in zip(cls, dom, col):
        t = TEMPLATES[rng.integers(len(TEMPLATES))]
        out.append(t.format(c=CLASS_PHRASES[CLASSES[c]], d=DOMAIN_PHRASES[DOMAINS[d]], k=COLOUR_NAMES[k]))
    return out


def multi_positive_clip_loss(img, txt, cell, scale):
    """Symmetric InfoNCE; img, txt [B, E] normalized, cell [B] ids, pairs of equal cell are positives."""
    logits = scale * img @ txt.T                                   # [B, B]
    pos = (cell[:, None] == cell[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    li = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def lr_at(step, steps, warmup, peak, floor):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


def save(model, path):
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"pool_type": model.visual.pool_type, "vision_layers": str(len(model.visual.transformer.resblocks))}
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def report(weights, n_per_cell):
    """Markdown table of the three metrics per domain on fresh renders, for the model card."""
    from clipforget_fast.proving_ground.model import load
    model, tokenizer, _ = load(weights=weights)
    x, c, d = render(CLASSES, DOMAINS, n_per_cell, seed=FINAL_SEED)
    res = metrics.evaluate(model, tokenizer, x, c, d, CLASSES, DOMAINS)
    names = {"domain_aware": "domain-aware", "agnostic": "agnostic", "domain_discrimination":
             "domain discrimination"}
    print("| metric | " + " | ".join(DOMAINS) + " | all |")
    print("|---" * (len(DOMAINS) + 2) + "|")
    for k, label in names.items():
        cells = [f"{100 * res[k]['per_domain'][dom]:.1f}" for dom in DOMAINS]
        print(f"| {label} | " + " | ".join(cells) + f" | {100 * res[k]['overall']:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--per-cell", type=int, default=1, help="images per (class, domain) cell per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-5)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", choices=POOL_TYPES, default="tok",
                    help="what the image tower reads out: the class token, as OpenAI and LAION CLIP ViTs do (the "
                         "shipped model), or the mean of the patch tokens (the model shipped before it); recorded "
                         "in the checkpoint")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="the image tower's number of blocks (default: the config's, the shipped model's); "
                         "recorded in the checkpoint")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 was fastest on the shared 2-core training machine")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-per-cell", type=int, default=3)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log (default: stdout only)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint (a second stage with its own schedule)")
    ap.add_argument("--extra-domain", choices=DOMAINS, default=None,
                    help="add one more image of every class in this domain to each batch")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N",
                    help="only evaluate --out on N fresh renders per cell and print the table")
    args = ap.parse_args()
    if args.out.suffix != ".safetensors":
        args.out = args.out / WEIGHTS_PATH.name
    torch.set_num_threads(args.threads)
    if args.extra_domain is not None and args.steps > 50_000:
        raise ValueError("--extra-domain keeps its render seeds apart for at most 50,000 steps")
    if args.evaluate:
        report(args.out, args.evaluate)
        return
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = build_model(args.pool, args.vision_layers).train()
    if args.init is not None:
        init_pool = checkpoint_pool_type(args.init)
        if init_pool != args.pool:
            raise ValueError(f"--init {str(args.init)!r} was trained with pool_type {init_pool!r}, "
                             f"not --pool {args.pool!r}")
        init_layers = checkpoint_vision_layers(args.init)
        if init_layers != len(model.visual.transformer.resblocks):
            raise ValueError(f"--init {str(args.init)!r} has {init_layers} image blocks, "
                             f"not --vision-layers {len(model.visual.transformer.resblocks)}")
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
    tokenizer = get_tokenizer()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    ev_x, ev_c, ev_d = render(CLASSES, DOMAINS, args.eval_per_cell, seed=EVAL_SEED)
    log = open(args.log, "a") if args.log else None
    t0 = time.perf_counter()
    train_time = 0.0
    for step in range(args.steps):
        ts = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr, args.min_lr)
        raw, cls, dom, col = render_raw(CLASSES, DOMAINS, args.per_cell, seed=args.seed * 10 ** 5 + step)
        if args.extra_domain is not None:   # its own seed range, still below EVAL_SEED
            xr, xc, _, xk = render_raw(CLASSES, [args.extra_domain], 1,
                                       seed=args.seed * 10 ** 5 + 50_000 + step)
            raw = np.concatenate([raw, xr])
            cls = np.concatenate([cls, xc])
            dom = np.concatenate([dom, np.full_like(xc, DOMAINS.index(args.extra_domain))])
            col = np.concatenate([col, xk])
        x = to_model_input(raw)
        tokens = tokenizer(captions(cls, dom, col, rng))
        img, txt, scale = model(x, tokens)
        loss = multi_positive_clip_loss(img, txt, torch.from_numpy(cls * len(DOMAINS) + dom), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        train_time += time.perf_counter() - ts
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            res = metrics.evaluate(model, tokenizer, ev_x, ev_c, ev_d, CLASSES, DOMAINS)
            model.train()
            rec = {"step": step + 1, "loss": round(loss.item(), 4), "scale": round(scale.item(), 2),
                   "train_s": round(train_time, 1), "wall_s": round(time.perf_counter() - t0, 1)}
            for k, v in res.items():
                rec[k] = round(v["overall"], 4)
                rec[k + "_per_domain"] = {d: round(a, 4) for d, a in v["per_domain"].items()}
            line = json.dumps(rec)
            print(line, flush=True)
            if log:
                log.write(line + "\n")
                log.flush()
            save(model, args.out)
        elif step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} scale {scale.item():.1f} "
                  f"{train_time / (step + 1):.2f}s/step", flush=True)


if __name__ == "__main__":
    main()
