"""Training recipe of the toy score networks (Karras et al. 2024 toy example; the project's design notes,
design/toy-experiments.md §1.4-1.5), with an on-disk cache and resumable checkpoints.

Recipe (per iteration ``it`` = 0, 1, ...):
  * sigma = exp(N(-2.3, 1.5^2)) per sample, x ~ p_sigma (exact mixture samples), batch 4096;
  * loss = mean_batch sigma^2 * mean_dims (score_gmm(x, sigma) - score_net(x, sigma))^2 (exact score matching
    against the analytic mixture score);
  * Adam(betas=(0.9, 0.99)), lr = 0.01 / sqrt(max(it / 512, 1));
  * power-function EMA of the weights with relative std 0.010: beta = (1 - 1 / (it + 1))^(gamma + 1).
All randomness (initial weights, sigmas, samples) comes from one explicit torch.Generator seeded with ``seed``.
The returned model is the EMA network in eval mode.

Cache: ``<cache_dir>/toy_models/<name>-<key>.pt`` where ``key`` hashes the recipe, the config, the mixture
parameters and what else changes the bits (diffsolve.runs.environment: torch version, thread count, device,
dtype). Every ``checkpoint_every`` iterations the full training state (net, EMA, optimiser, generator,
iteration, loss history, elapsed seconds) is written to ``<name>-<key>.ckpt.pt``; an interrupted run resumes
from it and ends with bit-identical weights. Every file carries a sha256 of its content and is loaded with
``weights_only=True``; one that is damaged, fails its checksum or lacks the expected keys / shapes is
reported in a warning naming it and retrained. All writes are atomic (temporary file + os.replace).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from diffsolve.analytic import GaussianMixture
from diffsolve.runs import RunWarning, environment, load_checked, save_checked
from .model import ToyModel

__all__ = ["MixtureScore", "power_function_beta", "std_to_exp", "toy_models", "train_toy_model",
           "default_cache_dir", "RECIPE"]

# Everything in the recipe that changes the trained weights; part of the cache key.
RECIPE = dict(version=1, p_mean=-2.3, p_std=1.5, lr_ref=0.01, lr_rampdown_iters=512, betas=(0.9, 0.99),
              ema_std=0.010, sigma_data=0.5, in_dim=2, dtype="float32")


# ----------------------------------------------------------------------------------------------- EMA
def std_to_exp(std: float) -> float:
    """Exponent gamma of the power-function EMA whose relative std is ``std`` (Karras et al. 2024,
    "Analyzing and improving the training dynamics of diffusion models", eq. for sigma_rel):

        std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

    i.e. the root gamma > 0 of the cubic std^2 (g + 2)^2 (g + 3) - (g + 1) = 0. std_to_exp(0.010) = 96.995.
    """
    std = float(std)
    if not 0 < std < math.sqrt(1 / 12):  # sigma_rel(0) = sqrt(1/12); it decreases to 0 as gamma -> inf
        raise ValueError(f"std must be in (0, {math.sqrt(1 / 12):.4f}) for gamma > 0, got {std:g}")
    s2 = std * std
    # expand: s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    g = max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r)))  # the root with gamma > 0
    for _ in range(3):  # polish with Newton in float64
        f = s2 * (g + 2) ** 2 * (g + 3) - (g + 1)
        df = s2 * (2 * (g + 2) * (g + 3) + (g + 2) ** 2) - 1
        g -= f / df
    return float(g)


def power_function_beta(it: int, gamma: float) -> float:
    """EMA decay after optimiser step ``it`` (0-based): (1 - 1 / (it + 1))^(gamma + 1); 0 at it = 0."""
    return (1.0 - 1.0 / (it + 1)) ** (gamma + 1)


def learning_rate(it: int) -> float:
    return RECIPE["lr_ref"] / math.sqrt(max(it / RECIPE["lr_rampdown_iters"], 1.0))


# ------------------------------------------------------------------------------------- target score
class MixtureScore:
    """Exact score of ``gmm`` at noise level sigma, computed faster than GaussianMixture.score for training.

    Two exact paths (same result as gmm.score to rounding; tested):
      * isotropic mixtures with one shared variance h^2 (KDEs): p_sigma = sum_k w_k N(x; mu_k, (h^2 + s^2) I),
        score = (softmax_k[(x.mu_k - |mu_k|^2 / 2) / v + log w_k] @ mu - x) / v with v = h^2 + s^2 (two matmuls
        per row chunk; the [rows, K] softmax dominates: ~0.09 s for 4096 x 10^4 on 2 threads);
      * anything else: per-component eigenbasis (as in GaussianMixture) written with [rows, K] elementwise
        ops per dimension, in row chunks, instead of [rows, K, d] batched products.
    """

    def __init__(self, gmm: GaussianMixture, rows: Optional[int] = None):
        self.gmm = gmm
        means, covs, w = gmm.means, gmm.covs, gmm.weights
        K, d = means.shape
        self.dtype = means.dtype
        self.log_w = w.log()
        eye = torch.eye(d, dtype=covs.dtype, device=covs.device)
        h2 = covs[:, 0, 0]
        iso = bool(torch.allclose(covs, h2[0] * eye.expand(K, d, d), rtol=0, atol=1e-12 * max(float(h2[0]), 1e-30)))
        self.isotropic = iso
        if iso:
            self.h2 = float(h2[0])
            self.center = means.mean(0)
            self.u = means - self.center
            self.aug = torch.cat([self.u, 0.5 * (self.u * self.u).sum(-1, keepdim=True), self.log_w[:, None]],
                                 1).T.contiguous()  # [d + 2, K]
            self.rows = rows or max(1, 2 ** 21 // max(K, 1))
        else:
            L, Q = torch.linalg.eigh(0.5 * (covs + covs.mT))
            self.L, self.Q, self.means = L.clamp_min(0), Q, means
            self.rows = rows or max(1, 2 ** 19 // max(K, 1))

    def _iso_rows(self, x: Tensor, s2: Tensor) -> Tensor:
        # logits_k = (x.mu_k - |mu_k|^2 / 2) / v + log w_k = [x / v, -1 / v, 1] @ [mu_k, |mu_k|^2 / 2, log w_k]
        v = (s2 + self.h2)[:, None]
        xc = x - self.center
        logits = torch.cat([xc / v, -1 / v, torch.ones_like(v)], 1) @ self.aug
        return (logits.softmax(-1) @ self.u - xc) / v

    def _general_rows(self, x: Tensor, s2: Tensor) -> Tensor:
        d = x.shape[1]
        diff = [x[:, i:i + 1] - self.means[:, i] for i in range(d)]  # d x [rows, K]
        logits = self.log_w.expand(x.shape[0], -1).clone()
        white = []
        for j in range(d):
            proj = sum(diff[i] * self.Q[:, i, j] for i in range(d))
            v = self.L[:, j] + s2[:, None]
            wj = proj / v
            logits -= 0.5 * (proj * wj + v.log())
            white.append(wj)
        r = logits.softmax(-1)
        return -sum((r * white[j]) @ self.Q[:, :, j] for j in range(d))

    def __call__(self, x: Tensor, sigma) -> Tensor:
        x = torch.as_tensor(x).to(self.dtype)
        s = torch.as_tensor(sigma, dtype=self.dtype, device=x.device)
        s2 = (s * s).expand(x.shape[0]) if s.ndim == 0 else s * s
        fn = self._iso_rows if self.isotropic else self._general_rows
        if x.shape[0] == 0:
            return torch.empty_like(x)
        return torch.cat([fn(x[i:i + self.rows], s2[i:i + self.rows]) for i in range(0, x.shape[0], self.rows)])


# -------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """$DIFFSOLVE_CACHE, else ~/.cache/diffsolve."""
    env = os.environ.get("DIFFSOLVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffsolve"


def mixture_digest(gmm: GaussianMixture) -> str:
    """sha256 of the mixture's normalised weights, means and covariances (as float64 bytes)."""
    h = hashlib.sha256()
    for t in (gmm.weights, gmm.means, gmm.covs):
        a = np.ascontiguousarray(t.detach().cpu().to(torch.float64).numpy())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _config(hidden_dim, num_layers, iterations, batch, seed) -> dict:
    return dict(recipe=RECIPE, hidden_dim=int(hidden_dim), num_layers=int(num_layers), iterations=int(iterations),
                batch=int(batch), seed=int(seed))


def _cache_paths(cache_dir, name, config, digest):
    key = hashlib.sha256((json.dumps({**config, "environment": environment()}, sort_keys=True) + digest)
                         .encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "toy")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "toy_models"
    return root / f"{safe}-{key}.pt", root / f"{safe}-{key}.ckpt.pt"


def _atomic_save(obj, path: Path) -> None:
    """torch.save (with a content checksum) through a temporary file and os.replace; no partial file."""
    save_checked(obj, path)


def _build(config, generator: torch.Generator) -> ToyModel:
    r = config["recipe"]
    return ToyModel(in_dim=r["in_dim"], num_layers=config["num_layers"], hidden_dim=config["hidden_dim"],
                    sigma_data=r["sigma_data"], generator=generator)


def _try_load(path: Path, what: str, keys=()):
    """The checked dict at `path` (weights_only=True), or None with a warning naming the file."""
    return load_checked(path, what, keys)


def _same_config(data, config) -> bool:
    try:
        return json.loads(data["config"]) == json.loads(json.dumps(config))
    except (TypeError, ValueError):
        return False


def _load_final(path: Path, config: dict) -> Optional[ToyModel]:
    data = _try_load(path, "cached model", ("config", "ema", "train_seconds", "losses"))
    if data is None or not _same_config(data, config):
        return None  # unreadable, damaged, hash collision or stale format: retrain
    model = _build(config, torch.Generator())
    try:
        model.load_state_dict(data["ema"])
        model.train_seconds = float(data["train_seconds"])
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        warnings.warn(f"ignoring cached model {path}: its weights do not fit the model ({err}); it is rebuilt",
                      RunWarning)
        return None
    model.eval().requires_grad_(False)
    model.losses = data["losses"]
    model.cache_path = path
    model.train_config = config
    return model


# ----------------------------------------------------------------------------------------- training
@torch.inference_mode(False)  # usable under torch.no_grad() / inference_mode()
@torch.enable_grad()
def train_toy_model(gmm: GaussianMixture, *, hidden_dim: int = 64, num_layers: int = 4, iterations: int = 4096,
                    batch: int = 4096, seed: int = 0, cache_dir=None, name: Optional[str] = None,
                    progress: bool = True, checkpoint_every: int = 256,
                    callback: Optional[Callable[[int, float], None]] = None) -> ToyModel:
    """Train (or load from the cache) a ToyModel on the exact scores of ``gmm``; returns the EMA net, eval mode.

    ``model.train_seconds`` is the wall time spent training (summed over resumed runs; the stored value when
    loaded from the cache), ``model.losses`` the per-iteration training losses, ``model.cache_path`` the file.
    ``callback(iteration, loss)`` is called after every completed iteration (1-based count), after any
    checkpoint of that iteration was written; an exception raised there interrupts training, and the next call
    resumes from the last checkpoint. Uses the caller's torch thread settings; runs on the CPU.
    """
    if iterations < 1 or batch < 1 or checkpoint_every < 1:
        raise ValueError(f"iterations, batch and checkpoint_every must be >= 1, got {iterations}, {batch}, "
                         f"{checkpoint_every}")
    if gmm.dim != RECIPE["in_dim"]:
        raise ValueError(f"the toy model is {RECIPE['in_dim']}D, got a mixture of dimension {gmm.dim}")
    config = _config(hidden_dim, num_layers, iterations, batch, seed)
    final_path, ckpt_path = _cache_paths(cache_dir, name, config, mixture_digest(gmm))
    if final_path.exists():
        model = _load_final(final_path, config)
        if model is not None:
            return model

    gen = torch.Generator().manual_seed(int(seed))
    net = _build(config, gen).train()  # initial weights drawn from the explicit generator
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate(0), betas=RECIPE["betas"])
    gamma = std_to_exp(RECIPE["ema_std"])
    start, losses, elapsed = 0, [], 0.0
    keys = ("config", "net", "ema", "opt", "generator", "iteration", "losses", "train_seconds")
    state = _try_load(ckpt_path, "checkpoint", keys) if ckpt_path.exists() else None
    if state is not None and _same_config(state, config):
        try:
            net.load_state_dict(state["net"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["generator"])
            start, losses, elapsed = int(state["iteration"]), state["losses"].tolist(), float(state["train_seconds"])
        except (RuntimeError, TypeError, ValueError, KeyError) as err:
            warnings.warn(f"ignoring checkpoint {ckpt_path}: it does not fit the model ({err}); starting over",
                          RunWarning)
            gen = torch.Generator().manual_seed(int(seed))
            net = _build(config, gen).train()
            ema = copy.deepcopy(net).eval().requires_grad_(False)
            opt = torch.optim.Adam(net.parameters(), lr=learning_rate(0), betas=RECIPE["betas"])
            start, losses, elapsed = 0, [], 0.0

    target = MixtureScore(gmm)
    mdtype = gmm.means.dtype
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=iterations, initial=start, desc=f"train {final_path.stem}", leave=False)
    t0 = time.perf_counter()
    try:
        for it in range(start, iterations):
            for group in opt.param_groups:
                group["lr"] = learning_rate(it)
            sigma = torch.randn(batch, generator=gen, dtype=mdtype) * RECIPE["p_std"] + RECIPE["p_mean"]
            sigma = sigma.exp()
            x = gmm.sample(batch, sigma, generator=gen)
            with torch.no_grad():
                y = target(x, sigma).float()
            x, sigma = x.float(), sigma.float()
            pred = net.score(x, sigma, create_graph=True)
            loss = (sigma ** 2 * ((y - pred) ** 2).mean(-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            beta = power_function_beta(it, gamma)
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1.0 - beta)
            losses.append(float(loss.detach()))
            done = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if done % checkpoint_every == 0 and done < iterations:
                _atomic_save(dict(config=json.dumps(config), net=net.state_dict(), ema=ema.state_dict(),
                                  opt=opt.state_dict(), generator=gen.get_state(), iteration=done,
                                  losses=torch.tensor(losses, dtype=torch.float64),
                                  train_seconds=elapsed + time.perf_counter() - t0), ckpt_path)
            if callback is not None:
                callback(done, losses[-1])
    finally:
        if bar is not None:
            bar.close()
    train_seconds = elapsed + time.perf_counter() - t0
    _atomic_save(dict(config=json.dumps(config), ema=ema.state_dict(), train_seconds=train_seconds,
                      losses=torch.tensor(losses, dtype=torch.float64), iteration=iterations), final_path)
    try:
        ckpt_path.unlink()
    except FileNotFoundError:
        pass
    ema.train_seconds = train_seconds
    ema.losses = torch.tensor(losses, dtype=torch.float64)
    ema.cache_path = final_path
    ema.train_config = config
    return ema.requires_grad_(False)


# ------------------------------------------------------------------------------------ study models
def toy_models(dataset: str, cache_dir=None, progress: bool = True, iterations_scale: float = 1.0) -> dict:
    """The trained models a study needs (design doc §1.4-1.5, §2.2), trained once and cached.

    "fractal": {"main": class-A model (64 hidden, 4096 iterations), "cfg_uncond": model of both classes "AB"
    (32 hidden, 512 iterations; the CFG guide), "autoguide": class-A model (32 hidden, 512 iterations)}.
    "pinwheel" / "spiral": {"main": 64 hidden, 4096 iterations, on kde_mixture(<points>(10_000, seed=0), 0.02)}.
    ``iterations_scale`` multiplies every iteration count (rounded, at least 1), for quick runs.
    """
    from .datasets import fractal_tree, kde_mixture, pinwheel_points, spiral_points

    def its(n):
        return max(1, int(round(n * iterations_scale)))

    kw = dict(cache_dir=cache_dir, progress=progress)
    if dataset == "fractal":
        gmm_a = fractal_tree("A")
        return {
            "main": train_toy_model(gmm_a, hidden_dim=64, iterations=its(4096), name="fractal-A-main", **kw),
            "cfg_uncond": train_toy_model(fractal_tree("AB"), hidden_dim=32, iterations=its(512),
                                          name="fractal-AB-cfg_uncond", **kw),
            "autoguide": train_toy_model(gmm_a, hidden_dim=32, iterations=its(512), name="fractal-A-autoguide",
                                         **kw),
        }
    points = {"pinwheel": pinwheel_points, "spiral": spiral_points}
    if dataset not in points:
        raise ValueError(f"dataset must be 'fractal', 'pinwheel' or 'spiral', got {dataset!r}")
    gmm = kde_mixture(points[dataset](10_000, seed=0), 0.02)
    return {"main": train_toy_model(gmm, hidden_dim=64, iterations=its(4096), name=f"{dataset}-main", **kw)}
