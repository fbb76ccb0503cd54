"""Score distillation via reparametrised DDIM (Lukoianov et al. 2024), in VE coordinates: two variants.

`SDI` (registered "sdi") follows the paper's algorithm on this package's rho-grid: SDS's gradient form
with a better noise: kappa comes from DDIM inversion of x up to sigma(t + tau) (with its own, typically
negative, inversion guidance), plus eta noise; t is annealed from high to low noise over the optimisation. grad = w(sigma_t) (eps_hat(x + sigma_t kappa; sigma_t) - kappa).

`OfficialSDI` (registered "sdi_official") is what the official code computes: grad = x - x0_hat on Stable
Diffusion's DDPM timesteps, eta noise at every inversion step, the model evaluated on the inverted sample.
"""
import torch

from ..denoisers import append_dims
from .base import Distiller, NoisyDistiller, euler_inversion, sigma_from_uniform

__all__ = ["OfficialSDI", "SDI", "sd_alphas_cumprod"]


class SDI(NoisyDistiller):
    """total_steps: length of the optimisation (t anneals linearly over it; `update_step(k)` sets k).
    t_range: (u_lo, u_hi) on the rho-grid (u = 0 is sigma_max): u_k = u_lo + (u_hi - u_lo) k / (K - 1).
    tau_max: the inversion target jitters to u - U(0, tau_max). inversion_transforms: guidance used while
    inverting (the official code inverts with CFG of scale -7.5); None uses the distiller's transforms.
    eta_noise: kappa += eta_noise * xi. Cost: n_inversion + 1 evaluations (x2 guided)."""

    name = "SDI"

    def __init__(self, model, *, total_steps=150, t_range=(0.02, 0.98), tau_max=1 / 30, n_inversion=10,
                 eta_noise=0.3, inversion_transforms=None, **kw):
        super().__init__(model, **kw)
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        if int(n_inversion) != n_inversion or n_inversion < 1:
            raise ValueError(f"n_inversion must be a positive integer, got {n_inversion}")
        self.total_steps, self.t_range, self.tau_max = int(total_steps), t_range, tau_max
        if not 0 <= t_range[0] <= t_range[1] <= 1:
            raise ValueError(f"t_range must be (u_lo, u_hi) with 0 <= u_lo <= u_hi <= 1, got {t_range}")
        if not (tau_max >= 0 and eta_noise >= 0):
            raise ValueError(f"need tau_max >= 0 and eta_noise >= 0, got tau_max={tau_max}, eta_noise={eta_noise}")
        self.n_inversion, self.eta_noise = int(n_inversion), eta_noise
        self.inversion_transforms = None if inversion_transforms is None else list(inversion_transforms)

    def update_step(self, step):
        """Set the optimisation step k that t is annealed by (threestudio's update_step contract)."""
        self.on_step(step)

    def sigma_t(self, step=None):
        k = self.step if step is None else step
        lo, hi = self.t_range
        u = lo + (hi - lo) * min(k, self.total_steps - 1) / max(self.total_steps - 1, 1)
        return float(sigma_from_uniform(torch.tensor(u, dtype=torch.float64), self.sigma_min, self.sigma_max,
                                        self.sigma_sampling, self.rho))

    def invert(self, x, sigma_target, call):
        """Euler (deterministic DDIM) inversion from x at sigma_min up to sigma_target (per row), on the rho-grid."""
        den = call.denoiser(transforms=self.inversion_transforms)
        u_end = self._u_of(sigma_target)
        levels = [sigma_from_uniform(1 + (u_end - 1) * j / self.n_inversion, self.sigma_min, self.sigma_max,
                                     self.sigma_sampling, self.rho).to(x.dtype) for j in range(self.n_inversion + 1)]
        return euler_inversion(den, x, levels, call.extra_args)[-1]

    def _u_of(self, sigma):
        """Inverse of sigma_from_uniform on the configured grid."""
        lo, hi = self.sigma_min, self.sigma_max
        if self.sigma_sampling == "karras":
            r = self.rho
            return (sigma.to(torch.float64) ** (1 / r) - hi ** (1 / r)) / (lo ** (1 / r) - hi ** (1 / r))
        return (sigma.to(torch.float64).log() - torch.log(torch.tensor(hi))) / (
            torch.log(torch.tensor(lo)) - torch.log(torch.tensor(hi)))

    def _kappa(self, x, call, sigma_t):
        """kappa: DDIM inversion of x to sigma(u_t - tau), tau ~ U(0, tau_max), plus eta_noise xi."""
        u_t = float(self._u_of(torch.tensor(sigma_t)))
        tau = call.draws.rand(x.shape[0]) * self.tau_max
        target = sigma_from_uniform((u_t - tau).clamp(min=0.0), self.sigma_min, self.sigma_max, self.sigma_sampling,
                                    self.rho).to(device=x.device, dtype=x.dtype)
        kappa = (self.invert(x, target, call) - x) / append_dims(target, x.ndim)
        if self.eta_noise > 0:
            kappa = kappa + self.eta_noise * call.draws.randn(x)
        return kappa

    def kappa(self, x, generator=None, *, seed=None):
        """The noise kappa of one gradient call at the current step (not counted into `nfe`)."""
        from .base import Call, Draws
        return self._kappa(x, Call(self, x, Draws(generator, seed), None, None), self.sigma_t())

    def _grad(self, x, call, step=None):
        sigma_t = self.sigma_t(step)
        kappa = self._kappa(x, call, sigma_t)
        sigma = torch.full((x.shape[0],), sigma_t, dtype=x.dtype, device=x.device)
        z = x + sigma_t * kappa
        eps = (z - call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)) / sigma_t
        return self.weighted(sigma, eps - kappa)


def sd_alphas_cumprod(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000):
    """Stable Diffusion's scaled-linear DDPM schedule abar_t, t = 0 .. T-1 (float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, int(num_train_timesteps), dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class OfficialSDI(Distiller):
    """SDI as the official code computes it (ottogin/score-distillation-via-inversion,
    threestudio/models/guidance/stable_diffusion_sdi_guidance.py; the same file in threestudio @1ade495b),
    written in VE coordinates (z = x_VP / sqrt(abar)) on its DDPM schedule `alphas_cumprod` (default
    Stable Diffusion's scaled-linear one, 1000 steps):

      * timestep: t_k = int(T (hi - (hi - lo) k / K)) for (lo, hi) = t_range, k the optimisation step, K =
        total_steps (`update_step`'s annealing: 980 -> 20 by default, VE sigma 13.0 -> 0.14);
      * inversion: DDIM inversion from x, taken as the sample at abar_0 (sigma 0.029; SD's
        set_alpha_to_one = False), through the "leading" grid timesteps j T / n + steps_offset below t,
        then to t + delta, delta = floor(U jitter_steps) whole DDPM steps (default T / n_inversion: 0..99;
        the official code draws one delta per batch, this one per row); after every inversion step
        z += inversion_eta sqrt(DDPM posterior variance) xi (in VE units: divided by sqrt(abar_next));
      * kappa = (z_{t+delta} - x) / sigma_{t+delta}; the model is evaluated at timestep t on the inverted
        sample itself, not re-noised: u = sqrt(abar_{t+delta} / abar_t) z_{t+delta} (the same VP latent read
        at level t), and grad = x - D(u; sigma_t) (the official target x0_hat; its declared
        weighting_strategy is never applied).

    inversion_transforms: the guidance used while inverting (the official inversion_guidance_scale -7.5);
    None uses the distiller's transforms. Cost: the inversion steps (2 + the grid steps below t) + 1."""

    name = "SDI (official)"

    def __init__(self, model, *, total_steps=150, t_range=(0.02, 0.98), n_inversion=10, inversion_eta=0.3,
                 jitter_steps=None, steps_offset=1, alphas_cumprod=None, inversion_transforms=None, transforms=(),
                 extra_args=None):
        super().__init__(model, transforms, extra_args)
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        if int(n_inversion) != n_inversion or n_inversion < 1:
            raise ValueError(f"n_inversion must be a positive integer, got {n_inversion}")
        acp = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if acp.ndim != 1 or len(acp) < 2 or not ((acp > 0) & (acp < 1)).all() or not (acp[1:] < acp[:-1]).all():
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table in (0, 1)")
        T = len(acp)
        if not (len(t_range) == 2 and 0 <= t_range[0] <= t_range[1] <= 1):
            raise ValueError(f"t_range must be (lo, hi) fractions of the {T} timesteps with 0 <= lo <= hi <= 1, "
                             f"got {t_range}")
        if int(n_inversion) > T // 2:
            raise ValueError(f"n_inversion must be at most {T // 2} for {T} timesteps, got {n_inversion}")
        if int(steps_offset) != steps_offset or not 0 <= steps_offset < T // int(n_inversion):
            raise ValueError(f"steps_offset must be an integer in [0, {T // int(n_inversion)}), got {steps_offset}")
        jitter = T / int(n_inversion) if jitter_steps is None else jitter_steps
        if not (isinstance(jitter, (int, float)) and 0 < jitter <= T):
            raise ValueError(f"jitter_steps must be a number in (0, {T}], got {jitter_steps!r}")
        if not inversion_eta >= 0:
            raise ValueError(f"inversion_eta must be >= 0, got {inversion_eta}")
        self.total_steps, self.t_range, self.n_inversion = int(total_steps), tuple(t_range), int(n_inversion)
        self.inversion_eta, self.jitter_steps, self.steps_offset = float(inversion_eta), float(jitter), int(steps_offset)
        self.alphas_cumprod, self.T = acp, T
        self.inversion_transforms = None if inversion_transforms is None else list(inversion_transforms)

    def update_step(self, step):
        """Set the optimisation step k that t is annealed by (threestudio's update_step contract)."""
        self.on_step(step)

    def timestep(self, step=None):
        """The DDPM timestep t of optimisation step `step` (default: the current one)."""
        k = self.step if step is None else step
        lo, hi = self.t_range
        percent = (hi - lo) * (1 - min(k, self.total_steps) / self.total_steps) + lo
        return max(int(self.T * percent), self.steps_offset + 1)  # at least one grid timestep below t

    def sigma_of(self, t):
        """VE sigma of DDPM timesteps t (a tensor; negative t is the initial level abar_0)."""
        a = self.alphas_cumprod[t.clamp(min=0)]
        return ((1 - a) / a).sqrt()

    def grid(self, t):
        """The inversion's grid timesteps below t, after the initial (negative) one."""
        ratio = self.T // self.n_inversion
        ts = torch.arange(self.n_inversion, dtype=torch.long) * ratio + self.steps_offset
        ts = ts[ts < t]
        return torch.cat([ts[:1] - ratio, ts])

    def _invert(self, x, call):
        """(u, kappa, t): the inverted sample read at level t, its noise, the timestep."""
        t = self.timestep()
        delta = (call.draws.rand(x.shape[0], x.device) * self.jitter_steps).floor().long()
        last = (t + delta).clamp(max=self.T - 1)
        den = call.denoiser(transforms=self.inversion_transforms)
        acp = self.alphas_cumprod.to(x.device)
        levels = [acp[g.clamp(min=0)].expand(x.shape[0]) for g in self.grid(t)] + [acp[last]]
        z = x / append_dims(levels[0].sqrt().to(x.dtype), x.ndim)  # the latent x read as the sample at abar_0
        for a_lo, a_hi in zip(levels[:-1], levels[1:]):
            s_lo, s_hi = ((1 - a_lo) / a_lo).sqrt().to(x.dtype), ((1 - a_hi) / a_hi).sqrt().to(x.dtype)
            d = den(z, s_lo, **call.extra_args).to(x.dtype)
            z = d + append_dims(s_hi / s_lo, x.ndim) * (z - d)  # the DDIM step: x0_hat + sigma_next eps_hat
            if self.inversion_eta > 0:
                variance = (1 - a_lo) / (1 - a_hi) * (1 - a_hi / a_lo)  # DDPM posterior variance, VP units
                std = self.inversion_eta * (variance / a_hi).sqrt().to(x.dtype)
                z = z + append_dims(std, x.ndim) * call.draws.randn(x)
        a_last, a_t = levels[-1].to(x.dtype), acp[t].to(x.dtype)
        kappa = (z - x) / append_dims(((1 - a_last) / a_last).sqrt(), x.ndim)
        return z * append_dims((a_last / a_t).sqrt(), x.ndim), kappa, t

    def kappa(self, x, generator=None, *, seed=None):
        """The noise kappa of one gradient call at the current step (not counted into `nfe`)."""
        from .base import Call, Draws
        return self._invert(x, Call(self, x, Draws(generator, seed), None, None))[1]

    def _grad(self, x, call):
        u, _, t = self._invert(x, call)
        sigma = self.sigma_of(torch.tensor(t)).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        return x - call.denoiser()(u, sigma, **call.extra_args).to(x.dtype)
