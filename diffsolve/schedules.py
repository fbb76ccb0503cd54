"""Noise schedules: descending sigmas (variance-exploding), ending at 0 unless asked otherwise.

Every schedule returns a descending float64 tensor of n sigmas, plus a final 0 when `append_zero_` (the
default), cast to `dtype` / `device`. `get_sigmas(name, n, **params)` looks one up by the name ComfyUI and
k-diffusion use (see `SCHEDULES` and docs/schedules.md). Schedules of a discrete model take its sigma table
`model_sigmas`: sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1, ascending (`sigmas_from_alphas_cumprod`).
"""
import math

import numpy as np
import torch

from ._checks import check_positive

__all__ = ["sigmas_log_uniform", "AYS_SIGMAS", "FLOW_SCHEDULES", "SCHEDULES", "SPACINGS", "append_zero", "beta_ppf", "discrete_timesteps", "get_sigmas", "sigmas_align_your_steps", "sigmas_beta", "sigmas_beta_range", "sigmas_beta_table", "sigmas_ddim_uniform", "sigmas_discrete", "sigmas_exponential", "sigmas_from_alphas_cumprod", "sigmas_karras", "sigmas_kl_optimal", "sigmas_linear_quadratic", "sigmas_normal", "sigmas_polyexponential", "sigmas_sgm_uniform", "sigmas_simple", "sigmas_vp"]

SPACINGS = ("leading", "trailing", "linspace")


def append_zero(sigmas):
    """Append the final sigma = 0 (the clean sample)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_n(n):
    try:
        ok = not isinstance(n, (bool, str)) and int(n) == n and n >= 1
    except (TypeError, ValueError, OverflowError):  # None, NaN, inf
        ok = False
    if not ok:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


def _check_range(n, sigma_min, sigma_max):
    _check_n(n)
    check_positive(sigma_min, "sigma_min")
    check_positive(sigma_max, "sigma_max")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def sigmas_karras(n, sigma_min, sigma_max, rho=7.0, append_zero_=True, dtype=torch.float64, device="cpu"):
    """Karras et al. (2022) eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check_range(n, sigma_min, sigma_max)
    check_positive(rho, "rho")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas = append_zero(sigmas) if append_zero_ else sigmas
    return sigmas.to(dtype=dtype, device=device)


def _finish(sigmas, append_zero_, dtype, device):
    sigmas = append_zero(sigmas) if append_zero_ else sigmas
    return sigmas.to(dtype=dtype, device=device)


def sigmas_exponential(n, sigma_min, sigma_max, append_zero_=True, dtype=torch.float64, device="cpu"):
    """k-diffusion's `get_sigmas_exponential`: log sigma_i = log sigma_max + i/(n-1) (log sigma_min - log sigma_max),
    i.e. sigmas evenly spaced in log sigma from sigma_max down to sigma_min."""
    _check_range(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _finish(sigmas, append_zero_, dtype, device)


sigmas_log_uniform = sigmas_exponential  # the earlier name, kept


def sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, append_zero_=True, dtype=torch.float64, device="cpu"):
    """k-diffusion's `get_sigmas_polyexponential`: log sigma_i = log sigma_min + r_i^rho (log sigma_max - log sigma_min),
    r_i = 1 - i/(n-1): polynomial in log sigma; rho = 1 is the exponential schedule."""
    _check_range(n, sigma_min, sigma_max)
    check_positive(rho, "rho")
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sigmas = (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()
    return _finish(sigmas, append_zero_, dtype, device)


def sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, append_zero_=True, dtype=torch.float64, device="cpu"):
    """k-diffusion's `get_sigmas_vp`, the continuous VP SDE of Song et al. (2021) in VE form:
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t evenly spaced from 1 down to eps_s
    (computed with expm1; k-diffusion writes exp(.) - 1)."""
    _check_n(n)
    check_positive(beta_d, "beta_d")
    if not (math.isfinite(beta_min) and beta_min >= 0):
        raise ValueError(f"beta_min must be finite and >= 0, got {beta_min}")
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must lie in (0, 1), got {eps_s}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    sigmas = torch.expm1(beta_d * t ** 2 / 2 + beta_min * t).sqrt()
    return _finish(sigmas, append_zero_, dtype, device)


def sigmas_kl_optimal(n, sigma_min, sigma_max, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `kl_optimal`: sigma_i = tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min)), the
    optimal schedule for Gaussian data of Sabour et al. (2024, "Align Your Steps", Thm. 3.1), via
    A1111 PR #15608. n = 1 gives [sigma_max] (ComfyUI divides 0 by 0 there)."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan()
    return _finish(sigmas, append_zero_, dtype, device)


def sigmas_linear_quadratic(n, sigma_max, threshold_noise=0.025, linear_steps=None, append_zero_=True,
                            dtype=torch.float64, device="cpu"):
    """ComfyUI's `linear_quadratic` (from Genmo's Mochi): sigma_i = sigma_max (1 - s_i), where s rises linearly,
    s_i = i thr / L for i < L, then quadratically, s_i = q i^2 + l i + c for L <= i <= n, with
    q = (L - thr n) / (L Q^2), l = thr / L - 2 (L - thr n) / Q^2, c = q L^2, Q = n - L (so s_L = thr, s_n = 1);
    L = linear_steps (default n // 2), thr = threshold_noise. ComfyUI passes the model's sigma_max. The final
    entry s_n = 1 is the zero. The schedule descends iff 0 < thr < 2 L / (n + L); outside that it raises."""
    n = _check_n(n)
    check_positive(sigma_max, "sigma_max")
    if n == 1:
        return _finish(torch.tensor([float(sigma_max)], dtype=torch.float64), append_zero_, dtype, device)
    L = n // 2 if linear_steps is None else linear_steps
    if isinstance(L, bool) or int(L) != L or not 1 <= L < n:
        raise ValueError(f"linear_steps must be an integer in [1, n - 1] = [1, {n - 1}], got {linear_steps!r}")
    L, Q = int(L), n - int(L)
    if not 0 < threshold_noise < 2 * L / (n + L):
        raise ValueError(f"threshold_noise must lie in (0, 2 L / (n + L)) = (0, {2 * L / (n + L):.6g}) for the "
                         f"schedule to descend (n={n}, linear_steps={L}), got {threshold_noise}")
    i = torch.arange(n, dtype=torch.float64)
    q = (L - threshold_noise * n) / (L * Q ** 2)
    lin = threshold_noise / L - 2 * (L - threshold_noise * n) / Q ** 2
    s = torch.where(i < L, i * threshold_noise / L, q * i ** 2 + lin * i + q * L ** 2)
    return _finish((1 - s) * sigma_max, append_zero_, dtype, device)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """VP -> VE: sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ((acp <= 0) | (acp > 1)).any():
        raise ValueError(f"alphas_cumprod must lie in (0, 1], got min {acp.min().item()} max {acp.max().item()}")
    return ((1 - acp) / acp).sqrt()


def discrete_timesteps(num_train_timesteps, n, spacing="leading", steps_offset=0):
    """The descending integer timesteps of diffusers' `DDIMScheduler.set_timesteps` for each spacing."""
    T = int(num_train_timesteps)
    if int(n) != n or not 1 <= n <= T:
        raise ValueError(f"n must be an integer in [1, {T}], got {n}")
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":  # numpy, not torch: their float aranges / linspaces differ in the last bit,
        # which moves x.5 roundings (trailing n=48, linspace n=27 with T=1000); diffusers uses numpy's.
        t = torch.from_numpy(np.round(np.arange(T, 0, -T / n)) - 1)
    elif spacing == "linspace":
        t = torch.from_numpy(np.linspace(0, T - 1, n).round())
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.flip(0).long() if spacing != "trailing" else t.long()


def sigmas_discrete(alphas_cumprod, n, spacing="leading", steps_offset=0, final_alphas_cumprod=1.0,
                    dtype=torch.float64):
    """Sigmas at a diffusers scheduler's inference timesteps, plus the final sigma.

    Returns `(sigmas, timesteps)`: sigmas has n + 1 descending entries. The last one is the sigma of
    `final_alphas_cumprod`: 1.0 (diffusers' `set_alpha_to_one=True`) gives 0; Stable Diffusion's
    `set_alpha_to_one=False` passes `alphas_cumprod[0]`, which ends at about 0.029, not 0.
    diffusers' DDIM steps from timestep t to t - T // n; that is the next timestep of this grid for
    "leading" spacing, and for "trailing" when T is a multiple of n.
    """
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    timesteps = discrete_timesteps(len(acp), n, spacing, steps_offset)
    if timesteps.max() >= len(acp) or timesteps.min() < 0:
        raise ValueError(f"timesteps {timesteps.tolist()} fall outside [0, {len(acp) - 1}]")
    sigmas = sigmas_from_alphas_cumprod(acp[timesteps])
    final = sigmas_from_alphas_cumprod(torch.tensor([float(final_alphas_cumprod)], dtype=torch.float64))
    return torch.cat([sigmas, final]).to(dtype), timesteps


# --------------------------------------------------------------- schedules on a discrete model's sigma table
def _check_table(model_sigmas):
    """A discrete model's sigma table as float64: 1-D, >= 2 entries, finite, > 0, strictly ascending in t."""
    table = torch.as_tensor(model_sigmas, dtype=torch.float64).cpu()
    if table.ndim != 1 or len(table) < 2:
        raise ValueError(f"model_sigmas must be a 1-D table with at least 2 entries, got shape {tuple(table.shape)}")
    if not torch.isfinite(table).all() or (table <= 0).any():
        raise ValueError(f"model_sigmas must be finite and > 0, got min {table.min().item()} max {table.max().item()}")
    if (table.diff() <= 0).any():
        i = int(torch.nonzero(table.diff() <= 0)[0])
        raise ValueError(f"model_sigmas must be strictly ascending (timestep 0 first), got model_sigmas[{i}]="
                         f"{table[i].item()} >= model_sigmas[{i + 1}]={table[i + 1].item()}")
    return table


def _sigma_at(table, t):
    """ComfyUI's `ModelSamplingDiscrete.sigma`: log sigma interpolated linearly between integer timesteps."""
    t = t.clamp(0, len(table) - 1)
    lo, hi = t.floor().long(), t.ceil().long()
    w = t - lo
    return ((1 - w) * table[lo].log() + w * table[hi].log()).exp()


def sigmas_simple(n, model_sigmas, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `simple`: every (T/n)-th entry of the table from the top, sigma_i = table[T - 1 - floor(i T / n)],
    i = 0 .. n-1 (T = len(table) >= n)."""
    n, table = _check_n(n), _check_table(model_sigmas)
    T = len(table)
    if n > T:
        raise ValueError(f"n must be <= len(model_sigmas) = {T} for the simple schedule, got {n}")
    idx = T - 1 - (torch.arange(n, dtype=torch.float64) * (T / n)).floor().long()
    return _finish(table[idx], append_zero_, dtype, device)


def sigmas_ddim_uniform(n, model_sigmas, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `ddim_uniform`: table[1 + k c] for every k with 1 + k c < T, c = max(T // n, 1), descending.
    That is n entries when T is a multiple of n and more otherwise (ComfyUI's rule: T = 1000, n = 7 gives 8;
    n >= T gives T - 1). If table[1] <= 1e-5, ComfyUI takes c = T // (n + 1) and appends no zero (the last
    entry is then ~0)."""
    n, table = _check_n(n), _check_table(model_sigmas)
    near_zero = bool(table[1] <= 1e-5)
    c = max(len(table) // (n + near_zero), 1)
    sigmas = table[torch.arange(1, len(table), c)].flip(0)
    return _finish(sigmas, append_zero_ and not near_zero, dtype, device)


def sigmas_normal(n, model_sigmas, sgm=False, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `normal` (and `sgm_uniform` with sgm=True): timesteps evenly spaced from T-1 down to 0,
    t_i = (T-1)(1 - i/(n-1)) (sgm: (T-1)(1 - i/n), i < n, leaving the end out), sigma by log-linear
    interpolation in the table. If table[0] <= 1e-5 (normal only), ComfyUI takes n + 1 timesteps and appends
    no zero."""
    n, table = _check_n(n), _check_table(model_sigmas)
    end = float(len(table) - 1)
    near_zero = not sgm and bool(table[0] <= 1e-5)
    if sgm:
        t = torch.linspace(end, 0, n + 1, dtype=torch.float64)[:-1]
    else:
        t = torch.linspace(end, 0, n + near_zero, dtype=torch.float64)
    return _finish(_sigma_at(table, t), append_zero_ and not near_zero, dtype, device)


def sigmas_sgm_uniform(n, model_sigmas, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `sgm_uniform`: `sigmas_normal(..., sgm=True)`, n timesteps from T-1 evenly towards 0, 0 excluded."""
    return sigmas_normal(n, model_sigmas, sgm=True, append_zero_=append_zero_, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ beta (Lee et al. 2024)
def _betainc(x, a, b, lbeta):
    """Regularised incomplete beta I_x(a, b) for x in (0, 1) (numpy float64), by its continued fraction
    (DLMF 8.17.22) evaluated with the modified Lentz method; for x > (a+1)/(a+b+2) via I_x(a,b) = 1 - I_{1-x}(b,a)."""
    flip = x > (a + 1) / (a + b + 2)
    xs, p, q = np.where(flip, 1 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    tiny = 1e-300

    def guard(v):
        return np.where(np.abs(v) < tiny, tiny, v)

    c, d = np.ones_like(xs), 1 / guard(1 - (p + q) * xs / (p + 1))
    h = d.copy()
    for m in range(1, 2000):
        for num in (m * (q - m) * xs / ((p + 2 * m - 1) * (p + 2 * m)),
                    -(p + m) * (p + q + m) * xs / ((p + 2 * m) * (p + 2 * m + 1))):
            d = 1 / guard(1 + num * d)
            c = guard(1 + num / c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < 4e-16):
            break
    front = np.exp(p * np.log(xs) + q * np.log1p(-xs) - lbeta) / p
    return np.where(flip, 1 - front * h, front * h)


def beta_ppf(p, alpha, beta):
    """The beta distribution's quantile, the inverse x of I_x(alpha, beta) = p (scipy's `beta.ppf`), in float64
    to ~1e-15: Newton's method on the continued fraction above, kept inside a shrinking bracket (bisection
    when a step leaves it). Tensor in, float64 tensor out."""
    check_positive(alpha, "alpha")
    check_positive(beta, "beta")
    p = torch.as_tensor(p, dtype=torch.float64)
    if ((p < 0) | (p > 1) | p.isnan()).any():
        raise ValueError(f"p must lie in [0, 1], got {p.tolist()}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # x at 0 or 1 in a bisection step
        out = _beta_ppf_numpy(p.cpu().numpy().ravel(), float(alpha), float(beta))
    return torch.from_numpy(out).reshape(p.shape)


def _beta_ppf_numpy(pp, a, b):
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    inner = (pp > 0) & (pp < 1)
    q = pp[inner]
    # starting points from the tails: I_x ~ x^a / (a B) near 0 and 1 - (1-x)^b / (b B) near 1
    x = np.where(q < 0.5, (q * a * math.exp(lbeta)) ** (1 / a), 1 - ((1 - q) * b * math.exp(lbeta)) ** (1 / b))
    x = np.clip(x, 1e-300, 1 - 1e-16)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(200):
        f = _betainc(x, a, b, lbeta) - q
        lo, hi = np.where(f < 0, x, lo), np.where(f > 0, x, hi)
        dens = np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - lbeta)
        new = x - f / dens
        new = np.where((new > lo) & (new < hi) & np.isfinite(new), new, (lo + hi) / 2)
        done = np.all((np.abs(new - x) <= 2 * np.spacing(x)) | (f == 0))
        x = np.where(f == 0, x, new)
        if done:
            break
    out = np.where(pp >= 1, 1.0, 0.0)
    out[inner] = x
    if a == b:  # symmetric: the median is exactly 1/2
        out[pp == 0.5] = 0.5
    return out


def sigmas_beta_table(n, model_sigmas, alpha=0.6, beta=0.6, append_zero_=True, dtype=torch.float64, device="cpu"):
    """ComfyUI's `beta` (Lee et al. 2024, "Beta Sampling is All You Need", arXiv 2407.12173): timesteps
    t_i = round(F^-1(1 - i/n) (T - 1)), i = 0 .. n-1, F the Beta(alpha, beta) CDF, round half to even, repeated
    timesteps dropped (so fewer than n sigmas when they collide), sigma_i = table[t_i]."""
    n, table = _check_n(n), _check_table(model_sigmas)
    check_positive(alpha, "alpha")
    check_positive(beta, "beta")
    u = 1 - torch.arange(n, dtype=torch.float64) * (1 / n)
    t = torch.unique_consecutive(torch.round(beta_ppf(u, alpha, beta) * (len(table) - 1)).long())
    return _finish(table[t], append_zero_, dtype, device)


def sigmas_beta_range(n, sigma_min, sigma_max, alpha=0.6, beta=0.6, append_zero_=True, dtype=torch.float64,
                      device="cpu"):
    """diffusers' `use_beta_sigmas`: sigma_i = sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min), F the
    Beta(alpha, beta) CDF (Lee et al. 2024), linear in sigma rather than indexing a table."""
    _check_range(n, sigma_min, sigma_max)
    check_positive(alpha, "alpha")
    check_positive(beta, "beta")
    u = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = sigma_min + beta_ppf(u, alpha, beta) * (sigma_max - sigma_min)
    return _finish(sigmas, append_zero_, dtype, device)


def sigmas_beta(n, model_sigmas=None, alpha=0.6, beta=0.6, sigma_min=None, sigma_max=None, append_zero_=True,
                dtype=torch.float64, device="cpu"):
    """The beta schedule: on a model table (ComfyUI, `sigmas_beta_table`) or on [sigma_min, sigma_max]
    (diffusers, `sigmas_beta_range`): pass exactly one of model_sigmas or the two bounds."""
    kw = dict(alpha=alpha, beta=beta, append_zero_=append_zero_, dtype=dtype, device=device)
    if model_sigmas is not None and sigma_min is None and sigma_max is None:
        return sigmas_beta_table(n, model_sigmas, **kw)
    if model_sigmas is None and sigma_min is not None and sigma_max is not None:
        return sigmas_beta_range(n, sigma_min, sigma_max, **kw)
    raise ValueError("beta takes either model_sigmas (ComfyUI) or sigma_min and sigma_max (diffusers), got "
                     f"model_sigmas={'a table' if model_sigmas is not None else None}, sigma_min={sigma_min}, "
                     f"sigma_max={sigma_max}")


# --------------------------------------------------------------------- Align Your Steps (Sabour et al. 2024)
# The published 10-step schedules (research.nvidia.com/labs/toronto-ai/AlignYourSteps), as ComfyUI's
# comfy_extras/nodes_align_your_steps.py tabulates them: SD1 / SDXL are Stable Diffusion's table at the
# published timesteps (diffusers' AysSchedules "*Timesteps", then t = 0), SVD the published sigmas.
AYS_SIGMAS = {
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "SVD": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def sigmas_align_your_steps(n, model="SD1", append_zero_=True, dtype=torch.float64, device="cpu"):
    """Align Your Steps (Sabour et al. 2024, arXiv 2404.14507) for `model` in AYS_SIGMAS: the 10-step table
    s_0 .. s_10, resampled to n steps by linear interpolation of log sigma over the table index
    (log sigma at u_j = 10 j / n, j = 0 .. n, as ComfyUI's `loglinear_interp`); the last entry (the table's
    sigma_min) becomes the final zero, so n sigmas are left (ComfyUI's `AlignYourStepsScheduler`)."""
    n = _check_n(n)
    if model not in AYS_SIGMAS:
        raise ValueError(f"model must be one of {sorted(AYS_SIGMAS)}, got {model!r}")
    table = torch.tensor(AYS_SIGMAS[model], dtype=torch.float64)
    u = torch.arange(n, dtype=torch.float64) * ((len(table) - 1) / n)
    i = u.floor().long()
    w = u - i  # s_i (s_{i+1} / s_i)^w = exp((1 - w) log s_i + w log s_{i+1}), exact at the table's entries
    return _finish(table[i] * (table[i + 1] / table[i]) ** w, append_zero_, dtype, device)


# ------------------------------------------------------------------------------------------------ registry
SCHEDULES = {
    "karras": sigmas_karras,
    "exponential": sigmas_exponential,
    "polyexponential": sigmas_polyexponential,
    "vp": sigmas_vp,
    "simple": sigmas_simple,
    "sgm_uniform": sigmas_sgm_uniform,
    "ddim_uniform": sigmas_ddim_uniform,
    "beta": sigmas_beta,
    "normal": sigmas_normal,
    "linear_quadratic": sigmas_linear_quadratic,
    "kl_optimal": sigmas_kl_optimal,
    "align_your_steps": sigmas_align_your_steps,
}


FLOW_SCHEDULES = {}  # rectified-flow grids, filled by flow_matching.py: they may start at sigma = inf (t = 1)


def get_sigmas(name, n, **params):
    """The schedule `name` (as ComfyUI / k-diffusion spell it, a key of SCHEDULES or FLOW_SCHEDULES) with n steps:
    `SCHEDULES[name](n, **params)`. Table schedules take model_sigmas=...; for ComfyUI's range schedules on a model
    pass sigma_min=model_sigmas[0], sigma_max=model_sigmas[-1] (linear_quadratic: sigma_max only)."""
    if name in FLOW_SCHEDULES:
        return FLOW_SCHEDULES[name](n, **params)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}"
                         f" (flow matching: {', '.join(FLOW_SCHEDULES)})")
    return SCHEDULES[name](n, **params)
