"""forget() on one process against the same call shared by several (torchrun: NCCL with one GPU per process,
else gloo on the CPU).

    python bench/bench_distributed.py [--nproc 2] [--threads 1] [--request domain-complete] [--per-cell 4]
                                      [--edit project|domain-gate]

Runs, each in fresh processes and in this order: one process with ``--threads`` threads, one process with
``nproc × threads`` threads (the same cores as the shared run), and ``--nproc`` processes with ``--threads``
threads each, launched with ``torch.distributed.run``. The model is the proving ground, the request is
one of bench/quality.py's (``edit="project"`` by default, so that every prototype is synthesized and
captured; ``--edit domain-gate`` for the gate, whose prototypes are also translated between domains);
prints forget()'s wall time and per-stage timings of each run, the ratios against the first two, and the
largest difference between the runs' weight changes ΔW = ABᵀ (relative to the one-process patch). Every run
uses the same device: the GPUs where there is one per process (``--nproc`` of them), else the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUESTS = {"domain-complete": ("domain-complete", None, ["sketch"]),
            "domain": ("domain", ["house"], ["sketch"]),
            "global": ("global", ["fish"], None)}


def placement(nproc: int) -> tuple[str, str]:
    """(device, process-group backend) for ``nproc`` processes: NCCL with a GPU of its own per process,
    else gloo on the CPU (NCCL refuses two ranks on one GPU, and a rank's GPU must exist)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= nproc:
        return "cuda", "nccl"
    return "cpu", "gloo"


def worker(args) -> None:
    import torch.distributed as dist

    from clipforget_fast import ForgetConfig, ForgetSpec, forget
    from clipforget_fast import proving_ground as pg

    torch.set_num_threads(args.threads)
    device = args.device
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, tok, _ = pg.load()
    model = model.to(device)
    mode, fc, fd = REQUESTS[args.request]
    spec = ForgetSpec(list(pg.CLASSES), list(pg.DOMAINS), forget_classes=fc, forget_domains=fd,
                      domain_phrases=pg.DOMAIN_PHRASES, class_phrases=pg.CLASS_PHRASES)
    cfg = ForgetConfig(edit=args.edit, prototypes_per_cell=args.per_cell, batch_size=args.batch_size)
    if dist.is_initialized():
        dist.barrier()
    t = time.perf_counter()
    patch = forget(model, tok, spec, cfg)
    seconds = time.perf_counter() - t
    if rank == 0:
        patch.save(Path(args.out) / "patch.safetensors")
        (Path(args.out) / "run.json").write_text(json.dumps(
            {"seconds": seconds, "timings": patch.timings, "world_size": patch.info["world_size"],
             "synthesis": patch.info.get("synthesis")}))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(args, nproc: int, threads: int, out: Path) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--request", args.request,
          "--per-cell", str(args.per_cell), "--batch-size", str(args.batch_size), "--edit", args.edit,
          "--device", args.device, "--out", str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + me
           if nproc > 1 else [sys.executable] + me)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    from clipforget_fast import Patch

    return dict(json.loads((out / "run.json").read_text()), patch=Patch.load(out / "patch.safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--request", choices=sorted(REQUESTS), default="domain-complete")
    ap.add_argument("--per-cell", type=int, default=4, help="prototypes per cell")
    ap.add_argument("--batch-size", type=int, default=100, help="ForgetConfig.batch_size")
    ap.add_argument("--edit", choices=("project", "domain-gate"), default="project", help="ForgetConfig.edit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.device, backend = placement(args.nproc)
    if args.device == "cpu" and torch.cuda.is_available():
        print(f"{torch.cuda.device_count()} GPU(s) for {args.nproc} processes: every run on the CPU, "
              f"{args.nproc} processes with gloo", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, nproc, threads in ((f"1 process × {args.threads} thread(s)", 1, args.threads),
                                      (f"1 process × {args.nproc * args.threads} threads", 1, args.nproc * args.threads),
                                      (f"{args.nproc} processes × {args.threads} thread(s)", args.nproc, args.threads)):
            out = Path(tmp) / str(len(runs))
            out.mkdir()
            runs[label] = launch(args, nproc, threads, out)
            print(f"{label}: {runs[label]['seconds']:.1f} s", flush=True)
    first, same = list(runs.values())[:2]
    print(f"\nforget(), proving ground, {args.request} request, edit={args.edit!r}, {args.per_cell} prototypes per cell, "
          f"batch_size {args.batch_size}, {'GPU' if args.device == 'cuda' else 'CPU'} ({backend})\n")
    print("| run | forget() s | synthesis s | capture s | translate s | vs 1st | vs 2nd "
          "| max rel. ΔW difference to the 1st |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        diff = max(float((a.A.double() @ a.B.double().t() - b.A.double() @ b.B.double().t()).norm()
                         / (b.A.double() @ b.B.double().t()).norm())
                   for a, b in zip(r["patch"].entries, first["patch"].entries, strict=True))
        t = r["timings"]
        print(f"| {label} | {r['seconds']:.1f} | {t.get('synthesis', 0):.1f} | {t.get('capture', 0):.1f} | "
              f"{t.get('translate', 0):.1f} | "
              f"{first['seconds'] / r['seconds']:.2f}× | {same['seconds'] / r['seconds']:.2f}× | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
