"""MSD's initial bandwidth lambda_0 on the fractal (ideal and learned columns): what makes MSD collapse onto
the trunk in the 2D study.

The study decays lambda linearly from lambda_0 = 0.316 (the paper's) to lambda_0 / K (K = 150 Adam steps, 10
in the ideal column). This reruns MSD with the study's options (StudyConfig: N, chain, flow; a 32 x 32 start
grid by default, --grid) at other lambda_0, with other end values at the paper's lambda_0 (a linear schedule
from lambda_0 to lambda_end), and with the zero-variance one-call estimator
x - D(x; lambda / sqrt(2)) in place of the chain. Each row also counts the optimisation steps spent at
lambda > 0.2. Writes benchmarks/results/toy2d_lambda_sweep.json.

    python benchmarks/toy2d_lambda_sweep.py            # 17 rows; each row records its wall time
"""
import argparse
import sys
from dataclasses import replace
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.distill import linear_decay, make_distiller  # noqa: E402
from diffsolve_studies.toy import study  # noqa: E402

LAMBDAS = (0.03, 0.06, 0.1, 0.2, 0.316)


def schedule(lam0, lam_end, steps):
    """lambda_k linear from lam0 (k = 0) to lam_end (k = steps - 1); lam_end = lam0 / steps is the study's."""
    return lambda k, mean_shift_norm=None: lam0 + (lam_end - lam0) * min(k, steps - 1) / max(steps - 1, 1)


def run_row(ds, column, cfg, lam0, lam_end=None, sampler="kernel"):
    model, transforms, inversion = study.column_model(ds, column, cfg)
    steps = cfg.ideal_steps if column == "ideal" else cfg.steps
    options = study.distiller_options("msd", model, transforms, inversion, column, cfg, steps)
    options.update(bandwidth=lam0, sampler=sampler,  # the study's linear decay to lam0 / steps, or to lam_end
                   schedule=linear_decay(lam0, steps) if lam_end is None else schedule(lam0, lam_end, steps))
    distiller = make_distiller("msd", model, **options)
    lams = [distiller.schedule(k) for k in range(steps)]
    start = study.grid_points(cfg.grid)
    t0 = time.perf_counter()
    pts, nfe, _ = study.optimise("msd", model, transforms, inversion, column, start, cfg,
                                 torch.Generator().manual_seed(cfg.seed), distiller=distiller)
    return {"column": column, "lam0": lam0, "lam_end": lams[-1], "sampler": sampler,
            "steps_above_0.2": sum(v > 0.2 for v in lams), "seconds": time.perf_counter() - t0,
            "nfe_per_step": nfe, **study.evaluate(pts, ds),
            "mode_distance": {"start": study.mode_distance(start, ds), "end": study.mode_distance(pts, ds)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lambdas", default=",".join(map(str, LAMBDAS)))
    p.add_argument("--columns", default="ideal,learned")
    p.add_argument("--grid", type=int, default=32, help="points per axis of the start grid (the study: 64)")
    p.add_argument("--out", default=str(RESULTS / "toy2d_lambda_sweep.json"))
    a = p.parse_args(argv)
    cfg = replace(study.StudyConfig(), grid=a.grid)
    ds = study.load_dataset("fractal", progress=False)
    specs = [(c, float(v), None, "kernel") for c in a.columns.split(",") for v in a.lambdas.split(",")]
    if "learned" in a.columns.split(","):  # other end values at the paper's lambda_0
        specs += [("learned", cfg.lam0, cfg.lam0 / 10, "kernel"), ("learned", cfg.lam0, cfg.lam0 / 3, "kernel")]
    specs += [(c, lam, None, "one_call") for c in a.columns.split(",") for lam in (0.1, cfg.lam0)]
    rows = []
    for spec in specs:
        rows.append(run_row(ds, spec[0], cfg, *spec[1:]))
        r = rows[-1]
        print(f"{r['column']} {r['sampler']} lam0 {r['lam0']:.3f} -> {r['lam_end']:.4f}: NLL {r['nll']:.2f} "
              f"P {r['precision']:.2f} R {r['recall']:.2f} MMD {r['mmd_biased_e4']:.0f} ({r['seconds']:.0f} s)",
              flush=True)
        write_json_atomic(a.out, {"benchmark": "toy2d_lambda_sweep", "dataset": "fractal",
                                  "config": study.config_dict(cfg), "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
