"""What checking a patch on image files costs: ``evaluate`` before and after, as two passes (the images
decoded twice) against ``evaluate_patches`` (each batch decoded once and scored in both states).

    python bench/bench_evaluate.py --model ViT-B-32 --files 1024
    python bench/bench_evaluate.py --model proving-ground --files 2048

``--files`` JPEG files (smooth random images, 320×256, quality 90) written to a temporary folder and
read as the command line's ``evaluate --images`` reads them (``ImageFiles`` with the model's own
preprocess), over 4 classes × 2 domains; the patch is a class redirect computed on the model (random
weights for the open_clip architectures: the mechanics and the time, not the quality). Rows, in one
run: decoding alone (one pass over the files) in one thread and in ``ImageFiles``' default threads; the
two-pass baseline (decoding in one thread, as before ``evaluate_patches`` and the threads); and
``evaluate_patches`` with one decoding thread and with the default. Each the median of ``--reps`` runs
taken in turn, and the ratios to the baseline.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from clipforget_fast import ForgetConfig, ForgetSpec, ImageFiles, evaluate, evaluate_patches, forget  # noqa: E402
from clipforget_fast.images import default_workers  # noqa: E402
from clipforget_fast.layers import image_geometry  # noqa: E402

CLASSES = ["fish", "house", "star", "crescent_moon"]
DOMAINS = ["photo", "sketch"]


def load(name: str, device: str):
    if name == "proving-ground":
        from clipforget_fast import proving_ground as pg

        model, tokenizer, preprocess = pg.load()
    else:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(name)
    return model.to(device).eval(), tokenizer, preprocess


def write_files(root: Path, n: int) -> list[Path]:
    """``n`` JPEG files of smooth random content (upsampled noise), 320×256."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    files = []
    for k in range(n):
        small = torch.rand(1, 3, 20, 16, generator=gen)
        img = torch.nn.functional.interpolate(small, size=(256, 320), mode="bilinear", align_corners=False)[0]
        arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        f = root / f"{k:05d}.jpg"
        Image.fromarray(arr).save(f, quality=90)
        files.append(f)
    return files


def timed(fns: list, reps: int) -> list[tuple[float, object]]:
    """(median seconds, last result) of each of ``fns``, run in turn ``reps`` times (interleaved, so a
    drift of the machine's speed falls on every one alike)."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs)]


def geometry_preprocess(model):
    """A preprocess for a model without its own: resize the short side, center-crop to the tower's input
    size, normalize by its pixel statistics (``layers.image_geometry``)."""
    from torchvision import transforms

    (H, W), mean, std = image_geometry(model)
    return transforms.Compose([transforms.Resize(min(H, W)), transforms.CenterCrop((H, W)), transforms.ToTensor(),
                               transforms.Normalize(mean.tolist(), std.tolist())])


def compare(model, tokenizer, preprocess, n_files: int, batch_size: int, reps: int, device) -> dict:
    """The rows of the table (name, median seconds), the default decoding threads, and whether the three
    ways gave the same matrices: ``n_files`` JPEG files written to a temporary folder, a class-redirect
    patch computed on ``model``."""
    spec = ForgetSpec(CLASSES, DOMAINS, forget_classes=["fish"])
    patch = forget(model, tokenizer, spec, ForgetConfig(edit="class-redirect", device=str(device)))
    ci = torch.arange(n_files) % len(CLASSES)
    di = (torch.arange(n_files) // len(CLASSES)) % len(DOMAINS)
    kw = dict(classes=CLASSES, domains=DOMAINS, batch_size=batch_size)
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), n_files)
        serial, threaded = ImageFiles(files, preprocess, workers=1), ImageFiles(files, preprocess)

        def decode(images):
            def run():
                for i in range(0, len(images), batch_size):
                    images[i:i + batch_size]
            return run

        def two_passes(images):
            def run():
                before = evaluate(model, tokenizer, images, ci, di, **kw)
                with patch.applied(model):
                    after = evaluate(model, tokenizer, images, ci, di, **kw)
                return before, after
            return run

        def one_pass(images):
            return lambda: evaluate_patches(model, tokenizer, patch, images, ci, di, **kw)

        rows = [("decoding alone, 1 thread", decode(serial)),
                (f"decoding alone, {workers} threads (`ImageFiles` default)", decode(threaded)),
                ("`evaluate` before and under `patch.applied` (decodes twice), 1 decoding thread", two_passes(serial)),
                ("`evaluate_patches` (decodes once), 1 decoding thread", one_pass(serial)),
                (f"`evaluate_patches`, {workers} decoding threads (the command line's `evaluate --patch`)",
                 one_pass(threaded))]
        got = timed([fn for _, fn in rows], reps)
    results = [out for _, out in got[2:]]
    same = all(torch.equal(r[0].correct, results[0][0].correct) and torch.equal(r[1].correct, results[0][1].correct)
               for r in results)
    t = [sec for sec, _ in got]
    return {"rows": [(name, sec) for (name, _), sec in zip(rows, t)], "workers": workers, "same": same,
            "decode_threads_x": t[0] / t[1], "one_pass_x": t[2] / t[3], "one_pass_threads_x": t[2] / t[4],
            "decode_share": t[0] / t[2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="an open_clip architecture (random weights) or proving-ground")
    ap.add_argument("--files", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.files < 1 or args.reps < 1:
        ap.error("--files and --reps must be ≥ 1")
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    model, tokenizer, preprocess = load(args.model, args.device)
    r = compare(model, tokenizer, preprocess, args.files, args.batch_size, args.reps, args.device)
    lines = [f"{args.model}, {args.files} JPEG files (320×256) over {len(CLASSES)} classes × {len(DOMAINS)} domains, "
             f"batch {args.batch_size}, a class-redirect patch, device {args.device}, "
             f"{torch.get_num_threads()} torch threads; median of {args.reps}, taken in turn", "",
             "| pass | seconds | images/s |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.2f} | {args.files / sec:.0f} |" for name, sec in r["rows"]]
    lines += ["", f"decoding, {r['workers']} threads against 1: **{r['decode_threads_x']:.2f}×**; before and after, "
              f"the two passes against `evaluate_patches`: **{r['one_pass_x']:.2f}×** with 1 decoding thread, "
              f"**{r['one_pass_threads_x']:.2f}×** with {r['workers']}; one pass of decoding (1 thread) is "
              f"{100 * r['decode_share']:.0f} % of the two passes' time; the three give the same matrices: {r['same']}"]
    print("\n".join(lines))
    if not args.no_record:
        append_results(f"bench_evaluate {args.model}", lines)
    return 0 if r["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
