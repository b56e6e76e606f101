"""One-command GPU check of clipforget_fast (sized for under 8 minutes on one H200).

Runs from a bare checkout: the repo root goes on ``sys.path``, and where the package is not installed
``kernels/`` is registered as ``clipforget_fast.kernels`` (as tests/test_kernels.py loads the kernel
files). Before any section it checks that dispatch picks Triton on the device and that one tiny kernel
launch gives the right values; if not, it says so at the top of the output and in the JSON
(``setup.warning``), skips the two kernel sections and runs the rest on the torch reference.

Sections, each timed against a baseline measured in the same run (medians with their spread,
spread = (max - min) / median). A section that cannot run here (a package it needs is missing) is
recorded as skipped with its reason; one that fails is recorded with its traceback; the others run.

0. matmul    the bf16 matrix rate (8192³, CUDA events): the yardstick of synthesis.
1. kernels   every Triton kernel against its torch reference at real sizes in fp32/fp16/bf16: max
             error against the same formula in float64, layer by layer; a row passes when the
             kernel's error is at most 2× the error of the torch reference run in the same dtype
             (the flash-attention rule). The apply kernel runs ViT-H-14's shapes as one launch (rows
             of 16-byte multiples: its aligned path, ``ALIGN`` > 1) and the ragged shapes as another
             (``ALIGN`` = 1); each row records the ``ALIGN`` it launched with.
2. apply     multi-layer apply over every 2-D weight of ViT-H-14 but the embeddings (shapes listed
             here: no open_clip needed; bf16, rank 32): the kernel's device time (CUDA events over
             back-to-back launches) against ``torch._foreach_copy_`` over the same tensors (the copy
             floor: each weight read once and written once), and the wall time of a whole call (the
             host's preparation included: what a caller pays) against a per-layer torch loop.
3. synth     synthesis-update kernel: GB/s from device time (x, grad read once; x_new, x_in_next
             written) and wall time per call, against the torch reference.
4. nullspace randomized vs exact eigensolver at d_in 1280 and 5120 on a known spectrum: time ratio
             and largest principal angle on the kept rank.
5. edit      the whole ``forget`` on ViT-L-14, ViT-H-14 and ViT-B-32 as a transformers CLIPModel
             (random weights, 10 classes × 5 domains): seconds per stage (``patch.timings``), the image
             tower's digest (the key of a bank's kept translations: weights copied to the host and
             hashed in threads), cold and memoized, synthesis
             TFLOP/s against the matrix rate (FLOPs of one real step per image, counted by
             torch.utils.flop_counter: the forward with the input requiring grad, under the same
             autocast, then the input gradient; × the image-steps run), and the latency of an apply
             (force=True, half an apply+revert pair, wall) beside the copy time of the patched weights.
6. gate      the domain gate (every class @ sketch) on ViT-B-32, open_clip and transformers, with 128
             random images of two domains as ``domain_examples`` held on the CPU: the same figures.
7. evaluate  checking a patch on 512 JPEG files with ViT-B-32 (bench_evaluate.py's table): two
             ``evaluate`` passes with one decoding thread against ``evaluate_patches`` (each file decoded
             once), with one thread and with ``ImageFiles``' default threads.

Writes ``device_check.json`` to ``$OUT`` (or ``--out``) after every section and prints a table.
``--quick`` runs the same logic at toy sizes on CPU (Triton under its interpreter, a tiny CLIP, few
steps) to test the script.

    python bench/device_check.py [--quick] [--out results.json] [--steps N] [--skip SECTIONS]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

QUICK = "--quick" in sys.argv or "--cpu" in sys.argv
if QUICK:                                   # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))     # common.py
sys.path.insert(0, str(ROOT))               # this checkout's clipforget_fast, installed or not
from common import machine, measure, measure_device  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOWRANK = "clipforget_fast.kernels.lowrank_update"
# The apply kernel's check, one launch per group. ViT-H-14's layer shapes (image tower d=1280, text
# tower d=1024) have rows of 16-byte multiples in every dtype, so their launch takes the kernel's
# aligned path (ALIGN > 1), the one real models run; the ragged shapes (an odd width, and a bias seen
# as a [d, 1] column: the domain gate's "bias" entries) go apart, as one of them turns it off.
LAYER_GROUPS = {"aligned": [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120), (1024, 4096)],
                "ragged": [(1281, 777), (5120, 1)]}
QUICK_GROUPS = {"aligned": [(24, 64), (40, 136)], "ragged": [(7, 33), (70, 150), (131, 17), (29, 1)]}
# Every 2-D weight of ViT-H-14 but the embeddings, in open_clip's order (tests check it against
# open_clip's config): text_projection, visual.proj, then per block attn.in_proj, attn.out_proj,
# mlp.c_fc, mlp.c_proj, 32 image blocks and 24 text blocks.
VIT_H_14_WEIGHTS = ([(1024, 1024), (1280, 1024)]
                    + 32 * [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120)]
                    + 24 * [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)])
QUICK_WEIGHTS = [(64, 32), (96, 64), (40, 16)]
# Absolute error below which a kernel passes whatever torch's error: far under one fp32 rounding of
# any value checked here, so it decides only where both are exact.
ERR_FLOOR = 1e-12


class Skipped(Exception):
    """A section that cannot run here (a package it needs is missing): recorded as skipped, not failed."""


def need(module: str, package: str):
    """``import module``, or Skipped naming the package to install (a broken install included)."""
    try:
        return importlib.import_module(module)
    except Exception as err:
        raise Skipped(f"needs {package} (pip install {package}): {type(err).__name__}: {err}") from None


def register_kernels() -> str:
    """Make ``clipforget_fast.kernels`` importable and say how: installed (setup.py maps it onto
    kernels/), or registered from this checkout's kernels/. A kernels/ that does not import (no Triton)
    is left out; the preflight reports why."""
    import clipforget_fast

    name, folder = "clipforget_fast.kernels", ROOT / "kernels"
    found = importlib.util.find_spec(name)
    if found is not None:
        return f"installed ({found.origin or list(found.submodule_search_locations or [])})"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        return f"not importable from {folder}: {type(err).__name__}: {err}"
    clipforget_fast.kernels = module
    return f"registered from {folder}"


def preflight(dev) -> dict:
    """Whether the Triton kernels run on ``dev``: dispatch must pick Triton there, and one tiny launch of
    the apply kernel must give the right values (a missing C compiler for Triton's launcher shows here)."""
    from clipforget_fast import dispatch

    out = {"backend": None, "ok": False}
    try:
        out["backend"] = backend = dispatch.backend_for(torch.empty(1, device=dev))
        if backend != "triton":
            why = ""
            try:
                importlib.import_module("clipforget_fast.kernels")
            except Exception as err:
                why = f"; the kernels do not import ({type(err).__name__}: {err})"
            raise RuntimeError(f"dispatch picks {backend!r} for {dev.type} tensors, not 'triton' "
                               f"(CLIPFORGET_BACKEND={os.environ.get('CLIPFORGET_BACKEND', 'auto')}){why}")
        from clipforget_fast import kernels

        w = torch.zeros(3, 5, device=dev)
        kernels.lowrank_update_triton([w], [torch.ones(3, 1, device=dev)], [torch.full((5, 1), 2.0, device=dev)],
                                      0.5)
        if not bool((w == 1).all()):
            raise RuntimeError(f"a tiny launch of lowrank_update_triton wrote {w.flatten().tolist()}; "
                               "expected all ones")
        out["ok"] = True
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


@contextlib.contextmanager
def launches(module: str, kernel: str):
    """Within the block, record every launch of the Triton kernel ``kernel`` of ``module`` as
    (grid, args, kwargs), and launch it as usual."""
    mod = importlib.import_module(module)
    jit = getattr(mod, kernel)
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, args, kwargs))
                return jit[grid](*args, **kwargs)
            return launch

    setattr(mod, kernel, Recorder())
    try:
        yield seen
    finally:
        setattr(mod, kernel, jit)


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def rule(kernel_err: float, torch_err: float) -> bool:
    """The kernel's error against float64 is at most 2× torch's in the same dtype."""
    return kernel_err <= 2 * torch_err + ERR_FLOOR


def stats(t: dict) -> dict:
    """A ``measure`` result as a row: median seconds and spread."""
    return {"median_s": t["median"], "spread": t["spread"]}


def timed(fn, dev, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """(device time, wall time) per call of ``fn``; on the CPU the two are one measurement."""
    wall = measure(fn, reps=reps, warmup=warmup, device=dev)
    return (measure_device(fn, reps=reps, warmup=warmup, device=dev) if dev.type == "cuda" else wall), wall


# ---------------------------------------------------------------------------------------- 0
def matmul_tflops(dev, quick: bool) -> dict:
    n = 256 if quick else 8192
    dt = torch.float32 if quick else torch.bfloat16
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    t = measure_device(lambda: a @ b, reps=3 if quick else 20, warmup=1 if quick else 5, device=dev)
    return {"dtype": str(dt).removeprefix("torch."), "n": n, "tflops": 2 * n ** 3 / t["median"] / 1e12, **stats(t)}


# ---------------------------------------------------------------------------------------- 1
def lowrank_exact(weights, lefts, rights, scale: float) -> list[torch.Tensor]:
    """``reference.lowrank_update_``'s result in float64: W + scale · L Rᵀ with nothing rounded."""
    return [w.double() + scale * (a.double() @ b.double().t()) for w, a, b in zip(weights, lefts, rights)]


def synth_update_exact(x, grad_in, active, *, lo, hi, **kw):
    """``reference.synth_update`` in float64 (it computes in its prototypes' precision, at least fp32)."""
    from clipforget_fast import reference

    return reference.synth_update(x.double(), grad_in.double(), active, lo=lo.double(), hi=hi.double(), **kw)


def check_kernels(dev, quick: bool) -> list[dict]:
    from clipforget_fast import kernels, reference

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    # bf16 arithmetic is wrong in Triton's interpreter: bf16 only on a GPU.
    names = ["float32", "float16"] + ([] if quick else ["bfloat16"])
    for name in names:
        dt = DTYPES[name]
        for k in (1, 32):
            for group, shapes in (QUICK_GROUPS if quick else LAYER_GROUPS).items():
                base = [torch.randn(s, generator=gen).to(device=dev, dtype=dt) for s in shapes]
                ls = [torch.randn(s[0], k, generator=gen).to(dev) / k for s in shapes]
                rs = [torch.randn(s[1], k, generator=gen).to(dev) for s in shapes]
                exact = lowrank_exact(base, ls, rs, 0.5)
                tw = [w.clone() for w in base]
                reference.lowrank_update_(tw, ls, rs, 0.5)
                kw = [w.clone() for w in base]
                with launches(LOWRANK, "_lowrank_update_kernel") as seen:
                    kernels.lowrank_update_triton(kw, ls, rs, 0.5)
                aligns = sorted({kwargs["ALIGN"] for _, _, kwargs in seen})
                ke = [max_err(a, b) for a, b in zip(kw, exact)]
                te = [max_err(a, b) for a, b in zip(tw, exact)]
                ok = all(rule(a, b) for a, b in zip(ke, te)) and (group != "aligned" or aligns[0] > 1)
                rows.append({"kernel": "lowrank_update", "dtype": name, "case": f"{group}, {len(shapes)} layers, k={k}",
                             "align": aligns[0] if len(aligns) == 1 else aligns,
                             "kernel_err": max(ke), "torch_err": max(te), "pass": ok})
    n, c, h, w = (3, 3, 13, 37) if quick else (200, 3, 224, 224)
    x = torch.randn(n, c, h, w, generator=gen).to(dev)
    lo, hi = torch.full((c,), -1.5, device=dev), torch.full((c,), 1.7, device=dev)
    active = (torch.arange(n, device=dev) % 3) != 1
    for name in names:
        g = torch.randn(n, c, h, w, generator=gen).to(dev).to(DTYPES[name])
        for blur in (False, True):
            kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=(2, -3), out_shift=(-1, 4), blur=blur)
            exact = synth_update_exact(x, g, active, **kw)
            ref = reference.synth_update(x, g, active, **kw)
            got = kernels.synth_update_triton(x, g, active, **kw)
            ke = max(max_err(a, b) for a, b in zip(got, exact))
            te = max(max_err(a, b) for a, b in zip(ref, exact))
            rows.append({"kernel": "synth_update", "dtype": f"grad {name}", "case": f"blur={blur}",
                         "kernel_err": ke, "torch_err": te, "pass": rule(ke, te)})
    return rows


# ---------------------------------------------------------------------------------------- 2
def check_apply(dev, quick: bool) -> dict:
    from clipforget_fast import dispatch

    dt = torch.float32 if quick else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = QUICK_WEIGHTS if quick else VIT_H_14_WEIGHTS
    ws = [torch.randn(s, generator=gen, device=dev, dtype=dt) for s in shapes]
    src = [w.clone() for w in ws]
    # fp32 and contiguous: the launcher uses these tensors themselves, so a recorded launch reads live ones
    ls = [torch.randn(w.shape[0], 32, generator=gen, device=dev) for w in ws]
    rs = [torch.randn(w.shape[1], 32, generator=gen, device=dev) for w in ws]
    nbytes = 2 * sum(w.numel() * w.element_size() for w in ws)      # each weight read once, written once

    def loop():
        for w, a, b in zip(ws, ls, rs):
            w.copy_(torch.addmm(w.float(), a, b.t(), alpha=1e-3))

    reps = 3 if quick else 20
    out = {"model": "toy" if quick else "ViT-H-14", "dtype": str(dt).removeprefix("torch."), "layers": len(ws),
           "backend": dispatch.backend_for(ws[0]), "weight_bytes": nbytes // 2}
    t_copy = measure_device(lambda: torch._foreach_copy_(ws, src), reps=reps, device=dev)
    out["copy_device"] = dict(stats(t_copy), GBps=nbytes / t_copy["median"] / 1e9)
    if out["backend"] == "triton":                  # the one launch of an apply, timed on its own
        with launches(LOWRANK, "_lowrank_update_kernel") as seen:
            dispatch.lowrank_update_(ws, ls, rs, 1e-3)
        ((grid, args, kwargs),) = seen
        kernel = getattr(importlib.import_module(LOWRANK), "_lowrank_update_kernel")
        t_kernel = measure_device(lambda: kernel[grid](*args, **kwargs), reps=reps, device=dev)
        out["align"] = kwargs["ALIGN"]
        out["apply_kernel_device"] = dict(stats(t_kernel), GBps=nbytes / t_kernel["median"] / 1e9)
        out["apply_vs_copy"] = t_copy["median"] / t_kernel["median"]
    t_call = measure(lambda: dispatch.lowrank_update_(ws, ls, rs, 1e-3), reps=reps, device=dev)
    t_loop = measure(loop, reps=reps, device=dev)
    out["apply_call_wall"] = dict(stats(t_call), GBps=nbytes / t_call["median"] / 1e9)
    out["per_layer_loop_wall"] = dict(stats(t_loop), GBps=nbytes / t_loop["median"] / 1e9)
    out["apply_vs_loop"] = t_loop["median"] / t_call["median"]
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
        reps, warmup = (2, 0) if quick else (20, 2)     # quick: the interpreter takes a second a call
        kd, kwall = timed(lambda: kernels.synth_update_triton(x, g, active, **kw), dev, reps, warmup)
        td, twall = timed(lambda: reference.synth_update(x, g, active, **kw), dev, reps, warmup)
        rows.append({"blur": blur, "shape": [n, c, h, w],
                     "kernel_s": kd["median"], "kernel_spread": kd["spread"],
                     "kernel_GBps": nbytes / kd["median"] / 1e9,
                     "torch_s": td["median"], "torch_spread": td["spread"],
                     "torch_GBps": nbytes / td["median"] / 1e9,
                     "speedup": td["median"] / kd["median"],
                     "kernel_wall_s": kwall["median"], "kernel_wall_spread": kwall["spread"],
                     "torch_wall_s": twall["median"], "torch_wall_spread": twall["spread"],
                     "wall_speedup": twall["median"] / kwall["median"]})
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
        rows.append({"d_in": d, "rank": rank, "exact_s": te["median"], "exact_spread": te["spread"],
                     "randomized_s": tr["median"], "randomized_spread": tr["spread"],
                     "speedup": te["median"] / tr["median"], "max_angle_rad": angle,
                     "pass": angle <= 1e-3 and te["median"] / tr["median"] >= 10})
    return rows


# ---------------------------------------------------------------------------------------- 5
def step_flops(model, image_size, dev, amp: torch.dtype) -> tuple[float, float]:
    """(forward, input-gradient) FLOPs of one synthesis step for a single image, as synthesis runs it:
    weights frozen, the input requiring grad, the forward under ``amp`` autocast (under no_grad
    open_clip's attention would take a fused path that FlopCounterMode does not count). Two counters:
    one around both fails on torch 2.14 ("A leaf node was passed to _will_engine_execute_node")."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforget_fast.layers import encode_image
    from clipforget_fast.synthesis import frozen

    x = torch.zeros(1, 3, *image_size, device=dev, requires_grad=True)
    with frozen(model), torch.enable_grad():
        with FlopCounterMode(display=False) as fwd:
            with torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32):
                feats = encode_image(model, x)
            loss = feats.float().square().sum()
        with FlopCounterMode(display=False) as bwd:
            torch.autograd.grad(loss, x)
    return float(fwd.get_total_flops()), float(bwd.get_total_flops())


# a toy open_clip CLIP config (as in tests/conftest.py)
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))


def build_model(name: str, dev):
    """(model, tokenizer) with random weights on ``dev``: an open_clip architecture by name, "toy" (TINY),
    or "hf:NAME" (hf:toy), the same architecture as a transformers CLIPModel with open_clip's tokenizer
    (the same token ids)."""
    open_clip = need("open_clip", "open_clip_torch")
    hf, arch = name.startswith("hf:"), name.removeprefix("hf:")
    cfg = TINY if arch == "toy" else open_clip.get_model_config(arch)
    if hf:
        need("transformers", "transformers")
        from common import hf_model
        model = hf_model(cfg)
    else:
        model = (open_clip.model.CLIP(**cfg) if arch == "toy"
                 else open_clip.create_model(arch, pretrained=None, device=dev))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model.to(dev).eval(), tokenizer


def check_edit(dev, quick: bool, name: str, steps: int | None, peak_tflops: float | None,
               gate: bool = False) -> dict:
    """``forget`` on ``name`` (build_model), timed: edit="project" over two of the classes (the whole
    pipeline: synthesis, capture, nullspace on both towers), or with ``gate`` the domain gate on every
    class of one domain (prototypes, their translations, the detectors)."""
    import clipforget_fast as cf
    from clipforget_fast.layers import image_geometry
    from clipforget_fast.synthesis import autocast_dtype

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
        fwd, bwd = step_flops(model, size, dev, autocast_dtype(config, dev))
        acc = syn["accepted"]
        image_steps = (acc * (syn["mean_steps_to_accept"] or 0)
                       + (syn["prototypes"] - acc) * config.steps)       # Σ steps over prototypes
        tflops = (fwd + bwd) * image_steps / syn["seconds"] / 1e12
        out["synthesis"] = dict(syn, forward_gflops=fwd / 1e9, step_gflops=(fwd + bwd) / 1e9,
                                image_steps=image_steps, tflops=tflops,
                                fraction_of_matmul=tflops / peak_tflops if peak_tflops else None)
    from clipforget_fast import layers      # the key of a bank's kept translations: cold, then memoized
    layers._DIGESTS._held.clear()
    t0 = time.perf_counter()
    layers.image_tower_digest(model)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    layers.image_tower_digest(model)
    out["tower_digest"] = {"cold_s": cold, "memoized_s": time.perf_counter() - t0}
    params = dict(model.named_parameters())
    ws = [params[e.name].data for e in patch.entries]
    if ws:
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        src = [w.clone() for w in ws]
        t_copy = measure_device(lambda: torch._foreach_copy_(src, ws), reps=5 if quick else 20, device=dev)

        def apply_revert():
            patch.apply(model, force=True)
            patch.revert(model, force=True)

        t_ar = measure(apply_revert, reps=3 if quick else 10, device=dev)
        # a patch of a few layers is latency, not bandwidth: times, not GB/s
        out["apply"] = {"patched_MB": nbytes / 1e6,
                        "apply_ms": t_ar["median"] / 2 * 1e3, "apply_spread": t_ar["spread"],
                        "copy_ms": t_copy["median"] * 1e3, "copy_spread": t_copy["spread"],
                        "restored_max_err": max(max_err(w, s) for w, s in zip(ws, src))}
    del model
    return out


def check_evaluate(dev, quick: bool) -> dict:
    """bench_evaluate.compare on ViT-B-32 (the toy CLIP when quick), the model's input size and pixel
    statistics as its preprocess."""
    need("torchvision", "torchvision")
    from bench_evaluate import compare, geometry_preprocess

    model, tokenizer = build_model("toy" if quick else "ViT-B-32", dev)
    out = compare(model, tokenizer, geometry_preprocess(model), 24 if quick else 512, 8 if quick else 128,
                  1 if quick else 3, dev)
    out["rows"] = {name: sec for name, sec in out["rows"]}
    if not out["same"]:
        raise AssertionError("evaluate_patches and two evaluate passes gave different matrices")
    return out


# ----------------------------------------------------------------------------------------
def run_section(results: dict, key: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[key] = fn()
        status = "ok"
    except Skipped as why:
        results[key] = {"skipped": str(why)}
        status = f"skipped: {why}"
    except (Exception, SystemExit) as err:  # one broken section must not hide the others' numbers
        results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        status = f"ERROR: {type(err).__name__}: {err}"
    print(f"[{key}] {time.perf_counter() - t0:.1f} s, {status}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def banner(text: str) -> str:
    return f"{'!' * 100}\n!! {text}\n{'!' * 100}"


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
    if "warning" in res.get("setup", {}):
        print("\n" + banner(res["setup"]["warning"]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--cpu", action="store_true", dest="quick",
                    help="toy sizes on CPU (Triton interpreter, tiny CLIP, few steps)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/device_check.json)")
    ap.add_argument("--steps", type=int, default=None, help="synthesis steps of the full edit")
    ap.add_argument("--models", default="ViT-L-14,ViT-H-14,hf:ViT-B-32",
                    help="models of the full edit (hf:NAME: as a transformers CLIPModel)")
    ap.add_argument("--gate-models", default="ViT-B-32,hf:ViT-B-32", help="models of the domain gate's edit")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated")
    args = ap.parse_args(argv)
    quick = args.quick
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "device_check.json"
    res: dict = {"machine": machine(), "mode": "quick" if quick else "full"}

    def save() -> None:                             # partial results survive a later crash or kill
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1, default=str))

    if not quick and not torch.cuda.is_available():
        res["error"] = "device_check needs a CUDA GPU; use --quick for the CPU dry run"
        save()
        raise SystemExit(res["error"])
    dev = torch.device("cpu" if quick else "cuda")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforget_fast.dispatch").setLevel(logging.INFO)    # it logs a fallback at INFO
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if quick:
        os.environ["CLIPFORGET_BACKEND"] = "triton"      # kernels under the interpreter
        torch.manual_seed(0)
    import clipforget_fast

    setup = res["setup"] = {"package": str(Path(clipforget_fast.__file__).resolve().parent),
                            "kernels": register_kernels()}
    setup["preflight"] = preflight(dev)
    if not setup["preflight"]["ok"]:
        os.environ["CLIPFORGET_BACKEND"] = "torch"
        setup["warning"] = (f"THE TRITON KERNELS DO NOT RUN HERE ({setup['preflight']['error']}). The kernels "
                            "and synth sections are skipped; apply and the edits run on the torch reference "
                            "(CLIPFORGET_BACKEND=torch).")
        print(banner(setup["warning"]), flush=True)
    save()

    def triton_only(fn):
        def run():
            if not setup["preflight"]["ok"]:
                raise Skipped(f"the Triton kernels do not run here: {setup['preflight']['error']}")
            return fn()
        return run

    def peak() -> float | None:
        return res.get("matmul_tflops", {}).get("tflops")

    sections = [("matmul_tflops", lambda: matmul_tflops(dev, quick)),
                ("kernels", triton_only(lambda: check_kernels(dev, quick))),
                ("apply", lambda: check_apply(dev, quick)),
                ("synth", triton_only(lambda: check_synth(dev, quick))),
                ("nullspace", lambda: check_nullspace(dev, quick))]
    for name in (["toy", "hf:toy"] if quick else [m for m in args.models.split(",") if m]):
        sections.append((f"edit_{name}", lambda name=name: check_edit(dev, quick, name, args.steps, peak())))
    for name in (["toy", "hf:toy"] if quick else [m for m in args.gate_models.split(",") if m]):
        sections.append((f"gate_{name}", lambda name=name: check_edit(dev, quick, name, args.steps, peak(), True)))
    sections.append(("evaluate", lambda: check_evaluate(dev, quick)))
    for key, fn in sections:
        if key.split("_")[0] not in skip and key not in skip:
            run_section(res, key, fn)
            save()
    print_table(res)
    print(f"\nwrote {out_path}")
    return res


if __name__ == "__main__":
    main()
