"""End-to-end edit benchmark on a real open_clip architecture with random weights.

    python bench/bench_e2e.py --model ViT-B-32 --classes 10 --domains 5 --protos 1 --steps 5
    python bench/bench_e2e.py --model ViT-B-32 --family hf     # the same network as a transformers CLIPModel
    python bench/bench_e2e.py --mode domain --edit auto        # what a default call runs: here the domain gate
    python bench/bench_e2e.py --mode domain --edit auto --again   # and two requests on one bank

Times every stage of ``forget`` (with ``--edit project``, the default here: prompts, synthesis, capture,
nullspace; the class redirect and the domain gate have their own stages); the first ``apply`` (which
checks a SHA-256 of every targeted weight) and its ``revert``, once each; and an apply+revert pair with
``force=True`` (no hashing: the update itself and its host work), median of 5. Reports the process's
peak resident memory over the model's own. Random weights: synthesis acceptance means nothing here
(that is measured on the proving ground); mechanics, time and memory do.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, fmt_time, hf_model, measure  # noqa: E402

import open_clip  # noqa: E402

from clipforget_fast import ForgetConfig, ForgetSpec, forget, synthesize_prototypes  # noqa: E402

CLASSES = ["dog", "cat", "car", "tree", "house", "fish", "boat", "cup", "key", "star",
           "bird", "horse", "chair", "lamp", "clock", "shoe", "bottle", "flower", "apple", "train"]
DOMAINS = ["photo", "sketch", "cartoon", "painting", "pixel_art", "clipart", "infograph", "quickdraw"]
MODES = ("global", "domain", "domain-complete")
EDITS = ("project", "auto", "class-redirect", "domain-gate")


def request(mode: str, classes: int, domains: int, which: int = 0) -> ForgetSpec:
    """The benchmark's request: the first class (or the ``which``-th) everywhere (global), in the second
    domain (domain), or every class in the second domain (domain-complete)."""
    if mode != "global" and domains < 2:
        raise SystemExit(f"--mode {mode} needs --domains ≥ 2 (one forgotten, one kept)")
    fc = None if mode == "domain-complete" else CLASSES[which:which + 1]
    fd = None if mode == "global" else DOMAINS[1:2]
    return ForgetSpec(CLASSES[:classes], DOMAINS[:domains], forget_classes=fc, forget_domains=fd)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20    # ru_maxrss is KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--domains", type=int, default=5)
    ap.add_argument("--protos", type=int, default=1, help="prototypes per cell")
    ap.add_argument("--steps", type=int, default=5, help="synthesis steps (fixed: accept_prob=1)")
    ap.add_argument("--targets", default="proj+mlp")
    ap.add_argument("--mode", choices=MODES, default="global",
                    help="the request: the first class everywhere, the first class in the second domain, or every "
                         "class in the second domain")
    ap.add_argument("--edit", choices=EDITS, default="project",
                    help="ForgetConfig.edit (project: every stage of the nullspace edit; auto: what the library "
                         "picks for the request, as a default call does)")
    ap.add_argument("--family", choices=("open_clip", "hf"), default="open_clip",
                    help="hf: the same architecture as a transformers CLIPModel (open_clip's tokenizer: same ids)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--again", action="store_true",
                    help="then two requests on one bank synthesized once, as a pipeline serving several does: the "
                         "first class, then the second (the same forgotten domain): both forget() times")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    t = time.perf_counter()
    model = (hf_model(open_clip.get_model_config(args.model)) if args.family == "hf"
             else open_clip.create_model(args.model, pretrained=None))
    model = model.to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    build_s = time.perf_counter() - t
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2 ** 30
    else:
        base_mem = peak_rss_gb()
    spec = request(args.mode, args.classes, args.domains)
    config = ForgetConfig(prototypes_per_cell=args.protos, steps=args.steps, accept_prob=1.0,
                          targets=args.targets, batch_size=64, edit=args.edit)
    n_img = len(spec.cells) * args.protos
    t = time.perf_counter()
    patch = forget(model, tokenizer, spec, config)
    total = time.perf_counter() - t
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    patch.apply(model)                 # hashes every targeted weight; then the weights carry a mark
    sync()
    apply_s = time.perf_counter() - t
    t = time.perf_counter()
    patch.revert(model)
    sync()
    revert_s = time.perf_counter() - t
    pair = measure(lambda: (patch.apply(model, force=True), patch.revert(model, force=True)), reps=5,
                   device=args.device)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30) if args.device == "cuda" else peak_rss_gb()
    again = []
    if args.again:
        t = time.perf_counter()
        bank = synthesize_prototypes(model, tokenizer, spec, config)
        sync()
        runs = [f"bank {time.perf_counter() - t:.2f} s"]
        for which in (0, 1):
            t = time.perf_counter()
            p = forget(model, tokenizer, request(args.mode, args.classes, args.domains, which), config, prototypes=bank)
            sync()
            reused = p.info.get("translations_reused")
            runs.append(f"forget() {time.perf_counter() - t:.2f} s"
                        + ("" if reused is None else f" (translations {'reused' if reused else 'computed'})"))
        what = "every class" if args.mode == "domain-complete" else f"{CLASSES[0]}, then {CLASSES[1]}"
        again = ["", f"one bank for two requests ({what}, {args.mode}): " + "; ".join(runs)]

    tm = patch.timings
    targets = f", targets `{args.targets}`" if patch.info["edit"] == "project" else ""
    synthesized = "synthesis" in tm           # the class redirect reads no prototypes
    protos = f"{n_img} prototypes × {args.steps} steps" if synthesized else "no prototypes"
    if "translate" in tm:
        protos += f", translated {config.gate_translate_steps} steps"
    rows = [
        f"{args.model} ({'transformers CLIPModel, ' if args.family == 'hf' else ''}random weights), {len(spec.classes)} classes × {len(spec.domains)} domains, "
        f"{protos}, {args.mode} request, edit `{args.edit}` → "
        f"`{patch.info['edit']}` ({len(patch.entries)} layers{targets}), device {args.device}",
        "",
        "| stage | seconds |",
        "|---|---|",
        f"| build model | {build_s:.2f} |",
        *(f"| {k} | {v:.2f} |" for k, v in tm.items()),
        f"| forget() total | {total:.2f} |",
        f"| apply, first (SHA-256 check of every targeted weight) | {apply_s:.3f} |",
        f"| revert | {revert_s:.3f} |",
        f"| apply + revert, force=True (median ± half the spread) | {fmt_time(pair)} |",
        "",
        (f"synthesis: {n_img * args.steps / tm['synthesis']:.3g} image-steps/s; " if synthesized else "") +
        f"memory: {'GPU allocated' if args.device == 'cuda' else 'peak RSS'} {base_mem:.2f} GB with the model, "
        f"{peak:.2f} GB peak during the edit (+{peak - base_mem:.2f} GB)",
        *again,
    ]
    print("\n".join(rows))
    if not args.no_record:
        what = "" if (args.mode, args.edit) == ("global", "project") else f", {args.mode}, {patch.info['edit']}"
        append_results(f"bench_e2e {args.model}{' (HF)' if args.family == 'hf' else ''}{what}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
