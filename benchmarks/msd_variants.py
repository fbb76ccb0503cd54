"""MSD estimator variants on the fractal (class A): bias, variance, model calls and efficiency.

At an 8 x 8 grid of points and lambda = 0.316 (the 2D study's initial bandwidth), each variant draws
K single-sample estimates of the mean-shift gradient. The truth is the oracle x - D(x; lambda / sqrt(2))
of the exact mixture. Denoisers: the exact mixture denoiser, and the learned toy model.
Writes benchmarks/results/msd_variants.json.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.distill import MSD, mean_shift_oracle  # noqa: E402
from diffsolve_studies.toy import fractal_tree, toy_models  # noqa: E402
from diffsolve_studies.toy.study import grid_points  # noqa: E402

VARIANTS = {
    "paper chain, split, eta 1": dict(sampler="kernel", face="split", eta=1.0),
    "paper chain, split, eta 0": dict(sampler="kernel", face="split", eta=0.0),
    "paper chain, score face, eta 1": dict(sampler="kernel", face="score", eta=1.0),
    "paper chain, split, literal flow, eta 1": dict(sampler="kernel", face="split", eta=1.0, flow="literal"),
    "posterior chain (eta 1 from z = x at s)": dict(sampler="posterior"),
    "one-call estimator x - D(x; s)": dict(sampler="one_call"),
}


def measure(model, density, points, lam, k, steps, seed=0):
    oracle = mean_shift_oracle(density, points.double(), lam).float()
    rows = []
    for name, kw in VARIANTS.items():
        msd = MSD(model, lam, steps=steps, n_samples=1, **kw)
        g = torch.Generator().manual_seed(seed)
        reps = 1 if kw["sampler"] == "one_call" else k
        draws = msd.grad(points.repeat_interleave(reps, 0), g).reshape(len(points), reps, -1)
        nfe = msd.last_nfe
        finite = torch.isfinite(draws).all(-1).all(-1)
        mean = draws[finite].mean(1)
        bias = (mean - oracle[finite]).norm(dim=1)
        var = draws[finite].var(1, unbiased=True).sum(-1) if reps > 1 else torch.zeros(int(finite.sum()))
        mse = bias ** 2 + var
        eff = (oracle[finite].norm(dim=1) ** 2 / (mse * nfe)).mean().item() if bool((mse > 0).all()) else None
        rows.append({"variant": name, "model_calls": nfe, "finite_points": int(finite.sum()),
                     "relative_bias": (bias.mean() / oracle.norm(dim=1).mean()).item(),
                     "variance": var.mean().item(), "ln_efficiency_vs_oracle": None if eff is None else math.log(eff),
                     "deterministic": reps == 1 or bool((var == 0).all())})
        print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in rows[-1].items()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lam", type=float, default=0.316)
    p.add_argument("--out", default=str(RESULTS / "msd_variants.json"))
    a = p.parse_args(argv)
    density = fractal_tree("A")
    points = grid_points(8, lim=1.2)
    out = {"benchmark": "msd_variants", "bandwidth": a.lam, "k": a.k, "steps": a.steps, "points": "8x8 grid on [-1.2, 1.2]^2"}
    print("exact mixture denoiser")
    out["exact"] = measure(density, density, points, a.lam, a.k, a.steps)
    print("learned toy model")
    out["learned"] = measure(toy_models("fractal", progress=False)["main"], density, points, a.lam, a.k, a.steps)
    out["machine"] = machine_info()
    write_json_atomic(a.out, out)


if __name__ == "__main__":
    main()
