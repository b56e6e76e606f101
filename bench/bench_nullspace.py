"""Randomized versus exact nullspace at ViT-H sizes (d_in 1280: the projections' inputs; 5120: the
MLP c_proj inputs).

    python bench/bench_nullspace.py [--dims 1280 5120] [--reps 3]

Features are synthetic but shaped like captured ones: n_R keep samples and n_F forget samples with a
power-law spectrum (λ_i ∝ i^-1.5) in a shared random basis, plus forget-only directions. Both
solvers run ``forget_basis`` end to end (U_R at 99 % energy, then U_F); reported: median time of each,
the ratio, and the largest principal angle between the randomized and exact U_F (the kept rank k) and
between their U_R.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, fmt_time, measure  # noqa: E402

from clipforget_fast.nullspace import energy_basis, forget_basis, principal_angles  # noqa: E402


def synthetic_grams(d: int, n_r: int, n_f: int, k_forget: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, min(d, 2 * n_r), generator=g))
    r = min(d, 2 * n_r) - k_forget
    spec = torch.arange(1, r + 1, dtype=torch.float32) ** -0.75            # amplitudes → λ ∝ i^-1.5
    X_R = (torch.randn(n_r, r, generator=g) * spec) @ Q[:, :r].t()
    shared = (torch.randn(n_f, r, generator=g) * spec) @ Q[:, :r].t()
    own = (torch.randn(n_f, k_forget, generator=g) * torch.linspace(1.0, 0.3, k_forget)) @ Q[:, r:].t()
    X_F = shared + own
    X_R, X_F = X_R.to(device), X_F.to(device)
    return X_F.t() @ X_F, X_R.t() @ X_R


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1280, 5120])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    kw = dict(retain_energy=0.99, forget_energy=0.95, max_rank=32)
    lines = ["| d_in | n_R / n_F | exact | randomized | speed-up | max angle U_F (k) | max angle U_R (r) |",
             "|---|---|---|---|---|---|---|"]
    for d in args.dims:
        n_r, n_f = 600, 60
        G_F, G_R = synthetic_grams(d, n_r, n_f, 8, args.device)
        out = {}

        def run(solver):
            gen = torch.Generator(device=args.device).manual_seed(0)
            out[solver] = forget_basis(G_F, G_R, solver=solver, generator=gen, **kw)[0]

        t_exact = measure(lambda: run("exact"), reps=args.reps, warmup=1, device=args.device)
        t_rand = measure(lambda: run("randomized"), reps=args.reps, warmup=1, device=args.device)
        U_e, U_r = out["exact"], out["randomized"]
        ang_f = float(principal_angles(U_e, U_r).max()) if U_e.shape[1] == U_r.shape[1] else float("inf")
        R_e, _ = energy_basis(G_R, 0.99, solver="exact")
        R_r, _ = energy_basis(G_R, 0.99, solver="randomized", generator=torch.Generator(device=args.device).manual_seed(0))
        ang_r = float(principal_angles(R_e, R_r).max()) if R_e.shape[1] == R_r.shape[1] else float("inf")
        ratio = t_exact["median"] / t_rand["median"]
        lines.append(f"| {d} | {n_r} / {n_f} | {fmt_time(t_exact)} | {fmt_time(t_rand)} | {ratio:.1f}× | "
                     f"{ang_f:.1e} rad (k={U_e.shape[1]}/{U_r.shape[1]}) | {ang_r:.1e} rad (r={R_e.shape[1]}/{R_r.shape[1]}) |")
        print(lines[-1], flush=True)
    if not args.no_record:
        append_results(f"bench_nullspace ({args.device})", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
