"""Training of the 3-D testbed's networks on renders of the true shapes, through the digits testbed's
cached, resumable training loop (`diffsolve_studies.digits.train._train`: atomic checksummed files under
<cache>/scene3d/, keyed by the recipe, the data and the environment).

Prior recipe (EDM): sigma ~ exp(N(-1.2, 1.2^2)), loss weight (sigma^2 + sd^2) / (sigma sd)^2, class labels
dropped to the "no class" token with probability 0.1 (the camera is always given), Adam with cosine
decay, EMA. The weak prior (autoguidance's guide) is the same network, narrower and trained shorter.
The classifier learns the class and the azimuth bin of renders with small input noise.
"""
import hashlib
import inspect
import json

import torch

from ..digits.train import _train
from ..toy.train import _atomic_save, _try_load, default_cache_dir
from .data import RenderSet, render_set
from .model import NULL_CLASS, RenderClassifier, ViewDenoiser, azimuth_bin

__all__ = ["PRIOR", "WEAK_PRIOR", "CLASSIFIER", "DATA", "QUICK", "cached_renders", "load_models", "train_prior",
           "train_classifier"]

DATA = dict(views_per_class=512, seed=0)
PRIOR = dict(channels=(16, 32, 64), emb=128, iterations=4000, batch=32, lr=2e-3, ema=0.999, p_mean=-1.2, p_std=1.2,
             label_dropout=0.1, seed=0, sigma_data=0.5)
WEAK_PRIOR = dict(PRIOR, channels=(8, 16, 32), iterations=600)
CLASSIFIER = dict(width=16, feature_dim=32, iterations=1000, batch=64, lr=2e-3, noise_max=0.1, seed=0)
QUICK = {"data": dict(views_per_class=16, seed=0), "prior": dict(PRIOR, channels=(8, 8, 8), iterations=4, batch=8),
         "weak": dict(PRIOR, channels=(8, 8, 8), iterations=2, batch=8),
         "classifier": dict(CLASSIFIER, width=8, iterations=4, batch=8)}


class _Keyed:
    """What the shared loop hashes and reads: the renders, with the cameras in the label tensor's key."""

    def __init__(self, data):
        self.data = data
        self.train_images = data.train_images
        self.train_labels = torch.cat([data.train_labels.double(), data.elevation.double(), data.azimuth.double()])


def _prior_loss(net, split, cfg, gen):
    d = split.data
    idx = torch.randint(len(d), (cfg["batch"],), generator=gen)
    x, labels = d.train_images[idx], d.train_labels[idx].clone()
    labels[torch.rand(cfg["batch"], generator=gen) < cfg["label_dropout"]] = NULL_CLASS
    sigma = (torch.randn(cfg["batch"], generator=gen) * cfg["p_std"] + cfg["p_mean"]).exp()
    z = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=gen)
    sd = net.sigma_data
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    out = net(z, sigma, labels, d.elevation[idx], d.azimuth[idx])
    return (w * ((out - x) ** 2).mean((1, 2, 3))).mean()


def _classifier_loss(net, split, cfg, gen):
    d = split.data
    idx = torch.randint(len(d), (cfg["batch"],), generator=gen)
    x = d.train_images[idx]
    x = x + torch.rand(cfg["batch"], 1, 1, 1, generator=gen) * cfg["noise_max"] * torch.randn(x.shape, generator=gen)
    logits_cls, logits_az = net(x)
    ce = torch.nn.functional.cross_entropy
    return ce(logits_cls, d.train_labels[idx]) + ce(logits_az, azimuth_bin(d.azimuth[idx]))


def train_prior(data, cfg=PRIOR, cache_dir=None, progress=True, **kw):
    """The class- and camera-conditioned prior (`WEAK_PRIOR` for the autoguidance guide)."""
    build = lambda: ViewDenoiser(cfg["channels"], cfg["emb"], cfg["sigma_data"])  # noqa: E731
    return _train("prior", build, _prior_loss, cfg, _Keyed(data), cache_dir, progress, folder="scene3d", **kw)


def train_classifier(data, cfg=CLASSIFIER, cache_dir=None, progress=True, **kw):
    """The evaluation classifier: class and azimuth bin of a render."""
    build = lambda: RenderClassifier(cfg["width"], cfg["feature_dim"])  # noqa: E731
    return _train("classifier", build, _classifier_loss, cfg, _Keyed(data), cache_dir, progress, folder="scene3d",
                  **kw)


def cached_renders(cfg, cache_dir=None):
    """`render_set(**cfg)`, rendered once and kept in <cache>/scene3d/renders-<key>.pt (checksummed)."""
    key = hashlib.sha256(json.dumps({**cfg, "world": _world_digest()}, sort_keys=True).encode()).hexdigest()[:16]
    path = (default_cache_dir() if cache_dir is None else cache_dir) / "scene3d" / f"renders-{key}.pt"
    fields = ("train_images", "train_labels", "elevation", "azimuth")
    data = _try_load(path, "cached renders", fields) if path.exists() else None
    if data is not None:
        return RenderSet(*(data[f] for f in fields))
    out = render_set(**cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({f: getattr(out, f) for f in fields}, path)
    return out


def _world_digest():
    """A hash of the world's definition, so that a changed shape never loads stale renders."""
    from . import render, world
    return hashlib.sha256((inspect.getsource(world) + inspect.getsource(render)).encode()).hexdigest()[:12]


def load_models(quick=False, cache_dir=None, progress=True):
    """(training renders, {"prior", "weak", "classifier"}), trained once and cached."""
    recipe = QUICK if quick else {"data": DATA, "prior": PRIOR, "weak": WEAK_PRIOR, "classifier": CLASSIFIER}
    data = cached_renders(recipe["data"], cache_dir)
    return data, {"prior": train_prior(data, recipe["prior"], cache_dir, progress),
                  "weak": train_prior(data, recipe["weak"], cache_dir, progress),
                  "classifier": train_classifier(data, recipe["classifier"], cache_dir, progress)}
