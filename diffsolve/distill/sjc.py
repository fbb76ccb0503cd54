"""Score Jacobian Chaining (Wang et al. 2022, "Score Jacobian Chaining: Lifting Pretrained 2D Diffusion
Models for 3D Generation"), and the discrete timestep grid it and ISM draw from.

SJC works in VE coordinates from the start: its perturb-and-average score (paper §3.2, PAAS, eq. 9) of
x = g(theta) is the denoiser's score at z = x + sigma n, and the official code (pals-ttic/sjc,
run_sjc.py, the `score = (Ds - y) / σ` lines) descends along

    grad = (x - D(x + sigma n; sigma)) / sigma      (var_red=True, the default; = eps_hat - n)
    grad = (z - D(z; sigma)) / sigma = eps_hat      (var_red=False, the paper's plain PAAS, times sigma)

with sigma drawn uniformly over the *indices* of the model's discrete noise levels (run_sjc.py draws
`np.random.choice(model.us[20:-10])`), no extra weighting. threestudio's `use_sjc=True`
(stable_diffusion_guidance.py, `compute_grad_sjc`) computes the same two expressions. SJC is SDS with
uniform weighting and index-uniform sigma: the difference from SDS here is the sigma distribution.
"""
import torch

from .base import NoisyDistiller

__all__ = ["SJC", "TimestepGrid", "sd_sigmas"]


def sd_sigmas(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """VE sigma_t = sqrt((1 - abar_t) / abar_t) of Stable Diffusion's scaled-linear schedule (float64, [T])."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


class TimestepGrid:
    """Integer timesteps t in {t_min, ..., t_max} (inclusive) over a grid of VE sigmas, drawn uniformly
    (threestudio's `torch.randint(min_step, max_step + 1)`; SJC's index-uniform choice).

    `sigmas`: the [T] increasing VE sigmas of t = 0..T-1 (default `sd_sigmas()`). `sigma_min` /
    `sigma_max` (optional) restrict the default range to the timesteps whose sigma lies in [sigma_min,
    sigma_max] (a model trained on a narrower range)."""

    def __init__(self, sigmas=None, t_min=None, t_max=None, sigma_min=None, sigma_max=None):
        s = sd_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if s.numel() < 2 or not bool((s[1:] > s[:-1]).all()) or not bool((s > 0).all()):
            raise ValueError("sigmas must be a positive, strictly increasing grid of at least 2 levels")
        self.sigmas = s
        inside = torch.ones_like(s, dtype=torch.bool)
        if sigma_min is not None:
            inside &= s >= sigma_min * (1 - 1e-9)
        if sigma_max is not None:
            inside &= s <= sigma_max * (1 + 1e-9)
        idx = inside.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"no timestep has sigma in [{sigma_min}, {sigma_max}]")
        lo, hi = int(idx[0]), int(idx[-1])
        self.set_range(lo if t_min is None else t_min, hi if t_max is None else t_max)

    def __len__(self):
        return self.sigmas.numel()

    def set_range(self, t_min, t_max):
        if int(t_min) != t_min or int(t_max) != t_max or not 0 <= t_min <= t_max < len(self):
            raise ValueError(f"need integers 0 <= t_min <= t_max < {len(self)}, got {t_min}, {t_max}")
        self.t_min, self.t_max = int(t_min), int(t_max)

    def sigma(self, t):
        """sigma of integer timesteps t (a tensor or an int)."""
        return self.sigmas[torch.as_tensor(t, dtype=torch.long)]

    def draw(self, draws, rows, device="cpu"):
        """(t [rows] long, sigma [rows] float64): t uniform on {t_min..t_max} from one uniform draw per row,
        t = t_min + floor(u (t_max - t_min + 1))."""
        u = draws.rand(rows, "cpu")
        n = self.t_max - self.t_min + 1
        t = (self.t_min + torch.floor(u * n)).long().clamp(max=self.t_max)
        return t.to(device), self.sigmas[t].to(device)


class SJC(NoisyDistiller):
    """grad = (x - D(x + sigma n; sigma)) / sigma (var_red, default) or (z - D(z; sigma)) / sigma, sigma on
    `grid` (a `TimestepGrid`; default Stable Diffusion's sigmas at t in [20, T - 11], run_sjc.py's
    `us[20:-10]`, narrowed to [sigma_min, sigma_max] when those are given). Guidance transforms apply as
    in SDS (the official code scores with CFG). One model evaluation per call (two with CFG)."""

    name = "SJC"

    def __init__(self, model, *, var_red=True, grid=None, sigma_min=None, sigma_max=None, **kw):
        if grid is None:
            full = sd_sigmas()
            grid = TimestepGrid(full, 20, len(full) - 11) if sigma_min is None and sigma_max is None else \
                TimestepGrid(full, sigma_min=sigma_min, sigma_max=sigma_max)
        if not isinstance(grid, TimestepGrid):
            raise ValueError(f"grid must be a TimestepGrid, got {grid!r}")
        kw.setdefault("weighting", "uniform")
        super().__init__(model, sigma_min=float(grid.sigma(grid.t_min)),
                         sigma_max=max(float(grid.sigma(grid.t_max)), float(grid.sigma(grid.t_min)) * (1 + 1e-6)),
                         **kw)
        self.grid, self.var_red, self.last_t = grid, bool(var_red), None

    def draw_sigma(self, x, call):
        t, sigma = self.grid.draw(call.draws, x.shape[0], x.device)
        self.last_t = t
        return sigma.to(x.dtype)

    def _grad(self, x, call):
        sigma, s, n, z = self.noised(x, call)
        d = call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)
        return self.weighted(sigma, ((x if self.var_red else z) - d) / s)

