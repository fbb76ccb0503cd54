"""ISM, CSD, NFSD and SJC beside SDS, VSD, SDI and MSD on the 2-D fractal study, at equal model calls.

    OMP_NUM_THREADS=1 python benchmarks/toy2d_distillers.py          # -> benchmarks/results/toy2d_distillers.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/toy2d_distillers.py --quick  # 8 x 8 grid, 10 steps, learned + cfg (~1 min)

Equal model calls: every method gets BUDGET = 16 model evaluations per point and optimisation step (a
guided evaluation counts 2). Each method's cost per estimate is measured on a probe copy (its `last_nfe`
per row, ISM averaged over 32 calls since its inversion length varies with t) and it averages
n_mc = max(1, floor(16 / cost)) estimates per point; MSD runs one chain whose length is scaled from a
16-step probe to 16 calls, SDI inverts in floor(16 / (2 calls)) - 1 steps. The reported `calls_per_point_step` is measured
during the run. Everything else is the study's (`diffsolve_studies.toy.study.StudyConfig`) with the grid
reduced to 32 x 32 points (1024) to fit the run in ~15 minutes at OMP_NUM_THREADS=1. CSD and NFSD need
a conditional / unconditional pair: they run on the cfg and autoguidance columns only (the ideal and
learned columns have no unconditional model). NFSD runs twice on the cfg column: with the null class as
the negative (delta_D = 0 above the threshold) and with the weak autoguidance model as the negative.
New methods keep their official weightings (ISM sigma_t, SJC 1, CSD / NFSD 1 - abar); the paper's
methods keep the study's options. Trained models come from the cache (`toy_models("fractal")`).
"""
import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_json_atomic  # noqa: E402
from diffsolve.distill import CSD, ISM, MSD, NFSD, SJC  # noqa: E402
from diffsolve_studies.toy import study  # noqa: E402

BUDGET = 16
PAPER = ("sds", "vsd", "sdi", "msd")
NEW = ("ism", "csd", "nfsd", "sjc")


def calls_per_eval(transforms):
    return 2 if transforms else 1


def build(method, ds, column, cfg_, steps):
    """(distiller, n_mc, cfg for the run) of one method on one column at the budget; None if not applicable."""
    model, transforms, inversion = study.column_model(ds, column, cfg_)
    c = calls_per_eval(transforms)
    common = dict(sigma_min=cfg_.sigma_min, sigma_max=cfg_.sigma_max, transforms=transforms)
    if method in ("csd", "nfsd", "nfsd_weakneg") and not transforms:
        return None
    if method == "nfsd_weakneg" and column != "cfg":
        return None
    if method == "msd":  # one chain; its length scaled so that the measured calls per estimate meet the budget
        probe_cfg = replace(cfg_, n_mc=1, chain_steps=BUDGET)
        cost = cost_per_estimate(lambda: study.study_distiller("msd", model, transforms, inversion, column,
                                                               probe_cfg, steps))
        run_cfg = replace(probe_cfg, chain_steps=max(1, math.floor(BUDGET * BUDGET / cost)))
        return study.study_distiller("msd", model, transforms, inversion, column, run_cfg, steps), run_cfg
    if method == "sdi":
        opts = study.distiller_options("sdi", model, transforms, inversion, column, cfg_, steps)
        return lambda: study.make_distiller("sdi", model, **{**opts, "n_inversion": max(1, BUDGET // (2 * c) - 1)}), None
    if method in PAPER:
        return lambda: study.study_distiller(method, model, transforms, inversion, column, cfg_, steps), None
    if method == "ism":
        return lambda: ISM(model, warmup_steps=max(1, round(0.3 * steps)), **common), None
    if method == "sjc":
        return lambda: SJC(model, **common), None
    if method == "csd":
        return lambda: CSD(model, **common), None
    neg = ds["models"]["autoguide"] if method == "nfsd_weakneg" else None
    return lambda: NFSD(model, negative_model=neg, **common), None


def cost_per_estimate(make, rows=64, calls=32):
    d = make()
    x = torch.randn(rows, 2, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(5)
    total = 0.0
    for k in range(calls if isinstance(d, ISM) else 1):
        d.on_step(k, x, g)
        d.grad(x, g)
        total += d.last_nfe
    return total / (calls if isinstance(d, ISM) else 1)


def run(cfg_, columns, methods, out):
    ds = study.load_dataset("fractal", progress=False)
    rows, skipped, t0 = [], [], time.time()
    for column in columns:
        steps = cfg_.ideal_steps if column == "ideal" else cfg_.steps
        for method in methods:
            built = build(method, ds, column, cfg_, steps)
            if built is None:
                skipped.append({"method": method, "column": column,
                                "why": "needs a conditional / unconditional pair (a guidance transform)"
                                if method != "nfsd_weakneg" else "the weak-negative variant runs on the cfg column"})
                continue
            maker, run_cfg = built
            if run_cfg is None:  # noisy estimators: n_mc from the measured cost
                cost = cost_per_estimate(maker)
                n_mc = max(1, math.floor(BUDGET / cost))
                run_cfg, distiller = replace(cfg_, n_mc=n_mc), maker()
            else:
                distiller, cost, n_mc = maker, None, 1
            model, transforms, inversion = study.column_model(ds, column, cfg_)
            x0 = study.grid_points(cfg_.grid)
            gen = torch.Generator().manual_seed(cfg_.seed)
            start = time.time()
            points, calls, _ = study.optimise(method if method in study.METHODS else "sds", model, transforms,
                                              inversion, column, x0, run_cfg, gen, distiller=distiller)
            metrics = study.evaluate(points, ds)
            rows.append({"method": method, "column": column, "n_mc": n_mc, "cost_per_estimate": cost,
                         "calls_per_point_step": calls, "seconds": round(time.time() - start, 1), **metrics})
            print(f"{column:>12} {method:>13} n_mc={n_mc:<3} calls={calls:6.2f} nll={metrics['nll']:9.2f} "
                  f"prec={metrics['precision']:.2f} rec={metrics['recall']:.2f} ({rows[-1]['seconds']} s)", flush=True)
    result = {"benchmark": "toy2d_distillers", "dataset": "fractal", "budget_calls_per_point_step": BUDGET,
              "config": asdict(cfg_), "columns": list(columns), "rows": rows, "skipped": skipped,
              "seconds": round(time.time() - t0, 1)}
    write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result):
    cols = result["columns"]
    lines = [f"Fractal, {result['config']['grid']}^2 grid, {result['budget_calls_per_point_step']} model calls per point "
             "and step (measured calls in brackets). NLL / precision / recall.", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    by = {(r["method"], r["column"]): r for r in result["rows"]}
    for m in dict.fromkeys(r["method"] for r in result["rows"]):
        cells = []
        for c in cols:
            r = by.get((m, c))
            cells.append("n/a" if r is None else
                         f"{r['nll']:.2f} / {r['precision']:.2f} / {r['recall']:.2f} ({r['calls_per_point_step']:.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 x 8 grid, 10 steps, learned and cfg columns (~1 min)")
    p.add_argument("--out", default=None, help="output path without suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg_ = study.StudyConfig(grid=32)
    columns = study.COLUMNS["fractal"]
    if args.quick:
        cfg_ = replace(cfg_, grid=8, steps=10, ideal_steps=3)
        columns = ("learned", "cfg")
    out = Path(args.out) if args.out else (Path("outputs/toy2d_distillers_quick") if args.quick
                                           else RESULTS / "toy2d_distillers")
    out.parent.mkdir(parents=True, exist_ok=True)
    return run(cfg_, columns, PAPER + NEW + ("nfsd_weakneg",), out)


if __name__ == "__main__":
    main()
