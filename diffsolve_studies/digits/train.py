"""Training of the digits denoisers and the evaluation classifier: cached on disk, resumable from
checkpoints, every file written atomically with a checksum of its content. The cache key is a hash of the
full training config, the data split and what else changes the bits (diffsolve.runs.environment: torch
version, thread count, device, dtype), so a changed recipe or setting never loads a stale model; a file that is
damaged or does not fit the network is reported in a warning naming it and retrained.

Denoiser recipe (EDM, Karras et al. 2022): sigma ~ exp(N(-1.2, 1.2^2)), loss weight
(sigma^2 + sd^2) / (sigma sd)^2, labels dropped to the "no class" token with probability 0.1 (so CFG works),
fresh dequantisation noise every batch, Adam with a cosine learning-rate decay, EMA of the weights.
"""
import copy
import hashlib
import json
import math
import time
import warnings

import torch

from diffsolve.runs import RunWarning, environment

from ..toy.train import _atomic_save, _try_load, default_cache_dir
from .data import dequantize
from .model import NULL_CLASS, DigitsClassifier, DigitsDenoiser

DENOISER = dict(width=256, depth=4, emb=128, iterations=12000, batch=256, lr=2e-3, ema=0.999,
                p_mean=-1.2, p_std=1.2, label_dropout=0.1, seed=0)
WEAK_DENOISER = dict(DENOISER, width=64, depth=2, iterations=1500)  # the autoguidance guide
CLASSIFIER = dict(width=256, feature_dim=16, iterations=3000, batch=256, lr=1e-3, noise_max=0.2,
                  weight_decay=1e-4, seed=0)


def _digest(split):
    h = hashlib.sha256()
    for t in (split.train_images, split.train_labels):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def _paths(kind, config, split, cache_dir, folder="digits"):
    key = hashlib.sha256((json.dumps({**config, "environment": environment()}, sort_keys=True) + _digest(split))
                         .encode()).hexdigest()[:16]
    root = (default_cache_dir() if cache_dir is None else cache_dir) / folder
    return root / f"{kind}-{key}.pt", root / f"{kind}-{key}.ckpt.pt"


def _cosine_lr(base, it, total, warmup=200):
    if it < warmup:
        return base * (it + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))


def _denoiser_loss(net, split, cfg, gen):
    idx = torch.randint(len(split.train_labels), (cfg["batch"],), generator=gen)
    x = dequantize(split.train_images[idx], gen)
    labels = split.train_labels[idx].clone()
    labels[torch.rand(cfg["batch"], generator=gen) < cfg["label_dropout"]] = NULL_CLASS
    sigma = (torch.randn(cfg["batch"], generator=gen) * cfg["p_std"] + cfg["p_mean"]).exp()
    z = x + sigma[:, None] * torch.randn(x.shape, generator=gen)
    sd = net.sigma_data
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return (w * ((net(z, sigma, labels) - x) ** 2).mean(1)).mean()


def _classifier_loss(net, split, cfg, gen):
    idx = torch.randint(len(split.train_labels), (cfg["batch"],), generator=gen)
    x = dequantize(split.train_images[idx], gen)
    x = x + torch.rand(cfg["batch"], 1, generator=gen) * cfg["noise_max"] * torch.randn(x.shape, generator=gen)
    return torch.nn.functional.cross_entropy(net(x), split.train_labels[idx])


@torch.inference_mode(False)
@torch.enable_grad()
def _train(kind, build, loss_fn, cfg, split, cache_dir, progress, checkpoint_every=500, stop_after=None,
           folder="digits"):
    """Shared loop: load the cached final model, else resume from a checkpoint, else start; returns the
    (EMA, for denoisers) network in eval mode with `train_seconds` and `cache_path` attributes. `split` is
    anything with `train_images` / `train_labels` tensors (hashed into the cache key); files go to
    <cache>/<folder>/."""
    final, ckpt = _paths(kind, cfg, split, cache_dir, folder)
    config = json.dumps(cfg, sort_keys=True)
    net = build()
    data = _try_load(final, f"cached {kind}", ("config", "state", "train_seconds")) if final.exists() else None
    if data is not None and data["config"] == config:
        try:
            net.load_state_dict(data["state"])
            net.train_seconds, net.cache_path = float(data["train_seconds"]), final
            return net.eval().requires_grad_(False)
        except (RuntimeError, TypeError, ValueError) as err:
            warnings.warn(f"ignoring cached {kind} {final}: its weights do not fit the network ({err}); it is "
                          "rebuilt", RunWarning)

    def start_state():
        gen = torch.Generator().manual_seed(cfg["seed"])
        torch.manual_seed(cfg["seed"])
        net = build()
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
        return gen, net, ema, opt

    gen, net, ema, opt = start_state()
    start, elapsed = 0, 0.0
    keys = ("config", "net", "ema", "opt", "generator", "iteration", "train_seconds")
    state = _try_load(ckpt, f"{kind} checkpoint", keys) if ckpt.exists() else None
    if state is not None and state["config"] == config:
        try:
            net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
            gen.set_state(state["generator"])
            start, elapsed = int(state["iteration"]), float(state["train_seconds"])
        except (RuntimeError, TypeError, ValueError) as err:
            warnings.warn(f"ignoring {kind} checkpoint {ckpt}: it does not fit the network ({err}); starting "
                          "over", RunWarning)
            gen, net, ema, opt = start_state()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg["iterations"], initial=start, desc=f"train {folder} {kind}", leave=False)
    t0, decay = time.perf_counter(), cfg.get("ema", 0.0)
    net.train()
    for it in range(start, cfg["iterations"]):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(cfg["lr"], it, cfg["iterations"])
        loss = loss_fn(net, split, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - (decay if it >= 1000 else 0.0))
        if bar is not None:
            bar.update(1)
        done = it + 1
        if done % checkpoint_every == 0 and done < cfg["iterations"]:
            _atomic_save(dict(config=json.dumps(cfg, sort_keys=True), net=net.state_dict(), ema=ema.state_dict(),
                              opt=opt.state_dict(), generator=gen.get_state(), iteration=done,
                              train_seconds=elapsed + time.perf_counter() - t0), ckpt)
            if stop_after is not None and done >= stop_after:
                raise KeyboardInterrupt(f"stopped after {done} iterations (checkpoint written)")
    if bar is not None:
        bar.close()
    seconds = elapsed + time.perf_counter() - t0
    _atomic_save(dict(config=json.dumps(cfg, sort_keys=True), state=ema.state_dict(), train_seconds=seconds), final)
    ckpt.unlink(missing_ok=True)
    ema.train_seconds, ema.cache_path = seconds, final
    return ema.eval().requires_grad_(False)


def sigma_data_of(split):
    """Standard deviation of the dequantised training pixels (EDM's sigma_data)."""
    return float(dequantize(split.train_images, torch.Generator().manual_seed(0)).std())


def train_denoiser(split, cfg=DENOISER, cache_dir=None, progress=True, **kw):
    """The class-conditional denoiser (`WEAK_DENOISER` for the autoguidance guide)."""
    cfg = dict(cfg, sigma_data=round(sigma_data_of(split), 6))
    build = lambda: DigitsDenoiser(cfg["width"], cfg["depth"], cfg["emb"], cfg["sigma_data"])  # noqa: E731
    return _train("denoiser", build, _denoiser_loss, cfg, split, cache_dir, progress, **kw)


def train_classifier(split, cfg=CLASSIFIER, cache_dir=None, progress=True, **kw):
    """The evaluation classifier (no EMA: `ema` absent means the last weights are kept)."""
    build = lambda: DigitsClassifier(cfg["width"], cfg["feature_dim"])  # noqa: E731
    return _train("classifier", build, _classifier_loss, cfg, split, cache_dir, progress, **kw)
