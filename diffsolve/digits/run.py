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

from .._io import atomic_write, write_json
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
    ref = {"classifier": models["classifier"], "heldout_x": dequantize(split.heldout_images, g),
           "heldout_labels": split.heldout_labels, "train_x": dequantize(split.train_images, g),
           "train_labels": split.train_labels}
    return split, models, ref


def testbed_checks(models, ref, cfg):
    """Is the testbed strong enough to judge anything? Classifier accuracy on held-out images, the model's
    held-out NLL, and the data's own numbers at the study's sample size (the floor of the Fréchet
    distance; the nearest-training-image distance of unseen real images)."""
    clf = ref["classifier"]
    with torch.no_grad():
        acc = float((clf(ref["heldout_x"]).argmax(1) == ref["heldout_labels"]).float().mean())
    labels = study.labels_for(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    pick = torch.cat([torch.nonzero(ref["train_labels"] == c).flatten()[
        torch.randperm(int((ref["train_labels"] == c).sum()), generator=g)[:cfg.particles_per_class]]
        for c in range(10)])
    floor = study.measure(ref["train_x"][pick], labels, ref)
    pick_h = torch.cat([torch.nonzero(ref["heldout_labels"] == c).flatten()[:cfg.particles_per_class] for c in range(10)])
    heldout = study.measure(ref["heldout_x"][pick_h], ref["heldout_labels"][pick_h], ref)
    nll = nll_bpp(models["main"], ref["heldout_x"], ref["heldout_labels"], steps=cfg.nll_steps,
                  sigma_max=cfg.sigma_max, probes=2, generator=torch.Generator().manual_seed(cfg.seed + 5))
    return {"classifier_heldout_accuracy": acc, "heldout_nll_bpp": nll,
            "train_subset_vs_heldout": floor, "heldout_subset": heldout,
            "uniform_nll_bpp": float(np.log2(17))}


def _slug(key):
    return re.sub(r"[^A-Za-z0-9.]+", "_", key)


def run_study(cfg, training, out_dir, cache_dir=None, progress=True, json_name="digits.json", only=None):
    """All runs of `study.plan(cfg)` (or those whose key contains `only`); resumes from the JSON when its
    config matches; writes the JSON after every run and the final images as .npy beside it."""
    out_dir = Path(out_dir)
    json_path, img_dir = out_dir / json_name, out_dir / (Path(json_name).stem + "_images")
    t0 = time.perf_counter()
    split, models, ref = load_testbed(training, cache_dir, progress, cfg.seed)
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
    runs = [r for r in study.plan(cfg) if only is None or only in r.key]
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
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = study.quick_config() if args.quick else study.DigitsConfig()
    if args.budget is not None:
        if args.budget < 1:
            raise SystemExit(f"--budget must be >= 1, got {args.budget}")
        cfg = replace(cfg, budget=args.budget)
    training = QUICK_TRAINING if args.quick else FULL_TRAINING
    out = Path(args.out) if args.out else (Path("outputs/digits-quick") if args.quick else ROOT / "benchmarks" / "results")
    cache = Path(args.cache_dir) if args.cache_dir else None
    results = run_study(cfg, training, out, cache, not args.no_progress, only=args.only,
                        json_name="digits-quick.json" if args.quick else "digits.json")
    from .report import write_report
    write_report(results, out, figures=not args.no_figures,
                 fig_dir=(out / "figures") if args.quick or args.out else ROOT / "docs" / "figures")
    return results
