"""Interval Score Matching (Liang et al. 2023, LucidDreamer), in VE coordinates.

ISM replaces SDS's noisy sample and target by a DDIM-inversion pair (paper eq. 13-14):

    x_s = DDIM inversion of x up to s = t - delta_t, with the unconditional prediction,
    x_t = one more inversion step, x_s -> x_t,
    grad = w(t) (eps(x_t; y, t) [guided] - eps(x_s; null, s)),   w(t) = sqrt((1 - abar_t) / abar_t).

The official code (EnVision-Research/LucidDreamer, guidance/sd_utils.py `train_step` and
`add_noise_with_cfg`; defaults from arguments/__init__.py `GuidanceParams`) draws one integer timestep
per call, t ~ U{min_step, ..., max_step + warmup_extra - 1} with min / max_step = T (0.02, 0.5) and
warmup_extra = int(T (0.98 - 0.5) r) for the warm-up rate r = 1 - min(step / 1500, 1); delta_t = 80
(annealed from 100 by the same rate); x_s is reached from x + sigma_{t0} n, t0 = max(s - 200 * 5, 0),
in steps of at most 200 timesteps (`xs_delta_t`, `xs_inv_steps`, `xs_eta = 0`: deterministic), with
guidance scale 1 (`denoise_guidance_scale`, i.e. the unconditional prediction); the guided prediction
at x_t uses CFG 7.5 (diffusers form; here the call's guidance transform). The target eps(x_s; null, s)
is the prediction the last inversion step already made.

In VE coordinates a DDIM step between noise levels is z' = z + (sigma' - sigma) eps(z; sigma) exactly,
and w(t) = sigma_t. Deviations from the official code: no 0.1 per-channel offset noise on the start
point (it only perturbs the start at sigma_{t0} = 0.03) and no random horizontal flip (an image
augmentation, not part of the estimator). The unconditional prediction comes from the call's guidance
transform (its guide or unconditional arguments); without one, the model itself is used throughout.
Cost per call: ceil((s - t0) / 200) (at least 1) unconditional evaluations + 1 guided (2 with CFG).
"""
import math

from .base import NoisyDistiller
from .csd import guidance_parts
from .sjc import TimestepGrid, sd_sigmas

__all__ = ["ISM"]


class ISM(NoisyDistiller):
    """Options (official defaults): t_range=(0.02, 0.5), max_t_range=0.98, warmup_steps=1500 (the
    warm-up over which the upper timestep falls from T max_t_range to T t_range[1] and delta_t from
    delta_t_start to delta_t), delta_t=80, delta_t_start=100, xs_delta_t=200, xs_inv_steps=5. `grid`: the
    `TimestepGrid` of the model's sigmas (default Stable Diffusion's); `sigma_min` / `sigma_max` clamp the
    drawn timesteps into the model's trained range. `weighting=None` is the official w = sigma_t."""

    name = "ISM"

    def __init__(self, model, *, t_range=(0.02, 0.5), max_t_range=0.98, warmup_steps=1500, delta_t=80,
                 delta_t_start=100, xs_delta_t=200, xs_inv_steps=5, grid=None, sigma_min=None, sigma_max=None,
                 weighting=None, **kw):
        grid = TimestepGrid(sd_sigmas()) if grid is None else grid
        if not isinstance(grid, TimestepGrid):
            raise ValueError(f"grid must be a TimestepGrid, got {grid!r}")
        T = len(grid)
        lo_t = 0 if sigma_min is None else int((grid.sigmas < sigma_min * (1 - 1e-9)).sum())
        hi_t = T - 1 if sigma_max is None else int((grid.sigmas <= sigma_max * (1 + 1e-9)).sum()) - 1
        if not 0 <= lo_t <= hi_t:
            raise ValueError(f"no timestep of the grid has sigma in [{sigma_min}, {sigma_max}]")
        super().__init__(model, sigma_min=float(grid.sigmas[lo_t]),
                         sigma_max=float(grid.sigmas[hi_t]) * (1 + 1e-9) if hi_t == lo_t else float(grid.sigmas[hi_t]),
                         weighting="uniform" if weighting is None else weighting, **kw)
        if not (0 <= t_range[0] <= t_range[1] <= max_t_range <= 1):
            raise ValueError(f"need 0 <= t_range[0] <= t_range[1] <= max_t_range <= 1, got {t_range}, {max_t_range}")
        for name, v in (("warmup_steps", warmup_steps), ("delta_t", delta_t), ("delta_t_start", delta_t_start),
                        ("xs_delta_t", xs_delta_t), ("xs_inv_steps", xs_inv_steps)):
            if int(v) != v or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.grid, self.lo_t, self.hi_t = grid, lo_t, hi_t
        self.t_range, self.max_t_range, self.warmup_steps = tuple(t_range), float(max_t_range), int(warmup_steps)
        self.delta_t, self.delta_t_start = int(delta_t), int(delta_t_start)
        self.xs_delta_t, self.xs_inv_steps = int(xs_delta_t), int(xs_inv_steps)
        self.official_weight = weighting is None
        self.last_t = self.last_s = None

    def warm_up_rate(self, step=None):
        k = self.step if step is None else step
        return 1.0 - min(k / self.warmup_steps, 1.0) if self.warmup_steps else 0.0

    def timestep_bounds(self, step=None):
        """(lowest, highest) t drawn at `step` (official: randint's exclusive upper bound, minus one)."""
        T, r = len(self.grid), self.warm_up_rate(step)
        lo = int(T * self.t_range[0])
        hi = max(int(T * self.t_range[1]) + int(T * (self.max_t_range - self.t_range[1]) * r) - 1, lo)
        return lo, hi

    def current_delta_t(self, step=None):
        return int(self.delta_t + self.warm_up_rate(step) * (self.delta_t_start - self.delta_t))

    def draw_t(self, call):
        lo, hi = self.timestep_bounds()
        u = float(call.draws.rand(1)[0])
        t = lo + min(int(math.floor(u * (hi - lo + 1))), hi - lo)
        return min(max(t, self.lo_t), self.hi_t)

    def _grad(self, x, call):
        t = self.draw_t(call)
        s_idx = max(t - self.current_delta_t(), 0)
        start = max(s_idx - self.xs_delta_t * self.xs_inv_steps, 0)
        self.last_t, self.last_s = t, s_idx
        try:
            parts = guidance_parts(call, self.name)
            uncond, guided = parts.uncond, parts.guided
        except ValueError:
            if call.transforms:
                raise
            den = call.denoiser()
            uncond = guided = lambda z, sigma: den(z, sigma, **call.extra_args).to(z.dtype)
        sig = self.grid.sigmas.to(x.device)
        rows = x.new_ones(x.shape[0])
        z = x + float(sig[start]) * call.draws.randn(x)
        cur, eps = start, None
        for _ in range(self.xs_inv_steps):  # step 1: x_s by inversion from the start level
            eps = (z - uncond(z, float(sig[cur]) * rows)) / float(sig[cur])
            nxt = min(cur + self.xs_delta_t, s_idx)
            z = z + float(sig[nxt] - sig[cur]) * eps
            cur = nxt
            if cur == s_idx:
                break
        x_s = z
        eps_s = (x_s - uncond(x_s, float(sig[s_idx]) * rows)) / float(sig[s_idx])  # step 2: x_s -> x_t
        x_t = x_s + float(sig[t] - sig[s_idx]) * eps_s
        sigma_t = float(sig[t])
        eps_t = (x_t - guided(x_t, sigma_t * rows)) / sigma_t
        g = eps_t - eps_s
        sigma_rows = sigma_t * rows
        return sigma_t * g if self.official_weight else self.weighted(sigma_rows, g)
