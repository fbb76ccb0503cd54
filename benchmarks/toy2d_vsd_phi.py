"""VSD's variational model phi on the fractal's learned, CFG and autoguidance columns: how much of VSD's
divergence under guidance is an under-trained phi.

Rows per column, everything else as in the study (StudyConfig; a 32 x 32 start grid by default, --grid):
  * "exact phi": phi = the ideal denoiser (eq. 16) of the current particles, refitted every step (what a
    perfectly trained variational model would be);
  * "trained phi, lognormal sigma": the study's former phi, one Adam step (lr 1e-3) per optimisation step on
    sigma ~ lognormal(-2.3, 1.5) (median 0.10) while the gradient draws sigma on the rho-grid (median 0.28);
  * "trained phi, gradient sigma, n steps": phi trained on the gradient's own sigma distribution (the study's
    default now, n = StudyConfig.vsd_phi_steps = 1) and with more Adam steps per update.
Writes benchmarks/results/toy2d_vsd_phi.json.

    python benchmarks/toy2d_vsd_phi.py            # about 10 CPU minutes (OMP_NUM_THREADS=1)
"""
import argparse
import sys
from dataclasses import replace
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.distill import DenoisingTrainer, ideal_variational, make_distiller  # noqa: E402
from diffsolve_studies.toy import study  # noqa: E402

VARIANTS = ("exact", "lognormal_1", "gradient_1", "gradient_8")


def variational(variant, model, cfg):
    if variant == "exact":
        return ideal_variational
    kind, steps = variant.split("_")
    sigma = dict(p_mean=-2.3, p_std=1.5) if kind == "lognormal" else {}
    return DenoisingTrainer(model, lr=cfg.vsd_phi_lr, steps_per_update=int(steps), **sigma)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--columns", default="learned,cfg,autoguidance")
    p.add_argument("--variants", default="exact,lognormal_1,gradient_8")
    p.add_argument("--grid", type=int, default=32, help="points per axis of the start grid (the study: 64)")
    p.add_argument("--out", default=str(RESULTS / "toy2d_vsd_phi.json"))
    a = p.parse_args(argv)
    cfg = replace(study.StudyConfig(), grid=a.grid)
    ds = study.load_dataset("fractal", progress=False)
    rows = []
    for column in a.columns.split(","):
        model, transforms, inversion = study.column_model(ds, column, cfg)
        for variant in a.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS)}")
            options = study.distiller_options("vsd", model, transforms, inversion, column, cfg, cfg.steps)
            options["variational_update"] = variational(variant, model, cfg)
            distiller = make_distiller("vsd", model, **options)
            start = study.grid_points(cfg.grid)
            t0 = time.perf_counter()
            pts, nfe, _ = study.optimise("vsd", model, transforms, inversion, column, start, cfg,
                                         torch.Generator().manual_seed(cfg.seed), distiller=distiller)
            rows.append({"column": column, "variant": variant, "seconds": time.perf_counter() - t0,
                         **study.evaluate(pts, ds), "mode_distance": {"start": study.mode_distance(start, ds),
                                                                       "end": study.mode_distance(pts, ds)}})
            r = rows[-1]
            print(f"{column} {variant}: NLL {r['nll']:.2f} P {r['precision']:.2f} R {r['recall']:.2f} "
                  f"MMD {r['mmd_biased_e4']:.0f} ({r['seconds']:.0f} s)", flush=True)
            write_json_atomic(a.out, {"benchmark": "toy2d_vsd_phi", "dataset": "fractal",
                                      "config": study.config_dict(cfg), "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
