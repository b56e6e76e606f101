"""One-command GPU check of clipforget_fast (sized for under 8 minutes on one H200).

Sections, each timed against a baseline measured in the same run:

1. kernels   every Triton kernel against its torch reference at real sizes in fp32/fp16/bf16: max
             error against an fp32 reference, passing when it is at most 2× the error of the
             torch reference run in the same dtype (the flash-attention rule).
2. apply     multi-layer apply over every 2-D weight of ViT-H-14 (bf16, rank 32): GB/s against the
             copy bandwidth over the same tensors and against a per-layer torch loop.
3. synth     synthesis-update kernel: GB/s (x, grad read once; x_new, x_in_next written) against
             the torch reference.
4. nullspace randomized vs exact eigensolver at d_in 1280 and 5120 on a known spectrum: time ratio
             and largest principal angle on the kept rank.
5. edit      the whole ``forget`` on ViT-L-14, ViT-H-14 and ViT-B-32 as a transformers CLIPModel
             (random weights, 10 classes × 5 domains): seconds per stage (``patch.timings``), synthesis
             TFLOP/s (3 × forward FLOPs × images × steps, forward FLOPs from torch.utils.flop_counter)
             against a bf16 matmul rate measured here, and apply GB/s against copy bandwidth over the
             patched weights.
6. gate      the domain gate (every class @ sketch) on the transformers ViT-B-32, with 128 random images
             of two domains as ``domain_examples`` held on the CPU: the same figures.

Writes ``device_check.json`` to ``$OUT`` (or ``--out``) and prints a table. ``--quick`` runs the same
logic at toy sizes on CPU (Triton under its interpreter, a tiny CLIP, few steps) to test the script.

    python bench/device_check.py [--quick] [--out results.json] [--steps N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

QUICK = "--quick" in sys.argv or "--cpu" in sys.argv
if QUICK:                                   # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Weight shapes of ViT-H-14 layers (d=1280 image tower, d=1024 text tower) plus a ragged one.
# the last of each: a bias seen as a [d, 1] column (the domain gate's "bias" entries)
REAL_LAYERS = [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120), (1024, 4096), (1281, 777), (5120, 1)]
QUICK_LAYERS = [(7, 33), (70, 150), (131, 17), (29, 1)]


def open_clip_or_exit():
    try:
        import open_clip
    except ImportError as err:
        raise SystemExit(f"device_check needs open_clip_torch (pip install open_clip_torch): {err}")
    return open_clip


def max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def rule(kernel_err: float, torch_err: float, magnitude: float) -> bool:
    """Kernel error ≤ 2 × torch's error in the same dtype (+ fp32 rounding of the magnitude)."""
    return kernel_err <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps * magnitude


# ---------------------------------------------------------------------------------------- 1
def check_kernels(dev, quick: bool) -> list[dict]:
    from clipforget_fast import reference

    from clipforget_fast import kernels

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    # bf16 arithmetic is wrong in Triton's interpreter: bf16 only on a GPU.
    names = ["float32", "float16"] + ([] if quick else ["bfloat16"])
    shapes = QUICK_LAYERS if quick else REAL_LAYERS
    for name in names:
        dt = DTYPES[name]
        for k in (1, 32):
            w32 = [torch.randn(s, generator=gen).to(dev) for s in shapes]
            ls = [torch.randn(s[0], k, generator=gen).to(dev) / k for s in shapes]
            rs = [torch.randn(s[1], k, generator=gen).to(dev) for s in shapes]
            base = [w.to(dt) for w in w32]
            exact = [w.to(torch.float32, copy=True) for w in base]     # fp32 math on the same inputs
            reference.lowrank_update_(exact, ls, rs, 0.5)
            tw = [w.clone() for w in base]
            reference.lowrank_update_(tw, ls, rs, 0.5)
            kw = [w.clone() for w in base]
            kernels.lowrank_update_triton(kw, ls, rs, 0.5)
            ke = max(max_err(a, b) for a, b in zip(kw, exact))
            te = max(max_err(a, b) for a, b in zip(tw, exact))
            mag = max(float(e.abs().max()) for e in exact)
            rows.append({"kernel": "lowrank_update", "dtype": name, "case": f"{len(shapes)} layers, k={k}",
                         "kernel_err": ke, "torch_err": te, "pass": rule(ke, te, mag)})
    n, c, h, w = (3, 3, 13, 37) if quick else (200, 3, 224, 224)
    x = torch.randn(n, c, h, w, generator=gen).to(dev)
    lo, hi = torch.full((c,), -1.5, device=dev), torch.full((c,), 1.7, device=dev)
    active = (torch.arange(n, device=dev) % 3) != 1
    for name in names:
        g = torch.randn(n, c, h, w, generator=gen).to(dev).to(DTYPES[name])
        for blur in (False, True):
            kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=(2, -3), out_shift=(-1, 4), blur=blur)
            exact = reference.synth_update(x, g.float(), active, **kw)
            ref = reference.synth_update(x, g, active, **kw)
            got = kernels.synth_update_triton(x, g, active, **kw)
            ke = max(max_err(a, b) for a, b in zip(got, exact))
            te = max(max_err(a, b) for a, b in zip(ref, exact))
            # Largest |value| before the clamp: |x| + lr · |g| / rms(g).
            gf = g.float().flatten(1)
            mag = float(x.abs().max()) + 0.1 * float((gf.abs().amax(1) / gf.pow(2).mean(1).sqrt()).max())
            rows.append({"kernel": "synth_update", "dtype": f"grad {name}", "case": f"blur={blur}",
                         "kernel_err": ke, "torch_err": te, "pass": rule(ke, te, mag)})
    return rows


# ---------------------------------------------------------------------------------------- 2
def check_apply(dev, quick: bool, model_name: str) -> dict:
    from clipforget_fast import dispatch

    open_clip = open_clip_or_exit()
    if quick:
        shapes = [(64, 32), (96, 64), (33, 17)]
        weights = [torch.randn(s) for s in shapes]
    else:
        model = open_clip.create_model(model_name, pretrained=None, device=dev)
        weights = [p.detach() for n_, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n_]
    dt = torch.float32 if quick else torch.bfloat16
    ws = [w.to(device=dev, dtype=dt, copy=True) for w in weights]
    del weights
    src = [w.clone() for w in ws]
    ls = [torch.randn(w.shape[0], 32, device=dev) for w in ws]
    rs = [torch.randn(w.shape[1], 32, device=dev) for w in ws]
    nbytes = 2 * sum(w.numel() * w.element_size() for w in ws)

    def loop():
        for w, a, b in zip(ws, ls, rs):
            w.copy_(torch.addmm(w.float(), a, b.t(), alpha=1e-3))

    reps = 3 if quick else 10
    t_copy = measure(lambda: [d.copy_(s) for d, s in zip(ws, src)], reps=reps, device=dev)
    t_apply = measure(lambda: dispatch.lowrank_update_(ws, ls, rs, 1e-3), reps=reps, device=dev)
    t_loop = measure(loop, reps=reps, device=dev)
    out = {"model": "toy" if quick else model_name, "dtype": str(dt), "layers": len(ws),
           "backend": dispatch.backend_for(ws[0]), "weight_bytes": nbytes // 2}
    for key, t in (("copy", t_copy), ("apply", t_apply), ("per_layer_loop", t_loop)):
        out[key] = {"median_s": t["median"], "spread": t["spread"], "GBps": nbytes / t["median"] / 1e9}
    out["apply_vs_copy"] = t_copy["median"] / t_apply["median"]
    out["apply_vs_loop"] = t_loop["median"] / t_apply["median"]
    return out


# ---------------------------------------------------------------------------------------- 3
def check_synth(dev, quick: bool) -> list[dict]:
    from clipforget_fast import kernels, reference

    n, c, h, w = (3, 3, 13, 37) if quick else (200, 3, 224, 224)
    x = torch.randn(n, c, h, w, device=dev)
    g = torch.randn(n, c, h, w, device=dev)
    lo, hi = torch.full((c,), -1.5, device=dev), torch.full((c,), 1.7, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    nbytes = 4 * x.numel() * 4                       # x, grad read; x_new, x_in_next written (fp32)
    rows = []
    for blur in (False, True):
        kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=(1, 2), out_shift=(-2, 1), blur=blur)
        reps = 2 if quick else 20
        tk = measure(lambda: kernels.synth_update_triton(x, g, active, **kw), reps=reps, device=dev)
        tr = measure(lambda: reference.synth_update(x, g, active, **kw), reps=reps, device=dev)
        rows.append({"blur": blur, "shape": [n, c, h, w], "kernel_s": tk["median"], "torch_s": tr["median"],
                     "kernel_GBps": nbytes / tk["median"] / 1e9, "torch_GBps": nbytes / tr["median"] / 1e9,
                     "speedup": tr["median"] / tk["median"]})
    return rows


# ---------------------------------------------------------------------------------------- 4
def check_nullspace(dev, quick: bool) -> list[dict]:
    from clipforget_fast import nullspace

    rows = []
    rank = 8 if quick else 32
    gen = torch.Generator(device=dev).manual_seed(0)
    for d in ((64, 128) if quick else (1280, 5120)):
        q, _ = torch.linalg.qr(torch.randn(d, d, device=dev, generator=gen))
        spectrum = torch.cat([torch.logspace(2, 0, rank, device=dev),          # the kept rank
                              1e-3 * torch.rand(d - rank, device=dev, generator=gen)])
        G = (q * spectrum) @ q.t()
        G = (G + G.t()) / 2
        te = measure(lambda: nullspace.exact_eig(G), reps=2 if quick else 3, device=dev)
        tr = measure(lambda: nullspace.randomized_eig(G, rank, generator=gen), reps=2 if quick else 5,
                     device=dev)
        _, V = nullspace.exact_eig(G)
        _, U = nullspace.randomized_eig(G, rank, generator=gen)
        angle = float(nullspace.principal_angles(V[:, :rank], U).max())
        rows.append({"d_in": d, "rank": rank, "exact_s": te["median"], "randomized_s": tr["median"],
                     "speedup": te["median"] / tr["median"], "max_angle_rad": angle,
                     "pass": angle <= 1e-3 and te["median"] / tr["median"] >= 10})
    return rows


# ---------------------------------------------------------------------------------------- 5
def matmul_tflops(dev, quick: bool) -> float:
    n = 256 if quick else 8192
    dt = torch.float32 if quick else torch.bfloat16
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    t = measure(lambda: a @ b, reps=3 if quick else 20, warmup=1 if quick else 5, device=dev)
    return 2 * n ** 3 / t["median"] / 1e12


def forward_flops(model, image_size, dev) -> float:
    """FLOPs of one image-tower forward for a single image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforget_fast.layers import encode_image

    x = torch.zeros(1, 3, *image_size, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encode_image(model, x)
    return float(counter.get_total_flops())


# a toy open_clip CLIP config (as in tests/conftest.py)
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))


def build_model(name: str, dev):
    """(model, tokenizer) with random weights on ``dev``: an open_clip architecture by name, "toy" (TINY),
    or "hf:NAME" (hf:toy), the same architecture as a transformers CLIPModel with open_clip's tokenizer
    (the same token ids)."""
    open_clip = open_clip_or_exit()
    hf, arch = name.startswith("hf:"), name.removeprefix("hf:")
    cfg = TINY if arch == "toy" else open_clip.get_model_config(arch)
    if hf:
        if importlib.util.find_spec("transformers") is None:
            raise Skipped(f"{name} needs transformers (pip install transformers)")
        from common import hf_model
        model = hf_model(cfg)
    else:
        model = (open_clip.model.CLIP(**cfg) if arch == "toy"
                 else open_clip.create_model(arch, pretrained=None, device=dev))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model.to(dev).eval(), tokenizer


def check_edit(dev, quick: bool, name: str, steps: int | None, peak_tflops: float, gate: bool = False) -> dict:
    """``forget`` on ``name`` (build_model), timed: edit="project" over two of the classes (the whole
    pipeline: synthesis, capture, nullspace on both towers), or with ``gate`` the domain gate on every
    class of one domain (prototypes, their translations, the detectors)."""
    import clipforget_fast as cf
    from clipforget_fast.layers import image_geometry

    t0 = time.perf_counter()
    model, tokenizer = build_model(name, dev)
    if quick:
        classes, domains = ["dog", "cat", "car"], ["photo", "sketch"]
        config = cf.ForgetConfig(prototypes_per_cell=1, steps=steps or 2, batch_size=8, device=str(dev),
                                 edit="project", gate_translate_steps=2)
    else:
        classes = ["dog", "cat", "car", "tree", "house", "bird", "boat", "chair", "cup", "horse"]
        domains = ["photo", "sketch", "cartoon", "painting", "pixel_art"]
        config = cf.ForgetConfig(device=str(dev), edit="project", **({"steps": steps} if steps else {}))
    load_s = time.perf_counter() - t0
    more = {}
    if gate:        # with real-like examples held on the CPU, read onto the device a batch at a time
        spec = cf.ForgetSpec(classes, domains, forget_domains=["sketch"])
        config = config.replace(edit="domain-gate")
        size, _, _ = image_geometry(model)
        gen = torch.Generator().manual_seed(0)
        more["domain_examples"] = {d: torch.randn(5 if quick else 128, 3, *size, generator=gen) for d in domains[:2]}
    else:
        spec = cf.ForgetSpec(classes, domains, forget_classes=classes[:2])
    t0 = time.perf_counter()
    patch = cf.forget(model, tokenizer, spec, config, **more)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    total_s = time.perf_counter() - t0
    out = {"model": name, "edit": patch.info["edit"], "load_s": load_s, "forget_s": total_s,
           "timings": dict(patch.timings), "patch_layers": len(patch.entries), "config_steps": config.steps}
    if gate:
        out["gate_units"] = len(patch.info["gate"]["units"])
        out["examples"] = patch.info["gate"]["examples"]
        out["prototypes_caught"] = patch.info["gate"].get("prototypes_caught")
    syn = patch.info.get("synthesis")
    if syn:
        size, _, _ = image_geometry(model)
        fwd = forward_flops(model, size, dev)
        acc = syn["accepted"]
        image_steps = (acc * (syn["mean_steps_to_accept"] or 0)
                       + (syn["prototypes"] - acc) * config.steps)       # Σ steps over prototypes
        tflops = 3 * fwd * image_steps / syn["seconds"] / 1e12
        out["synthesis"] = dict(syn, forward_gflops=fwd / 1e9, image_steps=image_steps,
                                tflops=tflops, fraction_of_matmul=tflops / peak_tflops)
    params = dict(model.named_parameters())
    ws = [params[e.name].data for e in patch.entries]
    if ws:
        nbytes = 2 * sum(w.numel() * w.element_size() for w in ws)
        src = [w.clone() for w in ws]
        t_copy = measure(lambda: [s.copy_(w) for s, w in zip(src, ws)], reps=5, device=dev)

        def apply_revert():
            patch.apply(model, force=True)
            patch.revert(model, force=True)

        t_ar = measure(apply_revert, reps=3, device=dev)
        out["apply"] = {"apply_s": t_ar["median"] / 2, "copy_s": t_copy["median"],
                        "apply_GBps": nbytes / (t_ar["median"] / 2) / 1e9,
                        "copy_GBps": nbytes / t_copy["median"] / 1e9,
                        "restored_max_err": max(max_err(w, s) for w, s in zip(ws, src))}
    del model
    return out


# ----------------------------------------------------------------------------------------
class Skipped(Exception):
    """A section that cannot run here (a package it needs is missing): recorded as skipped, not failed."""


def run_section(results: dict, key: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[key] = fn()
    except SystemExit:
        raise
    except Skipped as why:
        results[key] = {"skipped": str(why)}
    except Exception as err:  # one broken section must not hide the others' numbers
        results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    print(f"[{key}] {time.perf_counter() - t0:.1f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(res: dict) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    for key, val in res.items():
        if key in ("machine", "mode"):
            continue
        print(f"\n== {key}")
        rows = val if isinstance(val, list) else [val]
        for row in rows:
            if isinstance(row, dict):
                flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list)) and k != "traceback"}
                print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in flat.items()))
                for k, v in row.items():
                    if isinstance(v, dict):
                        print(f"    {k}: " + ", ".join(f"{a}={fmt(b)}" for a, b in v.items()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--cpu", action="store_true", dest="quick",
                    help="toy sizes on CPU (Triton interpreter, tiny CLIP, few steps)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/device_check.json)")
    ap.add_argument("--steps", type=int, default=None, help="synthesis steps of the full edit")
    ap.add_argument("--models", default="ViT-L-14,ViT-H-14,hf:ViT-B-32",
                    help="models of the full edit (hf:NAME: as a transformers CLIPModel)")
    ap.add_argument("--gate-models", default="hf:ViT-B-32", help="models of the domain gate's edit")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated")
    args = ap.parse_args(argv)
    quick = args.quick
    if not quick and not torch.cuda.is_available():
        raise SystemExit("device_check needs a CUDA GPU; use --quick for the CPU dry run")
    dev = torch.device("cpu" if quick else "cuda")
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "device_check.json"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if quick:
        os.environ["CLIPFORGET_BACKEND"] = "triton"      # kernels under the interpreter
        torch.manual_seed(0)
    res: dict = {"machine": machine(), "mode": "quick" if quick else "full"}
    peak = matmul_tflops(dev, quick)
    res["matmul_tflops"] = {"dtype": "float32" if quick else "bfloat16", "tflops": peak}
    sections = [("kernels", lambda: check_kernels(dev, quick)),
                ("apply", lambda: check_apply(dev, quick, "ViT-H-14")),
                ("synth", lambda: check_synth(dev, quick)),
                ("nullspace", lambda: check_nullspace(dev, quick))]
    for name in (["toy", "hf:toy"] if quick else [m for m in args.models.split(",") if m]):
        sections.append((f"edit_{name}", lambda name=name: check_edit(dev, quick, name, args.steps, peak)))
    for name in (["hf:toy"] if quick else [m for m in args.gate_models.split(",") if m]):
        sections.append((f"gate_{name}", lambda name=name: check_edit(dev, quick, name, args.steps, peak, True)))
    for key, fn in sections:
        if key.split("_")[0] not in skip and key not in skip:
            run_section(res, key, fn)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(res, indent=1, default=str))    # partial results survive
    print_table(res)
    print(f"\nwrote {out_path}")
    return res


if __name__ == "__main__":
    main()
