"""MSD's estimators on the digits testbed (64 dimensions) at equal model-call budgets, the adaptive bandwidth
against linear decay, and the one-call estimator's error on off-manifold inputs (docs/digits.md, "MSD
estimators and adaptive bandwidth").

Every estimator is one of benchmarks/msd_learned.py's `estimators()` (the same options on every problem), built
here as an `MSD(...)` with the testbed's chain range (sigma 80 -> 0.002), the study's CFG at w = 3 everywhere
(no §4.3 heuristic: the kernel centre is the iterate, guidance on every level; the heuristics act on the kernel
chain only, so every estimator gets the same model), and run through the testbed's own loop
(`diffsolve_studies.digits.study.optimise(..., distiller=)`), which stops once the distiller has spent the
budget in model calls (a CFG evaluation counts 2): cheaper estimates take more steps. The bandwidth follows the
study's `bandwidth_schedule` on the fraction of the budget spent (log-linear 10^3 -> 10^-3 for the estimator
table; the study's linear (10 -> 10^-3) and adaptive schedules for the schedule rows).

Off-manifold check: at lambda in OFF_LAMBDAS, for real held-out images noised to level s = lambda / sqrt 2 (the
inputs the denoiser was trained on at that level), the same images clean, and the optimisation's start
N(0, 0.5^2), each estimator's gradient (unguided class-conditional model) is compared with the mean of
REF_SAMPLES posterior-chain samples (REF_STEPS DDIM eta 1 steps: the model's own product) and with the exact
mean shift of the training images of the class (`EmpiricalDenoiser`).

    python benchmarks/digits_msd.py          # -> benchmarks/results/digits_msd.json, .md, docs/figures/digits_msd.png
    python benchmarks/digits_msd.py --quick --out /tmp/d.json --cache /tmp/cache   # tiny models, seconds
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, write_json_atomic  # noqa: E402
from msd_learned import build_msd, estimators  # noqa: E402

from diffsolve.analytic import EmpiricalDenoiser  # noqa: E402
from diffsolve_studies.digits import study  # noqa: E402
from diffsolve_studies.digits.run import FULL_TRAINING, QUICK_TRAINING, load_testbed  # noqa: E402

SCALE = 3.0
PARAMS = ("pixels", "mlp")
SCHEDULE_ESTIMATORS = ("kernel_matched_16", "posterior_ddim_16", "one_call")
MLP_ESTIMATORS = ("kernel_matched_4", "kernel_matched_16", "posterior_ddim_4", "one_call")
OFF_LAMBDAS = (0.5, 2.0, 8.0)
OFF_PER_CLASS, REF_SAMPLES, REF_STEPS, OFF_DRAWS = 2, 32, 32, 8
OFF_ESTIMATORS = ("one_call", "kernel_matched_16", "posterior_ddim_16", "posterior_dpmpp_2m_sde_16")
FULL = dict(particles_per_class=8, budget=800, evals=8)  # the study: 16 per class, 3,200 calls, 16 evaluations
TINY_TRAINING = {k: dict(v, iterations=max(5, v["iterations"] // 6)) for k, v in QUICK_TRAINING.items()}


def plan(specs):
    """(parametrisation, estimator, schedule): on pixels every estimator log-linear and SCHEDULE_ESTIMATORS also
    linear and adaptive; on the coordinate MLP the MLP_ESTIMATORS log-linear (fixed before any run)."""
    out = []
    for p in PARAMS:
        if p == "pixels":
            out += [(p, e, "loglinear") for e in specs]
            out += [(p, e, s) for s in ("linear", "adaptive") for e in SCHEDULE_ESTIMATORS if e in specs]
        else:
            out += [(p, e, "loglinear") for e in MLP_ESTIMATORS if e in specs]
    return out


def make_distiller(run, spec, models, cfg):
    """The estimator's MSD with the testbed's options; lambda follows the study's schedule of the budget spent."""
    labels = study.labels_for(cfg)
    d = build_msd(models["main"], spec, cfg.lam_start, None, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                  transforms=study.guidance_transforms(run, models, cfg), extra_args={"class_labels": labels})
    lam_of = study.bandwidth_schedule(run, cfg)
    d.schedule = lambda step, m_norm: lam_of(d.nfe / cfg.budget, m_norm)
    return d


def run_one(param, est, schedule, spec, models, ref, cfg):
    r = study.Run("msd", param, SCALE, "none", schedule, label=est)
    t0 = time.perf_counter()
    x, record = study.optimise(r, models, ref, cfg, distiller=make_distiller(r, spec, models, cfg))
    if torch.isfinite(x).all():
        record["final"]["nll_bpp"] = study.likelihood(x, study.labels_for(cfg), models, cfg)
    record.update(estimator=est, schedule=schedule, param=param, seconds=time.perf_counter() - t0,
                  calls_per_estimate=record["nfe_per_step"])
    return r.key, record


@torch.no_grad()
def off_manifold(models, ref, cfg, specs):
    """Relative error of each estimator's gradient (mean of OFF_DRAWS estimates; one for the deterministic
    one-call) against the model's product mean and against the training images' exact mean shift, per input set."""
    per_class, ref_samples, ref_steps, draws, lambdas = OFF_PER_CLASS, REF_SAMPLES, REF_STEPS, OFF_DRAWS, OFF_LAMBDAS
    g = torch.Generator().manual_seed(cfg.seed + 7)
    pick = torch.cat([torch.nonzero(ref["unseen_labels"] == c).flatten()[:per_class] for c in range(10)])
    x0, labels = ref["unseen_x"][pick], ref["unseen_labels"][pick]
    oracles = {c: EmpiricalDenoiser(ref["train_x"][ref["train_labels"] == c]) for c in range(10)}
    model = models["main"]
    out = {}
    for lam in lambdas:
        s = lam / math.sqrt(2)
        inputs = {"noised real (on-manifold at s)": x0 + s * torch.randn(x0.shape, generator=g),
                  "clean real": x0.clone(),
                  "start N(0, 0.5^2)": 0.5 * torch.randn(x0.shape, generator=g)}
        for name, x in inputs.items():
            exact = torch.empty_like(x)
            for c, den in oracles.items():
                rows = labels == c
                exact[rows] = x[rows] - den(x[rows], s).to(x.dtype)
            ys = MSD_ref(model, lam, ref_steps, ref_samples, labels, cfg).sample_product(x, g)
            reference = x - ys.mean(1)
            se = ys.std(1) / math.sqrt(ref_samples)  # Monte Carlo standard error of the reference, per point
            row = {"ref_mc_rel_se": float(se.norm(dim=1).mean() / reference.norm(dim=1).mean())}
            row["model_ref_vs_exact"] = _rel(reference, exact)
            for est in OFF_ESTIMATORS:
                if est not in specs:
                    continue
                k = 1 if specs[est]["options"]["sampler"] == "one_call" else draws
                d = build_msd(model, specs[est], lam, None, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                              extra_args={"class_labels": labels.repeat_interleave(k, 0)})
                est_g = d.grad(x.repeat_interleave(k, 0), g).reshape(len(x), k, -1).mean(1)
                row[est] = {"vs_model_ref": _rel(est_g, reference), "vs_exact": _rel(est_g, exact), "draws": k}
            out[f"lambda {lam:g}/{name}"] = {"lambda": lam, "inputs": name, **row}
    return out


def MSD_ref(model, lam, steps, n_samples, labels, cfg):  # noqa: N802 - names the reference chain
    """The reference: the posterior chain (DDIM eta 1, `steps` steps from z = x at s), n_samples per point."""
    from diffsolve.distill import MSD
    return MSD(model, lam, sampler="posterior", solver="ddim", steps=steps, n_samples=n_samples,
               sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
               extra_args={"class_labels": labels})


def _rel(a, b):
    """mean |a - b| over mean |b| (per-point Euclidean norms)."""
    return float((a - b).flatten(1).norm(dim=1).mean() / b.flatten(1).norm(dim=1).mean())


def settings(cfg, specs, quick, training):
    return {"study_config": json.loads(json.dumps(asdict(cfg))), "training": json.loads(json.dumps(training)),
            "scale": SCALE, "guidance": "cfg", "heuristics": "none", "params": list(PARAMS),
            "schedule_estimators": list(SCHEDULE_ESTIMATORS), "mlp_estimators": list(MLP_ESTIMATORS),
            "quick": quick,
            "estimators": {k: {"options": v["options"], "evals": v["evals"]} for k, v in specs.items()},
            "off_manifold": {"lambdas": list(OFF_LAMBDAS), "per_class": OFF_PER_CLASS, "ref_samples": REF_SAMPLES,
                             "ref_steps": REF_STEPS, "draws": OFF_DRAWS, "estimators": list(OFF_ESTIMATORS),
                             "model": "unguided class-conditional"},
            "rule": "every run stops once its distiller has spent the budget in model calls per image (a CFG "
                    "evaluation counts 2): an estimator of c calls per estimate takes about budget / c steps; "
                    "the bandwidth is a function of the budget fraction spent",
            "reductions": "tiny models, 2 images per class, budget 64 (quick mode)" if quick else
                          "8 images per class (the study: 16), 800 calls per image (the study: 3,200), 8 metric "
                          "evaluations along a run (the study: 16), the coordinate MLP for MLP_ESTIMATORS only and the "
                          "schedules on pixels only, to fit 20 minutes on the 2 (heavily shared) cores"}


def run(out, quick=False, cache=None, progress=True):
    cfg = replace(study.quick_config(), budget=64, evals=2) if quick else replace(study.DigitsConfig(), **FULL)
    training = TINY_TRAINING if quick else FULL_TRAINING
    specs = estimators()
    config = settings(cfg, specs, quick, training)
    out = Path(out)
    results = {"benchmark": "digits_msd", "config": config, "runs": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("config", {}).get("study_config") == config["study_config"]:
            results["runs"], results["off_manifold"] = old.get("runs", {}), old.get("off_manifold")
    _, models, ref = load_testbed(training, None if cache is None else Path(cache), progress=False)
    t0 = time.perf_counter()
    for param, est, schedule in plan(specs):
        key = study.Run("msd", param, SCALE, "none", schedule, label=est).key
        if key in results["runs"]:
            continue
        key, rec = run_one(param, est, schedule, specs[est], models, ref, cfg)
        results["runs"][key] = rec
        write_json_atomic(out, {**results, "machine": machine_info()})
        if progress:
            f = rec["final"]
            print(f"{key}: {rec['seconds']:.1f}s steps {rec['steps']} calls {rec['nfe']:.0f} FD {f['fd']:.2f} "
                  f"acc {f['accuracy']:.3f} NN {f['nn_train']:.2f} NLL {f.get('nll_bpp', float('nan')):.2f}",
                  flush=True)
    if not results.get("off_manifold") or set(results["off_manifold"]) != _off_keys():
        results["off_manifold"] = off_manifold(models, ref, cfg, specs)
    results["seconds_this_call"] = time.perf_counter() - t0
    results["machine"] = machine_info()
    write_json_atomic(out, results)
    return results


def _off_keys():
    names = ("noised real (on-manifold at s)", "clean real", "start N(0, 0.5^2)")
    return {f"lambda {lam:g}/{n}" for lam in OFF_LAMBDAS for n in names}


COLS = (("fd", "{:.1f}"), ("accuracy", "{:.3f}"), ("nn_train", "{:.2f}"), ("copy_rate", "{:.3f}"),
        ("diversity", "{:.2f}"), ("nll_bpp", "{:.2f}"))


def markdown_rows(results):
    """One row per (parametrisation, estimator, schedule): steps, calls per image, and the final metrics."""
    rows = []
    for rec in results["runs"].values():
        f = rec["final"]
        cells = [fmt.format(f[k]) if f.get(k) is not None and math.isfinite(f[k]) else "-" for k, fmt in COLS]
        rows.append([rec["param"], rec["estimator"].replace("_", " "), rec["schedule"], str(rec["steps"]),
                     f"{rec['nfe']:.0f}", *cells])
    return rows


def off_rows(results):
    rows = []
    for rec in results["off_manifold"].values():
        cells = [f"{rec[e]['vs_model_ref']:.3f} / {rec[e]['vs_exact']:.3f}" if e in rec else "-" for e in OFF_ESTIMATORS]
        rows.append([f"{rec['lambda']:g}", rec["inputs"], f"{rec['model_ref_vs_exact']:.3f}",
                     f"{rec['ref_mc_rel_se']:.3f}", *cells])
    return rows


def markdown(results):
    head = ["param", "estimator", "schedule", "steps", "calls / image", "FD", "accuracy", "NN train", "copies",
            "diversity", "NLL bpp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in markdown_rows(results)]
    head2 = ["lambda", "inputs", "model ref vs exact", "ref MC rel. SE",
             *[f"{e.replace('_', ' ')}: vs ref / vs exact" for e in OFF_ESTIMATORS]]
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    lines += ["| " + " | ".join(r) + " |" for r in off_rows(results)]
    return "\n".join(lines) + "\n"


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in results["runs"].values() if r["schedule"] == "loglinear"]
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, param in enumerate(PARAMS):
        fd = {r["estimator"]: r["final"]["fd"] for r in runs if r["param"] == param}
        axes[0].bar([j + 0.4 * i for j in range(len(names))], [fd.get(n, float("nan")) for n in names], 0.4,
                    label=param)
    axes[0].set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=70, fontsize=7)
    axes[0].set_ylabel("final FD (equal calls)"), axes[0].set_yscale("log"), axes[0].legend()
    for r in results["runs"].values():
        if r["estimator"] in SCHEDULE_ESTIMATORS and r["param"] == "pixels":
            c = r["curve"]
            axes[1].plot([p["nfe"] for p in c], [p["fd"] for p in c], label=f"{r['estimator']} {r['schedule']}",
                         ls={"loglinear": "-", "linear": "--", "adaptive": ":"}[r["schedule"]])
    axes[1].set_xlabel("model calls per image"), axes[1].set_ylabel("FD, pixels"), axes[1].set_yscale("log")
    axes[1].legend(fontsize=6)
    off = results["off_manifold"]
    sets = list(dict.fromkeys(v["inputs"] for v in off.values()))
    for k, name in enumerate(sets):
        vals = [v for v in off.values() if v["inputs"] == name]
        axes[2].plot([v["lambda"] for v in vals], [v["one_call"]["vs_exact"] for v in vals], "o-", label=f"one call, {name}")
        axes[2].plot([v["lambda"] for v in vals], [v["posterior_ddim_16"]["vs_exact"] for v in vals], "s--",
                     color=f"C{k}", label=f"posterior DDIM 16, {name}")
    axes[2].set_xscale("log"), axes[2].set_xlabel("lambda"), axes[2].set_ylabel("relative error vs exact mean shift")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 2 images per class, budget 64: seconds")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/digits_msd.json; --quick: "
                   "outputs/digits_msd_quick.json); the markdown tables go beside it (.md)")
    p.add_argument("--figure", default=None, help="figure (default: docs/figures/digits_msd.png; --quick: none)")
    p.add_argument("--cache", default=None, help="model cache (default: $DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else (Path("outputs/digits_msd_quick.json") if a.quick else RESULTS / "digits_msd.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run(out, a.quick, a.cache)
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    fig = Path(a.figure) if a.figure else (None if a.quick else ROOT / "docs" / "figures" / "digits_msd.png")
    if fig is not None:
        print(f"figure: {figure(results, fig)}")
    print(md)
    return results


if __name__ == "__main__":
    main()
