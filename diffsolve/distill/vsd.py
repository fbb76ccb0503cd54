"""Variational score distillation (Wang et al. 2023, ProlificDreamer) in VE coordinates.

grad = w(sigma) (eps_pretrained(z; sigma) - eps_phi(z; sigma)), z = x + sigma n, where phi is a
variational denoiser fitted to the current particles. eps_pre - eps_phi = (D_phi - D_pre) / sigma.
"""
import copy

import torch

from ..denoisers import append_dims
from .base import NoisyDistiller

__all__ = ["DenoisingTrainer", "VSD", "ideal_variational"]


class VSD(NoisyDistiller):
    """`variational` is a denoiser; it is refitted to the particles at each optimisation step (`on_step`,
    or `update(particles)`) through `variational_update(particles, generator)` (a `DenoisingTrainer`, or
    `ideal_variational` for the ideal column), which returns the new variational denoiser. Two model
    evaluations per call (three with CFG on the pretrained model), the variational fit not counted."""

    name = "VSD"

    def __init__(self, model, variational, *, variational_update=None, **kw):
        super().__init__(model, **kw)
        self.variational, self.variational_update = variational, variational_update

    def on_step(self, step, x=None, generator=None):
        """Refit the variational denoiser to the particles x before the step's gradient."""
        super().on_step(step, x, generator)
        if x is not None:
            self.update(x, generator)

    def _grad(self, x, call):
        if self.variational is None:
            raise ValueError("VSD has no variational denoiser yet: pass `variational=` or call on_step / update "
                             "with the particles first")
        sigma = self.draw_sigma(x, call)
        n = call.draws.randn(x)
        s = append_dims(sigma, x.ndim)
        z = x + s * n
        d_pre = call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)
        d_phi = call.denoiser(transforms=(), model=self.variational)(z, sigma).to(x.dtype)
        return self.weighted(sigma, (d_phi - d_pre) / s)

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
    """One Adam step per update of a learned variational denoiser on the particles (EDM denoising loss
    |D_phi(x + sigma n; sigma) - x|^2 / sigma^2 with sigma ~ exp(N(p_mean, p_std))). The network
    starts as a copy of `net` (the 2D analogue of zero-initialised LoRA). A network with a
    `score(x, sigma, create_graph=True)` method (the toy model) is differentiated through its score."""

    def __init__(self, net, lr=1e-3, betas=(0.9, 0.99), p_mean=-2.3, p_std=1.5, steps_per_update=1):
        self.net = copy.deepcopy(net).train()
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=betas)
        self.p_mean, self.p_std, self.steps = p_mean, p_std, steps_per_update

    def _denoise(self, z, sigma):
        if hasattr(self.net, "score"):
            return z + append_dims(sigma, z.ndim) ** 2 * self.net.score(z, sigma, create_graph=True)
        return self.net(z, sigma)

    def __call__(self, particles, generator=None):
        x = particles.detach()
        for _ in range(self.steps):
            sigma = torch.exp(self.p_mean + self.p_std * torch.randn(x.shape[0], generator=generator,
                                                                     dtype=x.dtype)).to(x.device)
            z = x + append_dims(sigma, x.ndim) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            with torch.enable_grad():
                loss = (((self._denoise(z, sigma) - x) / append_dims(sigma, x.ndim)) ** 2).flatten(1).sum(1).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            self.opt.step()
        return self.net
