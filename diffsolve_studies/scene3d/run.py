"""Recipes and loading of the 3-D comparison's models, and the `diffsolve text3d` entry point.

Three trainings (all through `train.py`'s cached, resumable loop; each recipe keys its own cache files):
  - "full": `train.load_models()` (train.PRIOR / WEAK_PRIOR / CLASSIFIER on 512 views per class);
  - "reduced": a smaller prior / classifier on 128 views per class, for a shared two-core machine where the
    full recipe does not finish in time (`REDUCED`; the committed reduced run uses it);
  - "quick": `train.QUICK` (a few iterations: the test suite's plumbing check, not a prior to measure with).
"""
import argparse
from pathlib import Path

from . import train
from .train import CLASSIFIER, PRIOR, cached_renders, train_classifier, train_prior

__all__ = ["REDUCED", "TRAININGS", "load", "main"]

REDUCED = {"data": dict(views_per_class=128, seed=0),
           "prior": dict(PRIOR, channels=(8, 16, 32), iterations=1000, batch=16),
           "weak": dict(PRIOR, channels=(8, 8, 8), iterations=200, batch=16),
           "classifier": dict(CLASSIFIER, width=8, iterations=300, batch=32)}
TRAININGS = ("full", "reduced", "quick")


def recipe(training):
    if training not in TRAININGS:
        raise ValueError(f"training must be one of {TRAININGS}, got {training!r}")
    if training == "full":
        return {"data": train.DATA, "prior": train.PRIOR, "weak": train.WEAK_PRIOR, "classifier": train.CLASSIFIER}
    return train.QUICK if training == "quick" else REDUCED


def load(training, cache_dir=None, progress=True):
    """(training renders, {"prior", "weak", "classifier"}) of a recipe, trained once and cached."""
    if training == "full":
        return train.load_models(cache_dir=cache_dir, progress=progress)
    r = recipe(training)
    data = cached_renders(r["data"], cache_dir)
    return data, {"prior": train_prior(data, r["prior"], cache_dir, progress),
                  "weak": train_prior(data, r["weak"], cache_dir, progress),
                  "classifier": train_classifier(data, r["classifier"], cache_dir, progress)}


def _parser():
    p = argparse.ArgumentParser(prog="diffsolve text3d", description="3-D distillation testbed: every distiller "
                                "optimises a voxel field per class through DistillationGuidance, scored against "
                                "the true shapes")
    p.add_argument("--quick", action="store_true", help="tiny models and budget (the test suite's setting)")
    p.add_argument("--training", choices=TRAININGS, default=None, help="model recipe (default: full; with "
                   "--quick, quick)")
    p.add_argument("--out", default=None, help="results folder (default: outputs/text3d)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--classes", default=None, help="comma-separated classes (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--budget", type=int, default=None, help="model calls per view per field")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    from dataclasses import replace

    from . import study
    args = _parser().parse_args(argv)
    cfg = study.quick_config() if args.quick else study.Text3DConfig()
    training = args.training or ("quick" if args.quick else "full")
    cfg = replace(cfg, training=training)
    if args.classes:
        cfg = replace(cfg, classes=tuple(args.classes.split(",")))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.budget:
        cfg = replace(cfg, budget=args.budget)
    out = Path(args.out or ("outputs/text3d/quick" if args.quick else "outputs/text3d"))
    return study.run_study(cfg, out, Path(args.cache_dir) if args.cache_dir else None, not args.no_progress)
