"""One convention for every model: the variance-exploding denoiser D(x, sigma, **cond) -> x0_hat.

x = x0 + sigma * n. The probability-flow ODE is dx/dsigma = (x - D) / sigma, the score is
(D - x) / sigma**2 and the noise prediction is (x - D) / sigma (Karras et al. 2022).
Variance-preserving epsilon / v models are wrapped once, here, at the edge.
"""
import torch

from .schedules import sigmas_from_alphas_cumprod

__all__ = ["DiscreteTimesteps", "PREDICTION_TYPES", "VPDenoiser", "VPModelView", "append_dims", "denoised_from_eps", "denoised_from_v", "eps_from_denoised", "score_from_denoised", "sigma_rows", "v_from_denoised"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def append_dims(t, ndim):
    """Give a per-row tensor (or a number) trailing singleton dims so it broadcasts against x."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def sigma_rows(sigma, x):
    """A [B] tensor of sigmas on x's device from a number, 0-d tensor or [B] tensor (a Python number is
    taken in x's dtype directly, never rounded through float32 first)."""
    if isinstance(sigma, (int, float)) and x.is_floating_point():
        sigma = torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device)
    sigma = sigma.to(torch.promote_types(sigma.dtype, x.dtype) if sigma.is_floating_point() else x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != x.shape[:1]:
        raise ValueError(f"sigma must be a scalar or have shape {tuple(x.shape[:1])}, got {tuple(sigma.shape)}")
    return sigma


# Views of one denoiser output. sigma may be a number or a [B] tensor.
def eps_from_denoised(x, sigma, denoised):
    """eps = (x - D) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def score_from_denoised(x, sigma, denoised):
    """grad log p_sigma(x) = (D - x) / sigma**2 (Tweedie)."""
    return (denoised - x) / append_dims(sigma, x.ndim) ** 2


def v_from_denoised(x, sigma, denoised):
    """v-prediction (sigma_data = 1, VP): v = alpha * eps - sigma_vp * x0, alpha = 1 / sqrt(1 + sigma**2)."""
    s = append_dims(sigma, x.ndim)
    return ((x - denoised) / s - s * denoised) / (1 + s ** 2) ** 0.5


def denoised_from_eps(x, sigma, eps):
    """D = x - sigma * eps."""
    return x - append_dims(sigma, x.ndim) * eps


def denoised_from_v(x, sigma, v):
    """D = x / (1 + sigma**2) - sigma / sqrt(1 + sigma**2) * v (k-diffusion's VDenoiser with sigma_data = 1)."""
    s = append_dims(sigma, x.ndim)
    return x / (1 + s ** 2) - s / (1 + s ** 2) ** 0.5 * v


_FROM_OUTPUT = {"epsilon": denoised_from_eps, "v_prediction": denoised_from_v,
                "sample": lambda x, sigma, out: out}
_TO_OUTPUT = {"epsilon": eps_from_denoised, "v_prediction": v_from_denoised,
              "sample": lambda x, sigma, denoised: denoised}


def _check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class DiscreteTimesteps(torch.nn.Module):
    """The sigma <-> timestep map of a discrete VP model, fractional timesteps interpolated in log sigma."""

    def __init__(self, alphas_cumprod, quantize=False):
        super().__init__()
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        if (sigmas[1:] <= sigmas[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.quantize = quantize

    @property
    def sigma_min(self):
        return self.sigmas[0].item()

    @property
    def sigma_max(self):
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma):
        """Fractional timestep for each sigma (clamped to the table's range)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.log_sigmas.device).log()
        if self.quantize:
            return (log_sigma[..., None] - self.log_sigmas).abs().argmin(-1).to(torch.float64)
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_val, hi_val = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        w = ((log_sigma - lo_val) / (hi_val - lo_val)).clamp(0, 1)
        return hi - 1 + w

    def t_to_sigma(self, t):
        """Sigma at a (fractional) timestep, interpolated in log sigma."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.log_sigmas.device)
        lo = t.floor().long().clamp(0, len(self.log_sigmas) - 2)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()


class VPDenoiser(DiscreteTimesteps):
    """A VP network `model(z, t, **cond)` (epsilon, v or sample prediction) seen as a VE denoiser.

    sigma = sqrt((1 - abar) / abar); the network sees z = x / sqrt(1 + sigma**2) at the timestep whose
    sigma this is (k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser mapping).
    """

    def __init__(self, model, alphas_cumprod, prediction_type="epsilon", quantize=False):
        super().__init__(alphas_cumprod, quantize)
        _check_prediction_type(prediction_type)
        self.inner_model = model
        self.prediction_type = prediction_type

    def forward(self, x, sigma, **cond):
        sigma = sigma_rows(sigma, x)
        t = self.sigma_to_t(sigma).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        s = append_dims(sigma, x.ndim)
        z = x * (1 + s ** 2).rsqrt()
        out = self.inner_model(z.to(x.dtype), t, **cond)
        return _FROM_OUTPUT[self.prediction_type](x, s, out).to(x.dtype)


class VPModelView(DiscreteTimesteps):
    """The other direction: a VE denoiser seen as a VP network `model(z, t, **cond)` that predicts
    epsilon, v or the sample, e.g. to drive a diffusers scheduler with a diffsolve denoiser."""

    def __init__(self, denoiser, alphas_cumprod, prediction_type="epsilon"):
        super().__init__(alphas_cumprod)
        _check_prediction_type(prediction_type)
        self.denoiser = denoiser
        self.prediction_type = prediction_type

    def forward(self, z, t, **cond):
        t = torch.as_tensor(t, device=z.device)
        sigma = self.t_to_sigma(t.expand(z.shape[0]) if t.ndim == 0 else t).to(z.dtype)
        x = z * append_dims((1 + sigma ** 2).sqrt(), z.ndim)
        return _TO_OUTPUT[self.prediction_type](x, sigma, self.denoiser(x, sigma, **cond))
