"""MSD's estimators of the mean-shift gradient on the learned 2D models, at equal model-call budgets,
and the adaptive bandwidth against linear decay (docs/results.md, "MSD estimators on the learned models").

Every estimator is an `MSD(...)` built here and run through the 2D study's own loop
(`diffsolve_studies.toy.study.optimise(..., distiller=)`, Adam, lr 0.08) from the same grid of points, and
judged by the study's `evaluate` (NLL under the analytic density, precision / recall, MMD).

Equal calls (the rule, the same for every estimator): each run spends BUDGET model evaluations per point
(a guided evaluation counts its 2 calls in the measured totals, the same factor for every estimator of a
column); an estimator costing c evaluations per estimate takes BUDGET / c optimisation steps with one
estimate per point and step. The bandwidth schedule runs over the estimator's own step count, so every
estimator sees the same bandwidth at the same fraction of its budget.

The estimators (fixed before any run; `ESTIMATORS`, also used by benchmarks/digits_msd.py):
  kernel chain (sampler "kernel", split face, DDIM eta 1), eta-matched or literal eq. 15 flow; every chain step
  is run (skip_tol = 0) so that its cost is its step count; posterior chain (reverse SDE from z = x at
  s = lambda / sqrt 2) with DDIM eta 1 or DPM++ 2M SDE eta 1; the kernel-exact exponential integrator
  ("kernel_exp", orders 1-3, eta 1 like the other chains: the product's reverse SDE with its linear part exact)
  when the registry has it; each at 4 and 16 evaluations per estimate; and the
  one-call estimator x - D(x; lambda / sqrt 2).
Schedules: linear decay lambda_0 (1 - k / K) held at >= 1e-2 (the paper's lambda_1), and
`AdaptiveBandwidth(lambda_0, factor 0.7, ratio 0.05, floor 1e-2)` (the digits study's constants).

    python benchmarks/msd_learned.py            # -> benchmarks/results/msd_learned.json, docs/figures/msd_learned.png
    python benchmarks/msd_learned.py --quick --out /tmp/q.json --cache /tmp/cache   # tiny models, seconds
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, write_json_atomic  # noqa: E402

from diffsolve.distill import MSD, AdaptiveBandwidth, linear_decay  # noqa: E402
from diffsolve.solvers import SOLVERS, solver_factory  # noqa: E402
from diffsolve_studies.toy import study  # noqa: E402

CALLS = (4, 16)               # model evaluations per estimate of the chain estimators
LAM_FLOOR = 1e-2              # the paper's lambda_1: both schedules stay at or above it
ADAPTIVE = dict(factor=0.7, ratio=0.05)
ADAPTIVE_ESTIMATORS = ("kernel_matched_16", "posterior_ddim_16", "one_call")
COLUMNS = {"fractal": ("learned", "cfg", "autoguidance"), "spiral": ("learned",), "pinwheel": ("learned",)}
FULL = dict(grid=16, budget=400, datasets=("fractal",))
FULL_STUDY = dict(data_points=2000)  # the metrics' reference samples (kNN precision / recall is quadratic in them)
QUICK = dict(grid=4, budget=32, datasets=("fractal",))
QUICK_STUDY = dict(data_points=500)


def kernel_exp_orders():
    """The orders of the kernel-exact exponential integrator to run: (1, 2, 3) when the registry has
    "kernel_exp" and its factory takes `order`, else ()."""
    if "kernel_exp" not in SOLVERS:
        return ()
    import inspect
    return (1, 2, 3) if "order" in inspect.signature(solver_factory("kernel_exp")).parameters else ()


def estimators(kernel_exp=None):
    """name -> {"options": MSD keyword options, "evals": model evaluations per estimate (unguided count)}."""
    out = {}
    for n in CALLS:
        chain = dict(steps=n, skip_tol=0.0)
        out[f"kernel_matched_{n}"] = dict(options=dict(sampler="kernel", face="split", flow="matched", solver="ddim",
                                                       eta=1.0, **chain), evals=n)
        out[f"kernel_literal_{n}"] = dict(options=dict(sampler="kernel", face="split", flow="literal", solver="ddim",
                                                       eta=1.0, **chain), evals=n)
        out[f"posterior_ddim_{n}"] = dict(options=dict(sampler="posterior", solver="ddim", **chain), evals=n)
        out[f"posterior_dpmpp_2m_sde_{n}"] = dict(options=dict(sampler="posterior", solver="dpmpp_2m_sde", **chain),
                                                  evals=n)
        for order in (kernel_exp_orders() if kernel_exp is None else kernel_exp):
            out[f"kernel_exp{order}_{n}"] = dict(options=dict(sampler="kernel", face="split", solver="kernel_exp",
                                                              solver_options={"order": order, "eta": 1.0}, **chain),
                                                     evals=n)
    out["one_call"] = dict(options=dict(sampler="one_call"), evals=1)
    return out


def build_msd(model, spec, lam0, schedule, **common):
    """The MSD of one estimator spec (a registry solver with options of its own is instantiated here)."""
    options = dict(spec["options"])
    solver_options = options.pop("solver_options", None)
    if solver_options is not None:
        options["solver"] = solver_factory(options["solver"])(**solver_options)
    return MSD(model, lam0, schedule=schedule, n_samples=1, **options, **common)


def make_schedule(kind, lam0, steps):
    """linear: lambda_0 (1 - k / K), at least LAM_FLOOR; adaptive: AdaptiveBandwidth with the fixed constants."""
    if kind == "linear":
        decay = linear_decay(lam0, steps)
        return lambda k, m=None: max(decay(k, m), LAM_FLOOR)
    if kind == "adaptive":
        return AdaptiveBandwidth(lam0, floor=LAM_FLOOR, **ADAPTIVE)
    raise ValueError(f"schedule must be 'linear' or 'adaptive', got {kind!r}")


def plan(specs):
    """(estimator, schedule) pairs: every estimator with linear decay, ADAPTIVE_ESTIMATORS also adaptive."""
    return [(e, "linear") for e in specs] + [(e, "adaptive") for e in ADAPTIVE_ESTIMATORS if e in specs]


def run_one(ds, column, name, spec, schedule, cfg, budget, steps_for=None):
    """One optimisation; returns its record. `steps_for(budget, evals)` is the equal-calls rule."""
    steps = (steps_for or steps_for_budget)(budget, spec["evals"])
    model, transforms, inversion = study.column_model(ds, column, cfg)
    cfg_k = replace(cfg, steps=steps, n_mc=1)
    msd = build_msd(model, spec, cfg.lam0, make_schedule(schedule, cfg.lam0, steps), sigma_min=cfg.sigma_min,
                    sigma_max=cfg.sigma_max, transforms=transforms)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    pts, nfe_per_step, log = study.optimise("msd", model, transforms, inversion, column,
                                            study.grid_points(cfg.grid), cfg_k, gen, distiller=msd)
    return {"estimator": name, "schedule": schedule, "column": column, "steps": steps,
            "calls_per_point": nfe_per_step * steps, "calls_per_estimate": nfe_per_step,
            "final_lambda": msd.bandwidth, "metrics": study.evaluate(pts, ds), "seconds": time.perf_counter() - t0,
            "points": pts.tolist() if cfg.grid <= 32 else None}


BIAS_LAMBDAS, BIAS_GRID, BIAS_DRAWS = (0.316, 0.05), 4, 32


@torch.no_grad()
def exact_bias(specs, seed=0):
    """Each estimator with the exact fractal (class A) mixture denoiser in place of the learned model: relative
    bias mean |E g - g*| / mean |g*| against the oracle g* = x - D*(x; lambda / sqrt 2) on a BIAS_GRID^2 grid
    (BIAS_DRAWS draws per point), at the initial and a late bandwidth: what the estimator itself contributes."""
    from diffsolve.distill import mean_shift_oracle
    from diffsolve_studies.toy.datasets import fractal_tree
    density, x = fractal_tree("A"), study.grid_points(BIAS_GRID)
    out = {}
    for name, spec in specs.items():
        k = 1 if spec["options"]["sampler"] == "one_call" else BIAS_DRAWS
        for lam in BIAS_LAMBDAS:
            msd = build_msd(density, spec, lam, None, sigma_min=0.002, sigma_max=5.0)
            g = msd.grad(x.repeat_interleave(k, 0), torch.Generator().manual_seed(seed)).reshape(len(x), k, 2)
            oracle = mean_shift_oracle(density, x.double(), lam).float()
            out[f"{name}/lambda {lam:g}"] = {"estimator": name, "lambda": lam, "draws": k,
                                             "relative_bias": float((g.mean(1) - oracle).norm(dim=1).mean()
                                                                    / oracle.norm(dim=1).mean()),
                                             "max_norm": float(g.norm(dim=-1).max())}
    return out


def steps_for_budget(budget, evals):
    """The equal-calls rule: BUDGET / (evaluations per estimate) steps."""
    if budget % evals:
        raise ValueError(f"budget {budget} is not a multiple of {evals} evaluations per estimate")
    return budget // evals


def settings(cfg, budget, datasets, specs, quick):
    return {"study_config": asdict(cfg), "budget_evals_per_point": budget, "datasets": list(datasets),
            "columns": {d: list(COLUMNS[d]) for d in datasets}, "calls_per_estimate": list(CALLS),
            "lambda_floor": LAM_FLOOR, "adaptive": {**ADAPTIVE, "lam0": cfg.lam0, "floor": LAM_FLOOR},
            "adaptive_estimators": list(ADAPTIVE_ESTIMATORS), "quick": quick,
            "exact_bias": {"lambdas": list(BIAS_LAMBDAS), "grid": BIAS_GRID, "draws": BIAS_DRAWS,
                           "denoiser": "exact fractal class-A mixture", "sigma_range": [0.002, 5.0]},
            "estimators": {k: {"options": v["options"], "evals": v["evals"]} for k, v in specs.items()},
            "rule": "every run spends budget_evals_per_point model evaluations per point (guided ones count "
                    "2 calls in calls_per_point, for every estimator of the column alike): an estimator of c "
                    "evaluations per estimate takes budget / c Adam steps, one estimate per point and step",
            "reductions": "tiny models, 4 x 4 grid, budget 32 (quick mode)" if quick else
                          "grid 16 x 16 (the study: 64 x 64), 400 evaluations per point (the study's MSD: "
                          "about 150 x 2 x 24 = 7,200) and 2,000 reference samples for the metrics (the study: "
                          "10,000) to fit 20 minutes on the 2 shared cores"}


def run(out, quick=False, cache=None, datasets=None, progress=True, steps_for=None):
    size = QUICK if quick else FULL
    cfg = replace(study.StudyConfig(), grid=size["grid"], **(QUICK_STUDY if quick else FULL_STUDY))
    datasets = tuple(datasets or size["datasets"])
    specs = estimators()
    config = settings(cfg, size["budget"], datasets, specs, quick)
    out = Path(out)
    results = {"benchmark": "msd_learned", "config": config, "runs": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("config", {}).get("study_config") == config["study_config"] and \
                old["config"]["budget_evals_per_point"] == size["budget"]:
            results["runs"] = old.get("runs", {})  # resume: same settings (new estimators add rows)
    t_all = time.perf_counter()
    for name in datasets:
        ds = study.load_dataset(name, cache, progress=False, iterations_scale=0.01 if quick else 1.0,
                                data_points=cfg.data_points)
        for column in COLUMNS[name]:
            for est, schedule in plan(specs):
                key = f"{name}/{column}/{est}/{schedule}"
                if key in results["runs"]:
                    continue
                rec = run_one(ds, column, est, specs[est], schedule, cfg, size["budget"], steps_for)
                results["runs"][key] = rec
                write_json_atomic(out, {**results, "machine": machine_info()})
                if progress:
                    m = rec["metrics"]
                    print(f"{key}: {rec['seconds']:.1f}s calls {rec['calls_per_point']:.0f} NLL {m['nll']:.3f} "
                          f"P {m['precision']:.3f} R {m['recall']:.3f}", flush=True)
    if not quick:
        results["exact_bias"] = exact_bias(specs)
    results["seconds_this_call"] = time.perf_counter() - t_all
    results["machine"] = machine_info()
    write_json_atomic(out, results)
    return results


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    rows = sorted({(k.split("/")[0], k.split("/")[1]) for k in runs}, key=lambda r: list(COLUMNS[r[0]]).index(r[1]))
    names = [e for e in results["config"]["estimators"]] + [f"{e}/adaptive" for e in ADAPTIVE_ESTIMATORS]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(1.6 * len(names), 1.8 * len(rows)), squeeze=False)
    for i, (d, c) in enumerate(rows):
        for j, n in enumerate(names):
            ax = axes[i][j]
            key = f"{d}/{c}/{n}" if "/" in n else f"{d}/{c}/{n}/linear"
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5)
            if key in runs and runs[key]["points"] is not None:
                p = torch.tensor(runs[key]["points"])
                ax.scatter(p[:, 0], p[:, 1], s=0.5, c="k")
                ax.set_title(f"{n.replace('_', ' ')}\nNLL {runs[key]['metrics']['nll']:.2f}", fontsize=5)
            if j == 0:
                ax.set_ylabel(f"{d} {c}", fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown_rows(results, dataset="fractal"):
    """The doc table: one row per (estimator, schedule), NLL / precision / recall per column, as printed."""
    runs, cols = results["runs"], results["config"]["columns"][dataset]
    rows = []
    for est, schedule in plan(results["config"]["estimators"]):
        recs = [runs.get(f"{dataset}/{c}/{est}/{schedule}") for c in cols]
        if all(r is None for r in recs):
            continue
        first = next(r for r in recs if r is not None)
        row = [est.replace("_", " "), schedule, str(first["steps"])]
        for r in recs:
            row += ["-"] * 3 if r is None else [f"{r['metrics']['nll']:.2f}", f"{r['metrics']['precision']:.3f}",
                                                f"{r['metrics']['recall']:.3f}"]
        rows.append(row)
    return rows


def bias_rows(results):
    """The exact-denoiser bias table: estimator, relative bias at each of BIAS_LAMBDAS."""
    rows = {}
    for rec in results.get("exact_bias", {}).values():
        rows.setdefault(rec["estimator"], [rec["estimator"].replace("_", " ")]).append(f"{rec['relative_bias']:.3f}")
    return list(rows.values())


def markdown(results, dataset="fractal"):
    cols = results["config"]["columns"][dataset]
    head = ["estimator", "schedule", "steps"] + [f"{c} {m}" for c in cols for m in ("NLL", "P", "R")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in markdown_rows(results, dataset)]
    if results.get("exact_bias"):
        head = ["estimator (exact denoiser)"] + [f"relative bias, lambda {lam:g}" for lam in BIAS_LAMBDAS]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in bias_rows(results)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models (toy iterations_scale 0.01), 4 x 4 grid, "
                   "budget 32: seconds")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/msd_learned.json; "
                   "--quick: outputs/msd_learned_quick.json)")
    p.add_argument("--figure", default=None, help="figure path (default: docs/figures/msd_learned.png; "
                   "--quick: none)")
    p.add_argument("--cache", default=None, help="model cache (default: $DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    p.add_argument("--datasets", default=None, help="comma-separated (default: fractal)")
    p.add_argument("--markdown", action="store_true", help="print the doc table from the JSON and stop")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else (Path("outputs/msd_learned_quick.json") if a.quick else RESULTS / "msd_learned.json")
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run(out, a.quick, a.cache, a.datasets.split(",") if a.datasets else None)
    fig = Path(a.figure) if a.figure else (None if a.quick else ROOT / "docs" / "figures" / "msd_learned.png")
    if fig is not None:
        print(f"figure: {figure(results, fig)}")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
