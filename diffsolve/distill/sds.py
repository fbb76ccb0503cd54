"""Score distillation sampling (Poole et al. 2022; paper eq. 1) in VE coordinates."""
import torch

from ..denoisers import append_dims
from .base import NoisyDistiller


class SDS(NoisyDistiller):
    """grad = w(sigma) (eps_hat(x + sigma n; sigma) - n), sigma drawn per row from [sigma_min, sigma_max].

    With the "-n" control variate (default) this is w(sigma) (x - D(x + sigma n; sigma)) / sigma: the
    noise cancels exactly; without it the mean is the same and the variance much larger.
    One model evaluation per call (two with guidance).
    """

    def __init__(self, model, *, control_variate=True, **kw):
        super().__init__(model, **kw)
        self.control_variate = control_variate

    def _grad(self, x, generator, info):
        sigma = self.draw_sigma(x, generator)
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        s = append_dims(sigma, x.ndim)
        z = x + s * n
        eps = (z - self.denoiser(x.shape[0], info)(z, sigma, **self.extra_args).to(x.dtype)) / s
        return self.weighted(sigma, eps - n if self.control_variate else eps)
