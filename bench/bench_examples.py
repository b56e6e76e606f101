"""What real domain examples cost the domain gate: the time of ``forget`` with and without them, and
the memory of reading them.

    python bench/bench_examples.py --model ViT-B-32 --examples 1000

One request (every class @ sketch: the domain gate) on a real open_clip architecture with random
weights, a small prototype bank (the mechanics, not the quality: that is bench/quality.py's), first
without examples (the baseline, in the same run), then with ``--examples`` images held by the caller in
fp32 on the CPU. Then the memory of reading the examples at the gate's site as ``forget`` does
(``gate.site_read`` over ``ImageRows`` of the caller's tensors, a batch at a time) for a quarter, half and
all of them, against reading them from one concatenated fp32 copy (what a single tensor on the model's
device costs; CPU: the resident set's peak over its start, sampled; CUDA: the allocator's peak).
With ``--files N`` (0: skipped), N examples written as PNG files and read as the command line reads
``--domain-examples`` (``ImageFiles``: decoded a batch at a time as the gate reads them), against
decoding them all into one tensor first (``read_images``) and reading that: the peak memory and the
seconds of each.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, peak_memory  # noqa: E402

import open_clip  # noqa: E402

from clipforget_fast import ForgetConfig, ForgetSpec, ImageFiles, forget, gate, read_images  # noqa: E402
from clipforget_fast.layers import gate_site, image_geometry  # noqa: E402

CLASSES = ["dog", "cat", "car", "tree"]
DOMAINS = ["photo", "sketch", "cartoon"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--examples", type=int, default=1000, help="real examples in all, split over the domains")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--files", type=int, default=256, help="examples read from PNG files (0: skip that part)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.examples < len(DOMAINS):
        ap.error(f"--examples {args.examples}: at least one per domain ({len(DOMAINS)})")
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    (H, W), _, _ = image_geometry(model)
    spec = ForgetSpec(CLASSES, DOMAINS, forget_domains=["sketch"])
    config = ForgetConfig(prototypes_per_cell=1, steps=2, accept_prob=1.0, gate_translate_steps=2,
                          batch_size=args.batch_size, edit="domain-gate", device=args.device)
    gen = torch.Generator().manual_seed(1)
    share = [len(x) for x in torch.arange(args.examples).tensor_split(len(DOMAINS))]
    examples = {d: torch.randn(n, 3, H, W, generator=gen) for d, n in zip(DOMAINS, share)}
    size = sum(x.numel() * x.element_size() for x in examples.values())
    forget(model, tokenizer, spec, config.replace(self_check=False))          # warm-up (allocator, kernels)
    runs = {}
    for name, kw in (("without examples", {}), (f"with {args.examples} examples", {"domain_examples": examples})):
        t = time.perf_counter()
        patch = forget(model, tokenizer, spec, config, **kw)
        runs[name] = (time.perf_counter() - t, patch)
    assert patch.info["gate"]["examples"] == dict(zip(DOMAINS, share))
    site, dev = gate_site(model), torch.device(args.device)
    auto = dict(device_type=dev.type, enabled=False)
    parts = list(examples.values())

    def read(rows):
        return gate.site_read(model, site, rows, args.batch_size, auto, dev)

    reads = []
    for frac in (0.25, 0.5, 1.0):
        k = max(1, int(frac * args.examples))
        cut, left = [], k                          # the first k examples, as views of the caller's tensors
        for p in parts:
            if left:
                cut.append(p[:left])
                left -= len(cut[-1])
        reads.append((k, "batch at a time (the library)", peak_memory(lambda: read(gate.ImageRows(cut)), device=dev)))
    copy = peak_memory(lambda: read(torch.cat([p.to(dev, torch.float32) for p in parts])), device=dev)
    reads.append((args.examples, "one fp32 copy on the device", copy))
    from_files = files_read(args, read, H, W) if args.files else []
    rows = [f"{args.model} (random weights), every class @ sketch of {len(CLASSES)} classes × {len(DOMAINS)} "
            f"domains (domain gate; 1 prototype per cell, 2 steps, 2 translation steps), batch_size "
            f"{args.batch_size}, device {args.device}; the examples: {args.examples} images "
            f"{H}×{W} in fp32 on the CPU, {size / 2 ** 30:.2f} GiB",
            "",
            "| forget | seconds | examples read (s) |",
            "|---|---|---|"]
    for name, (secs, patch) in runs.items():
        rows.append(f"| {name} | {secs:.2f} | {patch.timings.get('examples', 0.0):.2f} |")
    rows += ["", "| examples read at the site | how | peak memory over its start (GiB) | their own size (GiB) |",
             "|---|---|---|---|"]
    for k, how, peak in reads:
        rows.append(f"| {k} | {how} | {peak / 2 ** 30:.3f} | {k * 3 * H * W * 4 / 2 ** 30:.3f} |")
    if from_files:
        rows += ["", f"| {args.files} examples from PNG files, read at the site | peak memory over its start (GiB) "
                 f"| seconds |", "|---|---|---|"]
        rows += [f"| {how} | {peak / 2 ** 30:.3f} | {secs:.2f} |" for how, peak, secs in from_files]
    print("\n".join(rows))
    if not args.no_record:
        append_results(f"bench_examples {args.model}", rows)
    return 0


def files_read(args, read, H: int, W: int) -> list:
    """(how, peak bytes, seconds) of reading ``args.files`` PNG examples at the site: decoded a batch at a
    time (``ImageFiles``, the command line's way) and decoded into one tensor first (``read_images``)."""
    import tempfile

    import numpy as np
    from PIL import Image

    mean = torch.tensor([0.481, 0.458, 0.408]).view(3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(3, 1, 1)

    def preprocess(im):                              # the images are already H × W: scale and normalize
        return (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - mean) / std

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(2)
        files = []
        for k in range(args.files):
            files.append(Path(tmp) / f"{k:05d}.png")
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(files[-1])
        for how, fn in (("decoded a batch at a time (ImageFiles, the command line)",
                         lambda: read(gate.ImageRows([ImageFiles(files, preprocess)]))),
                        ("decoded into one fp32 tensor first (read_images)",
                         lambda: read(read_images(files, preprocess)))):
            t = time.perf_counter()
            peak = peak_memory(fn)
            out.append((how, peak, time.perf_counter() - t))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
