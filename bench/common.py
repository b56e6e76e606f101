"""Shared timing and reporting helpers for the benchmarks in bench/.

Every benchmark times its candidate and its baseline in the same process with ``measure`` (wall time
per call) or ``measure_device`` (device time per call, from CUDA events), prints medians with their
spread and the ratio, and appends a dated row to bench/RESULTS.md with ``append_results``. Absolute
times mean something only on a quiet GPU; ratios are what we compare.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"median": med, "min": min(times), "max": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0}


def measure(fn, *, reps: int = 5, warmup: int = 1, device=None) -> dict:
    """Wall time per call: run ``fn()`` ``warmup`` times untimed, then ``reps`` times, each followed by a
    synchronize of ``device``; return seconds as ``{"median", "min", "max", "spread"}`` where
    spread = (max - min) / median. On a GPU this is what a caller pays (host work + device work)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _stats(times)


# GPU cycles (about 25 ms at 2 GHz) the device spends in a sleep kernel queued before the timed calls of
# measure_device, so that the host can queue them while the device is busy and no host work lands
# between their events.
QUEUE_AHEAD_CYCLES = 50_000_000


def measure_device(fn, *, reps: int = 20, warmup: int = 2, device=None) -> dict:
    """Device time per call on CUDA, the ``triton.testing.do_bench`` loop: ``reps`` back-to-back calls,
    each between two CUDA events, with no synchronize between them, behind a sleep kernel that keeps
    the device busy while the host queues them; ``measure``'s dict of seconds. Elsewhere ``measure``.

    Only for ``fn`` that queue device work without waiting for it: a call that synchronizes (a copy from
    pageable host memory, ``.item()``) drains the queue, and its interval includes host time.
    """
    if device is None or torch.device(device).type != "cuda":
        return measure(fn, reps=reps, warmup=warmup, device=device)
    for _ in range(warmup):
        fn()
    _sync(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
    for start, end in events:
        start.record()
        fn()
        end.record()
    _sync(device)
    return _stats([start.elapsed_time(end) / 1e3 for start, end in events])       # ms → s


def fmt_time(stats: dict) -> str:
    """'12.3 ms ±4%' style text for a ``measure`` result."""
    med = stats["median"]
    unit, scale = ("s", 1.0) if med >= 1 else ("ms", 1e3) if med >= 1e-3 else ("µs", 1e6)
    return f"{med * scale:.3g} {unit} ±{100 * stats['spread'] / 2:.0f}%"


def machine() -> str:
    """A short description of where the numbers were taken."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU {platform.machine()} × {os.cpu_count()} cores ({torch.get_num_threads()} threads), "
            f"{cpu_model()}, ATen {torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}")


def cpu_model() -> str:
    """The CPU's model name where the system says it (Linux), else the platform's processor string. The
    proving ground's figures move with the CPU's instruction set (bench/RESULTS.md (30)), so its tables
    say which one they were taken on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def append_results(title: str, lines: list[str], path: Path = RESULTS) -> None:
    """Append a dated section (markdown lines, e.g. a table) to bench/RESULTS.md."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"\n### {title} — {stamp}\n", f"Machine: {machine()}\n", ""] + lines + [""]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(block) + "\n")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mmap_large_blocks() -> None:
    """Make glibc serve blocks ≥ 1 MiB by mmap and unmap them when freed, so the resident set
    rises and falls with large temporaries (by default glibc keeps freed blocks resident and
    reuses them, which hides a temporary from an RSS measurement)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory(fn, *, device=None, interval: float = 5e-4) -> int:
    """Bytes by which ``fn()`` raises memory above its starting level at its peak (CPU: Linux).

    CUDA: the caching allocator's peak. CPU (Linux): the process's resident set, sampled every
    ``interval`` seconds by a thread while ``fn`` runs (torch ops release the GIL), so a temporary
    that lives shorter than ``interval`` may be missed.
    """
    import threading

    if device is not None and torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    _mmap_large_blocks()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss_bytes()) - base


def hf_model(cfg: dict):
    """A transformers CLIPModel (random weights) of an open_clip model config (``open_clip.get_model_config``,
    or the same keys): same widths, depths, heads, MLP ratio, patch and image size, context length and
    exact GELU as open_clip's default; open_clip's tokenizer gives it the same token ids."""
    import transformers

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw = v["width"], t["width"]
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=tw,
                         intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], hidden_act="gelu"),
        vision_config=dict(hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4.0)),
                           num_hidden_layers=v["layers"], num_attention_heads=vw // v.get("head_width", 64),
                           image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu"),
        projection_dim=cfg["embed_dim"]))
