"""Score distillation via reparametrised DDIM (Lukoianov et al. 2024), in VE coordinates.

SDS's gradient form with a better noise: kappa comes from DDIM inversion of x up to sigma(t + tau)
(with its own, typically negative, inversion guidance), plus eta noise; t is annealed from high to
low noise over the optimisation. grad = w(sigma_t) (eps_hat(x + sigma_t kappa; sigma_t) - kappa).
"""
import torch

from ..denoisers import append_dims
from .base import NoisyDistiller, euler_inversion, sigma_from_uniform

__all__ = ["SDI"]


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

    def _grad(self, x, call, step=None):
        sigma_t = self.sigma_t(step)
        u_t = float(self._u_of(torch.tensor(sigma_t)))
        tau = call.draws.rand(x.shape[0]) * self.tau_max
        u_target = (u_t - tau).clamp(min=0.0)
        target = sigma_from_uniform(u_target, self.sigma_min, self.sigma_max, self.sigma_sampling,
                                    self.rho).to(device=x.device, dtype=x.dtype)
        kappa = (self.invert(x, target, call) - x) / append_dims(target, x.ndim)
        if self.eta_noise > 0:
            kappa = kappa + self.eta_noise * call.draws.randn(x)
        sigma = torch.full((x.shape[0],), sigma_t, dtype=x.dtype, device=x.device)
        z = x + sigma_t * kappa
        eps = (z - call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)) / sigma_t
        return self.weighted(sigma, eps - kappa)
