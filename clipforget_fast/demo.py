"""The demo behind `make demo`: two edits of the proving-ground model, before/after accuracy.

    python -m clipforget_fast.demo --out results/demo

Loads the embedded proving-ground CLIP (DESIGN §5), renders held-out images with a seed the
model never saw, then (1) forgets one class everywhere and (2) forgets one class in one domain only.
For each it prints the accuracy matrix (classes × domains) before and after, saves the patch, and
writes a before/after heatmap PNG into the output folder.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import ForgetConfig, ForgetSpec, evaluate, forget, synthesize_prototypes
from . import proving_ground as pg

HELD_OUT_SEED = 2_000_001  # render seed used by nothing else: training uses < 10**5, its own evaluation 10**6


def describe(cells) -> str:
    """'fish × photo, sketch' for a product of classes and domains, else the cells themselves."""
    cls = sorted({c for c, _ in cells})
    doms = sorted({d for _, d in cells})
    if len(cls) * len(doms) == len(cells):
        return f"{', '.join(cls)} × {', '.join(doms)}"
    return ", ".join(f"{c}/{d}" for c, d in sorted(cells))


def heatmap(path: Path, title: str, before, after, classes, domains) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 0.32 * len(classes) + 2), constrained_layout=True)
    for ax, acc, name in zip(axes, (before, after), ("before", "after")):
        im = ax.imshow(acc.accuracy.numpy() * 100, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(f"{name}: mean {100 * acc.mean():.1f}%")
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes if ax is axes[0] else [""] * len(classes))
    fig.colorbar(im, ax=axes, label="zero-shot top-1 accuracy (%)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive_int(text: str) -> int:
    """An argparse type: an int ≥ 1 (argparse names the flag and the value otherwise)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be ≥ 1")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/demo", help="folder for the heatmaps and patches")
    ap.add_argument("--per-cell", type=positive_int, default=12, help="held-out images rendered per cell (≥ 1)")
    ap.add_argument("--forget-class", default="fish", help="class forgotten in every domain")
    ap.add_argument("--domain-class", default="house", help="class forgotten in one domain only")
    ap.add_argument("--domain", default="sketch", help="the domain of the second edit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = pg.load()
    classes, domains = list(pg.CLASSES), list(pg.DOMAINS)
    for name in (args.forget_class, args.domain_class):
        if name not in classes:
            raise SystemExit(f"--forget-class/--domain-class: unknown class {name!r}; one of {classes}")
    if args.domain not in domains:
        raise SystemExit(f"--domain: unknown domain {args.domain!r}; one of {domains}")
    print(f"proving-ground model: {pg.MODEL_NAME}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, {len(classes)} classes × {len(domains)} domains")
    images, ci, di = pg.render(classes, domains, args.per_cell, seed=HELD_OUT_SEED)
    ev = dict(classes=classes, domains=domains, domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)
    before = evaluate(model, tokenizer, images, ci, di, **ev)
    print(f"\nbefore any edit (held-out renders, {args.per_cell} per cell; chance {100 * before.chance:.0f}%):")
    print(before.table())

    # the default config for both: edit="auto" takes the class redirect for the global request (it meets
    # the global targets on this model) and the domain gate for the domain request (the model has its
    # site, and there are prototypes); README, "Quality status and the defaults"
    config = ForgetConfig()
    requests = [
        ("global", ForgetSpec(classes, domains, forget_classes=[args.forget_class],
                              domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)),
        ("domain", ForgetSpec(classes, domains, forget_classes=[args.domain_class], forget_domains=[args.domain],
                              domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)),
    ]
    # the domain request needs prototypes of every cell of the vocabulary; made once, reusable
    t0 = time.perf_counter()
    bank = synthesize_prototypes(model, tokenizer, requests[0][1], config)
    st = bank.stats
    print(f"\nsynthesized {st['prototypes']} prototypes in {time.perf_counter() - t0:.1f} s: "
          f"{st['accepted']} accepted at p ≥ {config.accept_prob}, {st['mean_steps_to_accept'] or float('nan'):.0f} steps on average")
    for tag, spec in requests:
        t0 = time.perf_counter()
        patch = forget(model, tokenizer, spec, config, prototypes=bank)
        secs = time.perf_counter() - t0
        patch.apply(model)
        after = evaluate(model, tokenizer, images, ci, di, **ev)
        patch.revert(model)
        what = sorted(spec.forget_cells)
        print(f"\n[{tag}] forget {len(what)} cell(s), {describe(what)}, edit={patch.info['edit']!r}: "
              f"edit in {secs:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in patch.timings.items())}); {patch}")
        print(after.table())
        print(f"forgotten cells: {100 * before.forget_accuracy(spec):.1f}% → {100 * after.forget_accuracy(spec):.1f}%"
              f"   kept cells: {100 * before.retain_accuracy(spec):.1f}% → {100 * after.retain_accuracy(spec):.1f}%")
        same = [(c, d) for c in {c for c, _ in what} for d in domains if (c, d) not in spec.forget_cells]
        if same:
            print(f"  among the kept cells, the same class in the other domains: {100 * before.cell_mean(same):.1f}% → "
                  f"{100 * after.cell_mean(same):.1f}%")
        png = out / f"{tag}_heatmap.png"
        heatmap(png, f"{tag}: forget {describe(what)}", before, after, classes, domains)
        saved = patch.save(out / f"{tag}_patch.safetensors")
        print(f"wrote {png} and {saved}")
    print(f"\nresults in {out.resolve()}")
    print("note: on this model the default edit meets the global targets on 3 of 3 requests measured, the "
          "domain targets on 5 of 9 and the domain-complete targets on 4 of 8 (README, 'Quality status and "
          "the defaults'; bench/RESULTS.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
