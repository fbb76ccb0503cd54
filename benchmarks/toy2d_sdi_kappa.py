"""SDI's inverted noise kappa on the fractal: how far from Gaussian noise it is where the study's points start.

kappa = (z_{t+delta} - x) / sigma_{t+delta} after DDIM inversion of x (OfficialSDI, the official code's
recipe; and SDI, the paper's algorithm on the rho-grid). For noise of the forward process it would be
N(0, I): |kappa| has median sqrt(2 ln 2) = 1.18 and mean sqrt(pi / 2) = 1.25 in 2D. Measured at the
optimisation's first, middle and last step (K = 150), from a start grid as the study's (--grid, mostly off the
data) and from 4096 class-A samples (on it), with the learned model, the ideal denoiser of the 10^4 data
points and the exact mixture; inversion eta as the variant's default and 0. Then both variants are run
through the study's ideal and learned columns (StudyConfig otherwise). Writes
benchmarks/results/toy2d_sdi_kappa.json.

    python benchmarks/toy2d_sdi_kappa.py            # about 5 CPU minutes (OMP_NUM_THREADS=1)
"""
import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.analytic import EmpiricalDenoiser  # noqa: E402
from diffsolve.distill import make_distiller  # noqa: E402
from diffsolve_studies.toy import study  # noqa: E402

GAUSSIAN = {"median": math.sqrt(2 * math.log(2)), "mean": math.sqrt(math.pi / 2)}


def summary(norms):
    q = torch.quantile(norms.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"median": float(q[1]), "mean": float(norms.mean()), "p10": float(q[0]), "p90": float(q[2])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-runs", action="store_true", help="only the kappa statistics")
    p.add_argument("--grid", type=int, default=32, help="points per axis of the start grid (the study: 64)")
    p.add_argument("--out", default=str(RESULTS / "toy2d_sdi_kappa.json"))
    a = p.parse_args(argv)
    cfg = replace(study.StudyConfig(), grid=a.grid)
    ds = study.load_dataset("fractal", progress=False)
    points = {"start grid": study.grid_points(cfg.grid),
              "data": ds["density"].sample(4096, generator=torch.Generator().manual_seed(5)).float()}
    models = {"learned": ds["models"]["main"], "ideal": EmpiricalDenoiser(ds["data"]), "exact mixture": ds["density"]}
    K = cfg.steps
    out = {"benchmark": "toy2d_sdi_kappa", "dataset": "fractal", "gaussian_reference": GAUSSIAN, "total_steps": K,
           "kappa": [], "runs": [], "config": study.config_dict(cfg)}
    for variant, method, eta_key in (("official", "sdi_official", "inversion_eta"), ("paper", "sdi", "eta_noise")):
        for model_name, model in models.items():
            for eta in (None, 0.0):
                extra = {} if eta is None else {eta_key: eta}
                options = dict(total_steps=K, **extra) if method == "sdi_official" else dict(
                    total_steps=K, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, **extra)
                distiller = make_distiller(method, model, **options)
                for step in (0, K // 2, K - 1):
                    distiller.on_step(step)
                    sigma = (float(distiller.sigma_of(torch.tensor(distiller.timestep()))) if method == "sdi_official"
                             else distiller.sigma_t())
                    for where, x in points.items():
                        norms = distiller.kappa(x, torch.Generator().manual_seed(0)).flatten(1).norm(dim=1)
                        out["kappa"].append({"variant": variant, "model": model_name, "eta": "default" if eta is None
                                             else eta, "step": step, "sigma_t": sigma, "points": where,
                                             **summary(norms.float())})
                        r = out["kappa"][-1]
                        print(f"{variant} {model_name} eta {r['eta']} step {step} (sigma {sigma:.3g}) {where}: "
                              f"|kappa| median {r['median']:.2f} mean {r['mean']:.2f} p90 {r['p90']:.2f}", flush=True)
        write_json_atomic(a.out, {**out, "machine": machine_info()})
    if not a.no_runs:
        for variant in ("official", "paper"):
            vcfg = replace(cfg, sdi_variant=variant)
            for column in ("ideal", "learned"):
                model, transforms, inversion = study.column_model(ds, column, vcfg)
                start = study.grid_points(cfg.grid)
                t0 = time.perf_counter()
                pts, nfe, _ = study.optimise("sdi", model, transforms, inversion, column, start, vcfg,
                                             torch.Generator().manual_seed(cfg.seed))
                out["runs"].append({"variant": variant, "column": column, "seconds": time.perf_counter() - t0,
                                    "nfe_per_step": nfe, **study.evaluate(pts, ds),
                                    "mode_distance": {"start": study.mode_distance(start, ds),
                                                      "end": study.mode_distance(pts, ds)}})
                r = out["runs"][-1]
                print(f"run {variant} {column}: NLL {r['nll']:.2f} P {r['precision']:.2f} R {r['recall']:.2f} "
                      f"({r['seconds']:.0f} s)", flush=True)
                write_json_atomic(a.out, {**out, "machine": machine_info()})


if __name__ == "__main__":
    main()
