"""Runner of the digits testbed (benchmarks/digits.py, `diffsolve digits`): trains (or loads) the models,
checks the testbed, runs the comparison; resumable, every result written atomically.

    diffsolve digits                 # full study -> benchmarks/results/digits.json, .md, figures
    diffsolve digits --quick         # tiny models and budget: every method runs (seconds)
"""
import argparse
import json
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsolve._io import atomic_write, write_json
from . import study, train
from .data import dequantize, load_digits_split
from .evaluate import nll_bpp

ROOT = Path(__file__).resolve().parents[2]
QUICK_TRAINING = {"denoiser": dict(train.DENOISER, width=32, depth=1, iterations=60),
                  "weak": dict(train.WEAK_DENOISER, width=16, depth=1, iterations=30),
                  "classifier": dict(train.CLASSIFIER, width=32, iterations=60)}
FULL_TRAINING = {"denoiser": train.DENOISER, "weak": train.WEAK_DENOISER, "classifier": train.CLASSIFIER}


def load_testbed(training, cache_dir=None, progress=True, seed=0):
    """The split, the three trained networks and the reference tensors the metrics use."""
    split = load_digits_split(seed=seed)
    models = {"main": train.train_denoiser(split, training["denoiser"], cache_dir, progress),
              "weak": train.train_denoiser(split, training["weak"], cache_dir, progress),
              "classifier": train.train_classifier(split, training["classifier"], cache_dir, progress)}
    g = torch.Generator().manual_seed(seed + 3)
    heldout = dequantize(split.heldout_images, g)
    # alternate held-out images of each class: the FD reference, and unseen real images for the floor
    rank = torch.zeros(len(split.heldout_labels), dtype=torch.long)
    for c in range(10):
        idx = torch.nonzero(split.heldout_labels == c).flatten()
        rank[idx] = torch.arange(len(idx))
    a, b = rank % 2 == 0, rank % 2 == 1
    ref = {"classifier": models["classifier"], "heldout_x": heldout[a], "heldout_labels": split.heldout_labels[a],
           "unseen_x": heldout[b], "unseen_labels": split.heldout_labels[b],
           "train_x": dequantize(split.train_images, g), "train_labels": split.train_labels}
    return split, models, ref


def testbed_checks(models, ref, cfg):
    """Is the testbed strong enough to judge anything? Classifier accuracy on held-out images, the model's
    held-out NLL, and real images measured like generated ones at the study's sample size: unseen
    held-out images (the floor of every metric) and training images (what memorised copies score)."""
    clf = ref["classifier"]
    with torch.no_grad():
        acc = float((clf(ref["unseen_x"]).argmax(1) == ref["unseen_labels"]).float().mean())
    labels, n = study.labels_for(cfg), cfg.particles_per_class
    rows = {}
    for name in ("unseen", "train"):
        x, y = ref[f"{name}_x"], ref[f"{name}_labels"]
        pick = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(10)])
        if len(pick) == len(labels):
            rows[name] = study.measure(x[pick], labels, ref)
            rows[name]["nll_bpp"] = study.likelihood(x[pick], labels, {"main": models["main"]}, cfg)
    nll = nll_bpp(models["main"], ref["unseen_x"], ref["unseen_labels"], steps=cfg.nll_steps,
                  sigma_max=cfg.sigma_max, probes=2, generator=torch.Generator().manual_seed(cfg.seed + 5))
    return {"classifier_heldout_accuracy": acc, "heldout_nll_bpp": nll, "real_images": rows,
            "uniform_nll_bpp": float(np.log2(17))}


def _slug(key):
    return re.sub(r"[^A-Za-z0-9.]+", "_", key)


def run_study(cfg, training, out_dir, cache_dir=None, progress=True, json_name="digits.json", only=None,
              ablations=True):
    """All runs of `study.plan(cfg)` (or those whose key contains `only`); resumes from the JSON when its
    config matches; writes the JSON after every run and the final images as .npy beside it."""
    out_dir = Path(out_dir)
    json_path, img_dir = out_dir / json_name, out_dir / (Path(json_name).stem + "_images")
    t0 = time.perf_counter()
    split, models, ref = load_testbed(training, cache_dir, progress)  # one split and one set of models for every seed
    results = {"name": Path(json_name).stem, "config": json.loads(json.dumps(asdict(cfg))),
               "training": json.loads(json.dumps(training)), "runs": {}}
    if json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("config") == results["config"] and old.get("training") == results["training"]:
            results = old
    results["training_seconds"] = {k: m.train_seconds for k, m in models.items()}
    if "testbed" not in results:
        results["testbed"] = testbed_checks(models, ref, cfg)
        write_json(json_path, results)
    runs = [r for r in study.plan(cfg, ablations=ablations) if only is None or only in r.key]
    for r in tqdm(runs, desc="digits runs", disable=not progress):
        npy = img_dir / f"{_slug(r.key)}.npy"
        if r.key in results["runs"] and npy.exists():
            continue
        start = time.perf_counter()
        labels = study.labels_for(cfg)
        if r.method == "ddim":
            x, nfe = study.ddim_reference(r, models, cfg, torch.Generator().manual_seed(cfg.seed))
            record = {"run": asdict(r), "nfe": nfe, "final": study.measure(x, labels, ref)}
        else:
            with tqdm(total=cfg.budget, desc=r.key, disable=not progress, leave=False) as bar:
                x, record = study.optimise(r, models, ref, cfg, bar)
        if torch.isfinite(x).all():
            record["final"]["nll_bpp"] = study.likelihood(x, labels, models, cfg)
        record["seconds"] = time.perf_counter() - start
        atomic_write(npy, lambda f: np.save(f, x.numpy().astype(np.float16)))
        results["runs"][r.key] = record
        write_json(json_path, results)
    results["study_seconds_this_call"] = time.perf_counter() - t0
    write_json(json_path, results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="diffsolve digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 2 images per class, budget 96 (seconds)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results, or outputs/digits-quick)")
    p.add_argument("--cache-dir", default=None, help="trained models ($DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    p.add_argument("--budget", type=int, default=None, help="model evaluations per image per run")
    p.add_argument("--only", default=None, help="run only the runs whose key contains this text")
    p.add_argument("--seed", type=int, default=0, help="another seed (initial images, noise) of the same "
                   "trained models; writes digits_seed<N>.json and no figures")
    p.add_argument("--main-grid", action="store_true", help="only the DDIM references and the main table's runs")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = study.quick_config() if args.quick else study.DigitsConfig()
    if args.budget is not None:
        if args.budget < 1:
            raise SystemExit(f"--budget must be >= 1, got {args.budget}")
        cfg = replace(cfg, budget=args.budget)
    if args.seed:
        cfg = replace(cfg, seed=args.seed)
    training = QUICK_TRAINING if args.quick else FULL_TRAINING
    out = Path(args.out) if args.out else (Path("outputs/digits-quick") if args.quick else ROOT / "benchmarks" / "results")
    cache = Path(args.cache_dir) if args.cache_dir else None
    name = ("digits-quick" if args.quick else "digits") + (f"_seed{args.seed}" if args.seed else "")
    results = run_study(cfg, training, out, cache, not args.no_progress, only=args.only,
                        json_name=f"{name}.json", ablations=not args.main_grid)
    from .report import write_report
    write_report(results, out, figures=not args.no_figures and not args.seed,
                 fig_dir=(out / "figures") if args.quick or args.out else ROOT / "docs" / "figures")
    return results
