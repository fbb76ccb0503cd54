"""Variational score distillation (Wang et al. 2023, ProlificDreamer) in VE coordinates.

grad = w(sigma) (eps_pretrained(z; sigma) - eps_phi(z; sigma)), z = x + sigma n, where phi is a
variational denoiser fitted to the current particles. eps_pre - eps_phi = (D_phi - D_pre) / sigma.
"""
import copy

import torch

from ..denoisers import append_dims
from .base import NoisyDistiller, sigma_from_uniform

__all__ = ["DenoisingTrainer", "VSD", "ideal_variational"]


class VSD(NoisyDistiller):
    """`variational` is a denoiser; it is refitted to the particles at each optimisation step (`on_step`,
    or `update(particles)`) through `variational_update(particles, generator)` (a `DenoisingTrainer`, or
    `ideal_variational` for the ideal column), which returns the new variational denoiser. A
    `DenoisingTrainer` without a sigma distribution of its own is trained on this distiller's sigma sampling
    (threestudio trains its LoRA on the t range of the gradient). Two model evaluations per call (three with
    CFG on the pretrained model), the variational fit not counted."""

    name = "VSD"

    def __init__(self, model, variational, *, variational_update=None, **kw):
        super().__init__(model, **kw)
        self.variational, self.variational_update = variational, variational_update
        if isinstance(variational_update, DenoisingTrainer):
            variational_update.follow(self)

    def on_step(self, step, x=None, generator=None):
        """Refit the variational denoiser to the particles x before the step's gradient."""
        super().on_step(step, x, generator)
        if x is not None:
            self.update(x, generator)

    def _grad(self, x, call):
        if self.variational is None:
            raise ValueError("VSD has no variational denoiser yet: pass `variational=` or call on_step / update "
                             "with the particles first")
        sigma, s, n, z = self.noised(x, call)
        d_pre = call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)
        d_phi = call.denoiser(transforms=(), model=self.variational)(z, sigma).to(x.dtype)
        return self.weighted(sigma, (d_phi - d_pre) / s)

    def sigma_of_uniform(self, u):
        """The gradient's sigma distribution: u ~ U(0, 1) mapped as `draw_sigma` maps it."""
        return sigma_from_uniform(u, self.sigma_min, self.sigma_max, self.sigma_sampling, self.rho)

    def update(self, particles, generator=None):
        """Refit the variational denoiser to the current particles (detached)."""
        if self.variational_update is not None:
            self.variational = self.variational_update(particles.detach(), generator)
        return self.variational


def ideal_variational(particles, generator=None):
    """The analytic optimum of the variational fit: the ideal denoiser (eq. 16) of the particle set."""
    from ..analytic import EmpiricalDenoiser
    return EmpiricalDenoiser(particles)


class DenoisingTrainer:
    """`steps_per_update` Adam steps per update of a learned variational denoiser on the particles (EDM
    denoising loss |D_phi(x + sigma n; sigma) - x|^2 / sigma^2). sigma: lognormal exp(N(p_mean, p_std^2)) when
    both are given, otherwise the sigma distribution of the VSD it is given to (`follow`; threestudio trains
    its LoRA on the gradient's t range). The network starts as a copy of `net` (the 2D analogue of
    zero-initialised LoRA). A network with a `score(x, sigma, create_graph=True)` method (the toy model) is
    differentiated through its score."""

    def __init__(self, net, lr=1e-3, betas=(0.9, 0.99), p_mean=None, p_std=None, steps_per_update=1):
        if (p_mean is None) != (p_std is None):
            raise ValueError(f"give both p_mean and p_std (a lognormal sigma) or neither (the VSD's own sigma "
                             f"distribution), got p_mean={p_mean}, p_std={p_std}")
        if p_std is not None and not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if int(steps_per_update) != steps_per_update or steps_per_update < 1:
            raise ValueError(f"steps_per_update must be a positive integer, got {steps_per_update!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.net = copy.deepcopy(net).train()
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=betas)
        self.p_mean, self.p_std, self.steps = p_mean, p_std, int(steps_per_update)
        self.sigma_of_uniform = None  # set by follow(vsd) when no lognormal is given

    def follow(self, vsd):
        """Train on `vsd`'s sigma distribution (unless a lognormal was given)."""
        if self.p_mean is None:
            self.sigma_of_uniform = vsd.sigma_of_uniform

    def draw_sigma(self, rows, generator=None, dtype=torch.float64):
        if self.p_mean is not None:
            return torch.exp(self.p_mean + self.p_std * torch.randn(rows, generator=generator, dtype=dtype))
        if self.sigma_of_uniform is None:
            raise ValueError("DenoisingTrainer has no sigma distribution: give p_mean and p_std, or pass it to a VSD "
                             "as variational_update (it then trains on the VSD's sigma sampling)")
        return self.sigma_of_uniform(torch.rand(rows, generator=generator, dtype=torch.float64)).to(dtype)

    def _denoise(self, z, sigma):
        if hasattr(self.net, "score"):
            return z + append_dims(sigma, z.ndim) ** 2 * self.net.score(z, sigma, create_graph=True)
        return self.net(z, sigma)

    def __call__(self, particles, generator=None):
        x = particles.detach()
        for _ in range(self.steps):
            sigma = self.draw_sigma(x.shape[0], generator, x.dtype).to(x.device)
            z = x + append_dims(sigma, x.ndim) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            with torch.enable_grad():
                loss = (((self._denoise(z, sigma) - x) / append_dims(sigma, x.ndim)) ** 2).flatten(1).sum(1).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            self.opt.step()
        return self.net
