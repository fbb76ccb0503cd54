"""hypothesis strategies for property tests of samplers (this module imports hypothesis; `diffsolve.testing` does
not). schedules: every family of `diffsolve.SCHEDULES` with random sizes and ranges; anisotropic_mixtures:
`GaussianMixture`s with rotated unequal covariances; bandwidths, guidance_scales, batch_splits, dtypes, noise_seeds.
Pair them with `diffsolve.testing.properties` (docs/testing.md)."""
import math

import torch
from hypothesis import assume
from hypothesis import strategies as st

from ..analytic import GaussianMixture
from ..schedules import SCHEDULES, get_sigmas, sigmas_from_alphas_cumprod

__all__ = ["anisotropic_mixtures", "bandwidths", "batch_splits", "dtypes", "guidance_scales", "model_tables",
           "noise_seeds", "schedules"]

RANGE_FAMILIES = ("karras", "exponential", "polyexponential", "kl_optimal")
TABLE_FAMILIES = ("simple", "sgm_uniform", "ddim_uniform", "normal", "beta")


@st.composite
def model_tables(draw):
    """A discrete VP model's training sigmas: scaled-linear betas with a random end (Stable Diffusion's is 0.012) over
    100 to 1000 training steps, ascending float64."""
    steps = draw(st.integers(100, 1000))
    beta_end = draw(st.floats(0.005, 0.03))
    betas = torch.linspace(0.00085 ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def _params(draw, family, sigma_min, sigma_max):
    if family in RANGE_FAMILIES:
        kw = dict(sigma_min=sigma_min, sigma_max=sigma_max)
        if family == "karras":
            kw["rho"] = draw(st.floats(1.0, 10.0))
        if family == "polyexponential":
            kw["rho"] = draw(st.floats(0.5, 3.0))
        return kw
    if family in TABLE_FAMILIES:
        return dict(model_sigmas=draw(model_tables()))
    if family == "linear_quadratic":
        return dict(sigma_max=sigma_max)
    if family == "align_your_steps":
        return dict(model=draw(st.sampled_from(["SD1", "SDXL", "SVD"])))
    return {}


@st.composite
def schedules(draw, families=None, min_steps=1, max_steps=40, sigma_min=(1e-3, 0.5), sigma_max=(1.0, 200.0),
              zero=None):
    """A valid grid (float64, strictly descending): a family of SCHEDULES (or of `families`), a step count in
    [min_steps, max_steps] and, for range families, log-uniform sigma_min / sigma_max; the final 0 kept, dropped
    (zero=False) or either (zero=None). Grids a family refuses are rejected, not returned."""
    family = draw(st.sampled_from(sorted(families or SCHEDULES)))
    n = draw(st.integers(min_steps, max_steps))
    lo = math.exp(draw(st.floats(math.log(sigma_min[0]), math.log(sigma_min[1]))))
    hi = math.exp(draw(st.floats(math.log(max(sigma_max[0], 2 * lo)), math.log(max(sigma_max[1], 4 * lo)))))
    try:
        sig = get_sigmas(family, n, **_params(draw, family, lo, hi)).to(torch.float64)
    except ValueError:
        assume(False)
    keep_zero = draw(st.booleans()) if zero is None else zero
    if not keep_zero and sig[-1] == 0:
        sig = sig[:-1]
    assume(len(sig) >= 2 and bool((sig[1:] < sig[:-1]).all()) and bool((sig >= 0).all()))
    return sig


@st.composite
def anisotropic_mixtures(draw, dims=(1, 4), components=(1, 4), dtype=torch.float64):
    """A GaussianMixture of K components in d dimensions: means in [-1.5, 1.5], each covariance a random rotation
    of stds in [0.05, 1] (unequal per axis), weights in [0.1, 1] normalised."""
    d = draw(st.integers(*dims))
    k = draw(st.integers(*components))
    floats = lambda lo, hi, n: draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))  # noqa: E731
    means = torch.tensor(floats(-1.5, 1.5, k * d), dtype=dtype).reshape(k, d)
    stds = torch.tensor(floats(0.05, 1.0, k * d), dtype=dtype).reshape(k, d)
    seed = draw(st.integers(0, 2 ** 31 - 1))
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    covs = q @ torch.diag_embed(stds ** 2) @ q.mT
    weights = torch.tensor(floats(0.1, 1.0, k), dtype=dtype)
    return GaussianMixture(weights, means, 0.5 * (covs + covs.mT))


def bandwidths(lo=0.05, hi=20.0):
    """Kernel bandwidths lambda, log-uniform on [lo, hi]."""
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


def guidance_scales(lo=0.0, hi=15.0):
    """CFG scales in diffusers' convention (1: no guidance), uniform on [lo, hi]."""
    return st.floats(lo, hi)


@st.composite
def batch_splits(draw, rows=(2, 16), max_chunks=4):
    """Chunk sizes (each >= 1) that add up to a batch of rows in [rows[0], rows[1]], at least two chunks."""
    total = draw(st.integers(max(2, rows[0]), rows[1]))
    cuts = draw(st.lists(st.integers(1, total - 1), min_size=1, max_size=max_chunks - 1, unique=True))
    edges = [0, *sorted(cuts), total]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def dtypes():
    return st.sampled_from([torch.float32, torch.float64])


def noise_seeds():
    return st.integers(0, 2 ** 31 - 1)
