"""Runner of the 2D studies (benchmarks/toy2d.py, `diffsolve toy`): resumable, and its output folder is a
`diffsolve.runs.RunFolder` that one run owns (a lock), that keeps the options it was started with (a re-run
with others is refused) and the sha256 of everything it wrote (a damaged file is recomputed, with a warning).

Layout of the output folder (`--out`):
    toy2d.run.json, toy2d.manifest.jsonl        the options; the checksum of every artifact below
    toy2d_points/<data>_<column>_<method>.npy   the final points of one run, and beside it its record (.json)
    toy2d_parts/{efficiency,landscapes}_<data>_<column>.json, toy2d_parts/training_<data>.json
    toy2d.json, toy2d.md                        derived: rebuilt on every call from the parts that verify
"""
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffsolve._io import atomic_write, write_json
from diffsolve.runs import ArgumentParser, RunError, RunFolder, at_least, check_writable, environment
from .._parts import load_run, note_damaged, previous_config, save_run
from . import study
from .tables import PAPER_KEYS, markdown_tables, paper_tables  # noqa: F401 - part of this module's interface

NAME = "toy2d"
QUICK = dict(grid=16, data_points=2000, n_mc=1, steps=40, lr=0.08, ideal_steps=10, chain_steps=8)
QUICK_SCALE, QUICK_K = 0.05, 8  # training iterations (fraction of the recipe), efficiency estimates per point
# measured with OMP_NUM_THREADS=1 on a 2-core x86 server at load 10-16 (CPU time; the wall time was 3-4x more)
QUICK_TIME = ("--datasets fractal about 50 s of CPU time with a cold model cache (training its three quick models "
              "included); the three data sets take longer (the spiral and pinwheel quick models train on 10^4-point "
              "KDEs)")


def quick_note(cfg, iterations_scale):
    """What a quick run is, for its figure."""
    full = study.StudyConfig()
    return (f"QUICK MODE: {cfg.grid}x{cfg.grid} grid (full {full.grid}x{full.grid}), {cfg.steps} Adam steps "
            f"(full {full.steps}), {cfg.ideal_steps} ideal GD steps, {cfg.chain_steps}-step chains, "
            f"{cfg.data_points} data points, models trained {iterations_scale:.0%} of the recipe: the study's "
            "behaviour in kind, not its numbers")


def save_json(path, data):
    write_json(path, data)


def save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def folder_config(cfg, iterations_scale, efficiency_k):
    """What a run folder's results depend on: the study's options and the environment (thread count...)."""
    return {**study.config_dict(cfg), "iterations_scale": iterations_scale, "efficiency_k": efficiency_k,
            **environment()}


def open_folder(out_dir, cfg, iterations_scale=1.0, efficiency_k=64):
    """The (unopened) RunFolder of a study; a toy2d.json left by an older version must agree with cfg."""
    return RunFolder(out_dir, NAME, folder_config(cfg, iterations_scale, efficiency_k),
                     previous=previous_config(Path(out_dir) / f"{NAME}.json", "iterations_scale"))


def _points(name, column, method):
    return f"toy2d_points/{name}_{column}_{method}"


def _part(kind, key):
    return f"toy2d_parts/{kind}_{key.replace('/', '_')}.json"


def collect(folder, cfg, iterations_scale):
    """The results dict (as toy2d.json holds it) from the parts of `folder` that verify."""
    results = {"config": study.config_dict(cfg), "iterations_scale": iterations_scale, "runs": {},
               "efficiency": {}, "training_seconds": {}, "landscapes": {}}
    for name, columns in study.COLUMNS.items():
        seconds = folder.read_json(_part("training", name))
        if seconds is not None:
            results["training_seconds"][name] = seconds
        for column in columns:
            for method in study.METHODS:
                key = f"{name}/{column}/{method}"
                record = load_run(folder, _points(name, column, method), key, (cfg.grid ** 2, 2))
                if record is not None:
                    results["runs"][key] = record
            for kind in ("efficiency", "landscapes"):
                part = folder.read_json(_part(kind, f"{name}/{column}"))
                if part is not None:
                    results[kind][f"{name}/{column}"] = part
    return results


def run(datasets, cfg, out_dir, cache_dir=None, iterations_scale=1.0, efficiency_k=64, progress=True,
        landscapes=True, folder=None):
    """All runs of the study in `out_dir`, resuming from the parts there that verify; `folder`: an open
    RunFolder of out_dir (else one is opened and held for the call)."""
    if folder is None:
        with open_folder(out_dir, cfg, iterations_scale, efficiency_k) as folder:
            return run(datasets, cfg, out_dir, cache_dir, iterations_scale, efficiency_k, progress, landscapes,
                       folder)
    json_path = folder.root / f"{NAME}.json"
    results = collect(folder, cfg, iterations_scale)
    note_damaged(json_path)
    torch.manual_seed(cfg.seed)
    for name in datasets:
        ds = study.load_dataset(name, cache_dir, progress, iterations_scale, cfg.data_points)
        results["training_seconds"][name] = {k: m.train_seconds for k, m in ds["models"].items()}
        folder.write_json(_part("training", name), results["training_seconds"][name])
        for column in study.COLUMNS[name]:
            model, transforms, inversion = study.column_model(ds, column, cfg)
            for method in study.METHODS:
                key = f"{name}/{column}/{method}"
                if key in results["runs"]:
                    continue
                gen = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                if method == "ddim":
                    pts, nfe, start = study.ddim_samples(model, transforms, cfg.grid ** 2, cfg, gen, return_start=True)
                    log = []
                else:
                    steps = cfg.ideal_steps if column == "ideal" else cfg.steps
                    start = study.grid_points(cfg.grid)
                    with tqdm(total=steps, desc=key, disable=not progress, leave=False) as bar:
                        pts, nfe, log = study.optimise(method, model, transforms, inversion, column, start, cfg,
                                                       gen, bar)
                seconds = time.perf_counter() - t0
                entry = {"seconds": seconds, "nfe_per_step": nfe, "metrics": study.evaluate(pts, ds),
                         "mode_distance": {"start": study.mode_distance(start, ds), "end": study.mode_distance(pts, ds)},
                         "grad_norm_log": [r["grad_norm"] for r in log]}
                save_run(folder, _points(name, column, method), key, entry, pts.numpy())
                results["runs"][key] = entry
                save_json(json_path, results)
                if progress:
                    m = entry["metrics"]
                    print(f"{key}: {seconds:.1f}s NLL {m['nll']:.2f} P {m['precision']:.2f} R {m['recall']:.2f}")
            if column in ("ideal", "learned") and f"{name}/{column}" not in results["efficiency"]:
                pts = study.grid_points(max(2, cfg.grid // 8))
                oracle = study.oracle_gradient(ds, pts, cfg)
                results["efficiency"][f"{name}/{column}"] = {
                    m: study.efficiency_points(m, model, transforms, inversion, column, cfg, oracle, pts, efficiency_k)
                    for m in study.METHODS[1:]}
                folder.write_json(_part("efficiency", f"{name}/{column}"), results["efficiency"][f"{name}/{column}"])
                save_json(json_path, results)
            if landscapes and f"{name}/{column}" not in results["landscapes"]:
                results["landscapes"][f"{name}/{column}"] = {
                    m: study.landscape(m, model, transforms, inversion, column, cfg, n=32 if cfg.grid > 16 else 8,
                                       k=8).tolist() for m in study.METHODS[1:]}
                folder.write_json(_part("landscapes", f"{name}/{column}"), results["landscapes"][f"{name}/{column}"])
                save_json(json_path, results)
    return results


def _parser():
    p = ArgumentParser(prog="diffsolve toy", description="The paper's 2D studies (Tables 1-3, Figs 1-3).")
    p.add_argument("--quick", action="store_true", help=f"tiny settings, for tests and a first look: {QUICK_TIME}")
    p.add_argument("--datasets", default="fractal,spiral,pinwheel", help="comma-separated data sets")
    p.add_argument("--out", default=None, help="results folder, relative to the current folder (default: "
                   "outputs/toy, with --quick outputs/toy/quick)")
    p.add_argument("--figures", default=None, help="figures folder (default: <out>/figures)")
    p.add_argument("--cache", default=None, help="model cache (default: $DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    p.add_argument("--paper", default=None, help="the paper's tables as JSON (default: the copy shipped in "
                   "diffsolve_studies/data)")
    p.add_argument("--grid", type=at_least(2), default=None, help="points per axis of the optimised grid, >= 2 "
                   f"(default: {study.StudyConfig.grid}, with --quick {QUICK['grid']})")
    p.add_argument("--n-mc", type=at_least(1), default=None, help="Monte Carlo estimates per point and gradient, "
                   f">= 1 (default: {study.StudyConfig.n_mc}, with --quick {QUICK['n_mc']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no line per run")
    p.add_argument("--tables-only", action="store_true", help="re-render tables and figures from the results in "
                   "--out (whatever options made them); computes nothing")
    return p


def _stored_config(config):
    names = {f.name for f in fields(study.StudyConfig)}
    return study.StudyConfig(**{k: v for k, v in config.items() if k in names})


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    cfg = replace(study.StudyConfig(), **QUICK) if a.quick else study.StudyConfig()
    cfg = replace(cfg, **{k: v for k, v in (("grid", a.grid), ("n_mc", a.n_mc)) if v is not None})
    datasets = [d for d in a.datasets.split(",") if d]
    for d in datasets:
        if d not in study.COLUMNS:
            p.error(f"--datasets: unknown data set {d!r}; choose from {', '.join(study.COLUMNS)}")
    if not datasets:
        p.error("--datasets is empty")
    scale, k = (QUICK_SCALE, QUICK_K) if a.quick else (1.0, 64)
    out = Path(a.out) if a.out else Path("outputs/toy/quick" if a.quick else "outputs/toy")
    figures = Path(a.figures) if a.figures else out / "figures"
    from .train import default_cache_dir
    try:
        paper = json.loads(Path(a.paper).read_text()) if a.paper else paper_tables()
    except (OSError, ValueError) as err:
        p.error(f"--paper {a.paper}: {err}")
    try:
        check_writable(out, "--out")
        check_writable(figures, "--figures")
        if not a.tables_only:
            check_writable(Path(a.cache) if a.cache else default_cache_dir(), "--cache")
        folder = (RunFolder(out, NAME, None) if a.tables_only else open_folder(out, cfg, scale, k)).open()
    except RunError as err:
        p.error(str(err))
    with folder:
        if a.tables_only:
            cfg = _stored_config(folder.config)
            results = collect(folder, cfg, folder.config.get("iterations_scale"))
        else:
            t0 = time.perf_counter()
            results = run(datasets, cfg, out, a.cache, scale, k, not a.no_progress, landscapes=True, folder=folder)
            results["seconds_total"] = time.perf_counter() - t0
            save_json(out / f"{NAME}.json", results)
        if paper:
            md = markdown_tables(results, paper)
            save_text(out / f"{NAME}.md", md)
            print(md)
        try:
            from .figures import study_figures
            note = quick_note(cfg, scale) if a.quick else None
            for path in study_figures(results, datasets, out, figures, a.cache, scale, cfg, note):
                print(f"figure: {path}")
        except ImportError as e:
            print(f"figures skipped: {e}")
    print(f"total {results.get('seconds_total', 0):.0f}s; results in {out / f'{NAME}.json'}")
    return results


if __name__ == "__main__":
    main()
