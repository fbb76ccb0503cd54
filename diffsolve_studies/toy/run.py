"""Runner of the 2D studies: resumable, every result written atomically (benchmarks/toy2d.py, `diffsolve toy`)."""
import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsolve._io import atomic_write, write_json
from . import study

PAPER_KEYS = {"ideal": 0, "learned": 1, "cfg": 2, "autoguidance": 3}
QUICK = dict(grid=8, data_points=500, n_mc=1, steps=4, ideal_steps=2, chain_steps=8)


def save_json(path, data):
    write_json(path, data)


def save_npy(path, array):
    atomic_write(path, lambda f: np.save(f, array))


def save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def run(datasets, cfg, out_dir, cache_dir=None, iterations_scale=1.0, efficiency_k=64, progress=True,
        landscapes=True):
    """All runs of the study; resumes from `out_dir/toy2d.json` when its config matches."""
    out_dir = Path(out_dir)
    json_path = out_dir / "toy2d.json"
    results = {"config": study.config_dict(cfg), "iterations_scale": iterations_scale, "runs": {},
               "efficiency": {}, "training_seconds": {}, "landscapes": {}}
    if json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("config") == results["config"] and old.get("iterations_scale") == iterations_scale:
            results = old
    torch.manual_seed(cfg.seed)
    for name in datasets:
        ds = study.load_dataset(name, cache_dir, progress, iterations_scale, cfg.data_points)
        results["training_seconds"][name] = {k: m.train_seconds for k, m in ds["models"].items()}
        for column in study.COLUMNS[name]:
            model, transforms, inversion = study.column_model(ds, column, cfg)
            for method in study.METHODS:
                key = f"{name}/{column}/{method}"
                npy = out_dir / "toy2d_points" / f"{name}_{column}_{method}.npy"
                if key in results["runs"] and npy.exists():
                    continue
                gen = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                if method == "ddim":
                    pts, nfe = study.ddim_samples(model, transforms, cfg.grid ** 2, cfg, gen)
                    log = []
                else:
                    steps = cfg.ideal_steps if column == "ideal" else cfg.steps
                    with tqdm(total=steps, desc=key, disable=not progress, leave=False) as bar:
                        pts, nfe, log = study.optimise(method, model, transforms, inversion, column,
                                                       study.grid_points(cfg.grid), cfg, gen, bar)
                seconds = time.perf_counter() - t0
                save_npy(npy, pts.numpy())
                results["runs"][key] = {"seconds": seconds, "nfe_per_step": nfe, "metrics": study.evaluate(pts, ds),
                                        "grad_norm_log": [r["grad_norm"] for r in log]}
                save_json(json_path, results)
                if progress:
                    m = results["runs"][key]["metrics"]
                    print(f"{key}: {seconds:.1f}s NLL {m['nll']:.2f} P {m['precision']:.2f} R {m['recall']:.2f}")
            if column in ("ideal", "learned") and f"{name}/{column}" not in results["efficiency"]:
                pts = study.grid_points(max(2, cfg.grid // 8))
                oracle = study.oracle_gradient(ds, pts, cfg)
                results["efficiency"][f"{name}/{column}"] = {
                    m: study.efficiency_points(m, model, transforms, inversion, column, cfg, oracle, pts, efficiency_k)
                    for m in study.METHODS[1:]}
                save_json(json_path, results)
            if landscapes and f"{name}/{column}" not in results["landscapes"]:
                results["landscapes"][f"{name}/{column}"] = {
                    m: study.landscape(m, model, transforms, inversion, column, cfg, n=32 if cfg.grid > 16 else 8,
                                       k=8).tolist() for m in study.METHODS[1:]}
                save_json(json_path, results)
    return results


def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def paper_tables():
    """The paper's Tables 1-3 as data (a copy of shared/data/paper_tables.json shipped with the package)."""
    from importlib.resources import files
    return json.loads(files("diffsolve_studies").joinpath("data/paper_tables.json").read_text())


def markdown_tables(results, paper):
    """Our numbers beside the paper's, one table per data set and metric."""
    lines = []
    for name in ("fractal", "spiral", "pinwheel"):
        cols = [c for c in study.COLUMNS[name] if any(k.startswith(f"{name}/{c}/") for k in results["runs"])]
        if not cols:
            continue
        table = paper["table1_fractal"] if name == "fractal" else paper["table2_unconditional"][name]
        for metric, paper_key, digits in (("nll", "nll", 2), ("precision", "precision", 2), ("recall", "recall", 2),
                                          ("mmd_biased_e4", "mmd_x1e4", 2), ("mmd_unbiased_e4", None, 2)):
            lines += [f"\n**{name}: {metric}** (ours / paper)\n", "| method | " + " | ".join(cols) + " |",
                      "|---|" + "---|" * len(cols)]
            for method in study.METHODS:
                cells = []
                for c in cols:
                    run = results["runs"].get(f"{name}/{c}/{method}")
                    ours = _fmt(run["metrics"][metric], digits) if run else "–"
                    theirs = table[paper_key][method][PAPER_KEYS[c]] if paper_key else None
                    cells.append(f"{ours} / {_fmt(theirs, digits)}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["\n**The paper's claim, per column: MSD beats SDS and VSD in NLL and in precision**\n",
              "| data / column | NLL: MSD < SDS, VSD | precision: MSD > SDS, VSD | MSD NLL, abs(ours - paper) | "
              "NLL rank of MSD among SDS/VSD/SDI/MSD (ours / paper) |", "|---|---|---|---|---|"]
    for name in ("fractal", "spiral", "pinwheel"):
        table = paper["table1_fractal"] if name == "fractal" else paper["table2_unconditional"].get(name)
        for c in study.COLUMNS[name]:
            runs = {m: results["runs"].get(f"{name}/{c}/{m}") for m in study.METHODS[1:]}
            if not all(runs.values()):
                continue
            nll = {m: r["metrics"]["nll"] for m, r in runs.items()}
            prec = {m: r["metrics"]["precision"] for m, r in runs.items()}
            paper_nll = {m: table["nll"][m][PAPER_KEYS[c]] for m in runs}
            rank = sorted(nll, key=nll.get).index("msd") + 1
            paper_rank = sorted(paper_nll, key=paper_nll.get).index("msd") + 1
            lines.append(f"| {name}/{c} | {'yes' if nll['msd'] < min(nll['sds'], nll['vsd']) else 'no'} | "
                         f"{'yes' if prec['msd'] > max(prec['sds'], prec['vsd']) else 'no'} | "
                         f"{abs(nll['msd'] - paper_nll['msd']):.2f} | {rank} / {paper_rank} |")
    if results["efficiency"]:
        lines += ["\n**Efficiency (eq. 17), ln(mean efficiency): own mean / oracle / paper**\n",
                  "| data / column | " + " | ".join(study.METHODS[1:]) + " |", "|---|" + "---|" * 4]
        for key, per in results["efficiency"].items():
            name, column = key.split("/")
            paper_row = paper["table3_efficiency_log"][name]
            cells = []
            for m in study.METHODS[1:]:
                own = "deterministic" if per[m]["own_mean"]["deterministic"] else _fmt(per[m]["own_mean"]["log_mean_efficiency"])
                cells.append(f"{own} / {_fmt(per[m]['oracle']['log_mean_efficiency'])} / "
                             f"{_fmt(paper_row[m][0 if column == 'ideal' else 1])}")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="diffsolve toy", description="The paper's 2D studies (Tables 1-3, Figs 1-3).")
    p.add_argument("--quick", action="store_true", help="tiny settings (< 1 minute) for tests")
    p.add_argument("--datasets", default="fractal,spiral,pinwheel")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--cache", default=None, help="model cache (default $DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    p.add_argument("--paper", default=None, help="the paper's tables as JSON (default: the copy shipped in diffsolve_studies/data)")
    p.add_argument("--grid", type=int)
    p.add_argument("--n-mc", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tables-only", action="store_true", help="re-render tables and figures from the saved JSON")
    a = p.parse_args(argv)
    cfg = replace(study.StudyConfig(), **QUICK) if a.quick else study.StudyConfig()
    cfg = replace(cfg, **{k: v for k, v in (("grid", a.grid), ("n_mc", a.n_mc)) if v is not None})
    datasets = [d for d in a.datasets.split(",") if d]
    for d in datasets:
        if d not in study.COLUMNS:
            raise SystemExit(f"unknown dataset {d!r}; choose from {sorted(study.COLUMNS)}")
    if a.tables_only:
        results = json.loads((Path(a.out) / "toy2d.json").read_text())
    else:
        t0 = time.perf_counter()
        results = run(datasets, cfg, a.out, a.cache, 0.01 if a.quick else 1.0, 8 if a.quick else 64,
                      not a.no_progress, landscapes=True)
        results["seconds_total"] = time.perf_counter() - t0
        save_json(Path(a.out) / "toy2d.json", results)
    paper = json.loads(Path(a.paper).read_text()) if a.paper else paper_tables()
    if paper:
        md = markdown_tables(results, paper)
        save_text(Path(a.out) / "toy2d.md", md)
        print(md)
    try:
        from .figures import study_figures
        for path in study_figures(results, datasets, a.out, a.figures, a.cache, 0.01 if a.quick else 1.0, cfg):
            print(f"figure: {path}")
    except ImportError as e:
        print(f"figures skipped: {e}")
    print(f"total {results.get('seconds_total', 0):.0f}s; results in {Path(a.out) / 'toy2d.json'}")
    return results


if __name__ == "__main__":
    main()
