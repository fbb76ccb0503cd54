"""Score distillation sampling (Poole et al. 2022; paper eq. 1) in VE coordinates."""
from .base import NoisyDistiller

__all__ = ["SDS"]


class SDS(NoisyDistiller):
    """grad = w(sigma) (eps_hat(x + sigma n; sigma) - n), sigma drawn per row from [sigma_min, sigma_max].

    With the "-n" control variate (default) this is w(sigma) (x - D(x + sigma n; sigma)) / sigma: the
    noise cancels exactly; without it the mean is the same and the variance much larger.
    One model evaluation per call (two with guidance).
    """

    name = "SDS"

    def __init__(self, model, *, control_variate=True, **kw):
        super().__init__(model, **kw)
        self.control_variate = bool(control_variate)

    def _grad(self, x, call):
        sigma, s, n, z = self.noised(x, call)
        eps = (z - call.denoiser()(z, sigma, **call.extra_args).to(x.dtype)) / s
        return self.weighted(sigma, eps - n if self.control_variate else eps)
