"""Recipes and loading of the 3-D comparison's models (the runner is benchmarks/text_to_3d.py).

Three trainings (all through `train.py`'s cached, resumable loop; each recipe keys its own cache files):
  - "full": `train.load_models()` (train.PRIOR / WEAK_PRIOR / CLASSIFIER on 512 views per class);
  - "reduced": a smaller prior / classifier on 128 views per class, for a shared two-core machine where the
    full recipe does not finish in time (`REDUCED`; the committed reduced run uses it);
  - "quick": `train.QUICK` (a few iterations: the test suite's plumbing check, not a prior to measure with).
"""
from . import train
from .train import CLASSIFIER, PRIOR, cached_renders, train_classifier, train_prior

__all__ = ["REDUCED", "TRAININGS", "load", "recipe"]

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
