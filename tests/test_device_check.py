"""bench/device_check.py: its ``--quick`` run (the GPU check's logic at toy sizes on CPU, in a subprocess:
it needs TRITON_INTERPRET=1 set before Triton is imported), the same run from a bare checkout without
open_clip, and without Triton; its helpers. Also bench/bench_distributed.py's choice of device."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

# Runs a script as __main__ with some packages absent (None in sys.modules: importing them fails and
# find_spec says None) and, with "bare", without the editable install's finder: a checkout that was
# never installed, as the GPU machine receives it.
WRAPPER = """
import runpy, sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
if sys.argv[2] == "bare":
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_quick(tmp_path, *args, absent: str | None = None, bare: bool = False) -> tuple[dict, str]:
    """(JSON, stdout) of ``device_check.py --quick ARGS`` on CPU; with ``absent`` or ``bare``, through WRAPPER
    from a foreign directory."""
    out = tmp_path / "device_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("CLIPFORGET_BACKEND", None)
    script = [str(BENCH / "device_check.py"), "--quick", "--out", str(out), *args]
    if absent is None and not bare:
        cmd, cwd = [sys.executable] + script, ROOT
    else:
        cmd, cwd = [sys.executable, "-c", WRAPPER, absent or "", "bare" if bare else "installed"] + script, tmp_path
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_device_check_quick_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("open_clip")
    res, stdout = run_quick(tmp_path)
    assert res["setup"]["preflight"] == {"backend": "triton", "ok": True}, res["setup"]
    for key in ("matmul_tflops", "kernels", "apply", "synth", "nullspace", "edit_toy", "gate_toy", "evaluate"):
        assert key in res and "error" not in res[key] and "skipped" not in res[key], (key, res.get(key))
        assert f"== {key}" in stdout
    assert res["matmul_tflops"]["spread"] >= 0
    assert all(row["pass"] for row in res["kernels"]), res["kernels"]
    assert {r["kernel"] for r in res["kernels"]} == {"lowrank_update", "synth_update"}
    # against float64, torch's own error in fp32 is a real rounding error, not 0 by construction
    assert all(row["torch_err"] > 0 for row in res["kernels"]), res["kernels"]
    # each dtype: ViT-like rows launch the aligned path, the ragged ones the general one
    lowrank = [r for r in res["kernels"] if r["kernel"] == "lowrank_update"]
    assert ({(r["dtype"], r["case"].split(",")[0], r["align"] > 1) for r in lowrank}
            == {(d, g, g == "aligned") for d in ("float32", "float16") for g in ("aligned", "ragged")})
    apply = res["apply"]
    assert apply["backend"] == "triton" and apply["align"] > 1
    for key in ("copy_device", "apply_kernel_device", "apply_call_wall", "per_layer_loop_wall"):
        assert apply[key]["median_s"] > 0 and apply[key]["spread"] >= 0, key
    assert all(row["kernel_spread"] >= 0 and row["torch_wall_spread"] >= 0 for row in res["synth"])
    assert all(row["max_angle_rad"] < 1e-3 and row["exact_spread"] >= 0 for row in res["nullspace"])
    syn = res["edit_toy"]["synthesis"]
    # one step = forward + input gradient, counted; the rate is those FLOPs over the image-steps run
    assert syn["forward_gflops"] < syn["step_gflops"] < 2.5 * syn["forward_gflops"]
    assert syn["tflops"] == pytest.approx(syn["step_gflops"] * syn["image_steps"] / syn["seconds"] / 1e3)
    assert set(res["edit_toy"]["timings"]) >= {"synthesis", "capture", "nullspace"}
    for key in ("edit_toy", "gate_toy"):
        assert res[key]["tower_digest"]["cold_s"] > res[key]["tower_digest"]["memoized_s"] >= 0
        assert res[key]["apply"]["restored_max_err"] < 1e-5
        assert res[key]["apply"]["apply_ms"] > 0 and res[key]["apply"]["apply_spread"] >= 0
    # checking a patch on files: the three ways agree, each timed
    ev = res["evaluate"]
    assert ev["same"] and len(ev["rows"]) == 5 and all(sec > 0 for sec in ev["rows"].values())
    assert ev["workers"] >= 1 and ev["one_pass_x"] > 0
    # the domain gate on open_clip, as the full run does without transformers
    assert res["gate_toy"]["edit"] == "domain-gate" and res["gate_toy"]["examples"] == {"photo": 5, "sketch": 5}
    # the same network as a transformers CLIPModel: the projection edit and the domain gate
    hf = [res.get(k) for k in ("edit_hf:toy", "gate_hf:toy")]
    if importlib.util.find_spec("transformers") is None:
        assert all("skipped" in r for r in hf), hf
        return
    for row in hf:
        assert row is not None and "error" not in row and "skipped" not in row, row
        assert row["apply"]["restored_max_err"] < 1e-5
    assert hf[0]["edit"] == "project" and hf[1]["edit"] == "domain-gate"
    assert hf[1]["gate_units"] > 0 and set(hf[1]["timings"]) >= {"synthesis", "translate", "examples", "gate"}
    assert hf[1]["examples"] == {"photo": 5, "sketch": 5}


def test_device_check_quick_from_a_bare_checkout_without_open_clip(tmp_path):
    """Not installed (kernels/ registered as clipforget_fast.kernels by the script), no open_clip, no
    transformers: the kernels run, the model sections are skipped with the package to install."""
    pytest.importorskip("triton")
    res, stdout = run_quick(tmp_path, "--skip", "synth", absent="open_clip,transformers", bare=True)
    setup = res["setup"]
    assert setup["kernels"].startswith("registered from") and setup["package"] == str(ROOT / "clipforget_fast")
    assert setup["preflight"]["ok"], setup
    assert all(row["pass"] for row in res["kernels"]), res["kernels"]
    assert res["apply"]["backend"] == "triton" and "error" not in res["nullspace"]
    models = {k: v for k, v in res.items() if k.startswith(("edit_", "gate_"))}
    assert set(models) == {"edit_toy", "edit_hf:toy", "gate_toy", "gate_hf:toy"}
    assert all("open_clip_torch" in v["skipped"] for v in models.values()), models
    assert "open_clip_torch" in res["evaluate"]["skipped"]
    assert "== nullspace" in stdout and "wrote" in stdout


def test_device_check_quick_without_triton_says_so_and_runs_the_rest(tmp_path):
    res, stdout = run_quick(tmp_path, "--skip", "edit,gate,evaluate", absent="triton")
    pre = res["setup"]["preflight"]
    assert not pre["ok"] and "triton" in pre["error"], pre
    assert "THE TRITON KERNELS DO NOT RUN HERE" in stdout and "warning" in res["setup"]
    assert "skipped" in res["kernels"] and "skipped" in res["synth"]
    assert res["apply"]["backend"] == "torch" and "apply_kernel_device" not in res["apply"]
    assert "error" not in res["nullspace"] and "error" not in res["matmul_tflops"]


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def dc():
    import device_check

    return device_check


def test_vit_h_14_weights_are_open_clips(dc):
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-H-14"))
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n]
    assert shapes == dc.VIT_H_14_WEIGHTS


def test_kernel_check_groups_take_the_aligned_and_the_ragged_path(dc):
    """The apply kernel's aligned path needs rows of 16-byte multiples (fp32: 4 elements, 16-bit: 8)."""
    for groups in (dc.LAYER_GROUPS, dc.QUICK_GROUPS):
        for size in (4, 2):
            assert all(n * size % 16 == 0 for _, n in groups["aligned"])
            assert any(n * size % 16 for _, n in groups["ragged"])


def test_float64_references_and_the_rule(dc):
    from clipforget_fast import reference

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 3, 9, 11, generator=gen), torch.randn(3, 3, 9, 11, generator=gen)
    lo, hi = torch.full((3,), -1.5), torch.full((3,), 1.7)
    active = torch.tensor([True, False, True])
    for blur in (False, True):
        kw = dict(lr=0.1, decay=0.01, lo=lo, hi=hi, in_shift=(2, -3), out_shift=(-1, 4), blur=blur)
        for exact, ref in zip(dc.synth_update_exact(x, g, active, **kw), reference.synth_update(x, g, active, **kw)):
            assert exact.dtype == torch.float64
            torch.testing.assert_close(exact.float(), ref, rtol=1e-6, atol=1e-6)
    ws = [torch.randn(7, 5, generator=gen), torch.randn(4, 1, generator=gen)]
    ls = [torch.randn(w.shape[0], 2, generator=gen) for w in ws]
    rs = [torch.randn(w.shape[1], 2, generator=gen) for w in ws]
    exact = dc.lowrank_exact(ws, ls, rs, 0.5)
    reference.lowrank_update_(ws, ls, rs, 0.5)
    for e, w in zip(exact, ws):
        assert e.dtype == torch.float64
        torch.testing.assert_close(e.float(), w)
    assert dc.rule(2e-7, 1e-7) and not dc.rule(2.01e-7, 1e-7) and dc.rule(0.0, 0.0) and not dc.rule(1e-9, 0.0)


def test_step_flops_count_a_real_step(dc, tiny_clip):
    from torch.utils.flop_counter import FlopCounterMode

    from clipforget_fast.layers import encode_image

    fwd, bwd = dc.step_flops(tiny_clip, (32, 32), torch.device("cpu"), torch.float32)
    assert 0.9 * fwd <= bwd <= 1.2 * fwd          # frozen weights: the input gradient only, about one forward
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encode_image(tiny_clip, torch.zeros(1, 3, 32, 32))
    assert fwd >= counter.get_total_flops()       # no_grad may take a fused attention the counter misses
    assert all(p.requires_grad for p in tiny_clip.parameters())      # frozen only while counting


def test_preflight_says_why_triton_does_not_run(dc, monkeypatch):
    from clipforget_fast import dispatch

    monkeypatch.setattr(dispatch, "backend_for", lambda *args, **kwargs: "torch")
    monkeypatch.setitem(sys.modules, "clipforget_fast.kernels", None)
    out = dc.preflight(torch.device("cpu"))
    assert not out["ok"] and out["backend"] == "torch"
    assert "'torch'" in out["error"] and "do not import" in out["error"], out


def test_bench_distributed_uses_nccl_only_with_a_gpu_per_process(monkeypatch):
    import bench_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench_distributed.placement(2) == ("cpu", "gloo")        # NCCL refuses two ranks on one GPU
    assert bench_distributed.placement(1) == ("cuda", "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert bench_distributed.placement(2) == ("cuda", "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_distributed.placement(2) == ("cpu", "gloo")
