"""diffusers interop: a UNet + scheduler seen as a diffsolve denoiser, and the start / end conversions
that make a diffsolve run match a diffusers loop to the last digit.

diffusers works in variance-preserving (VP) coordinates z = sqrt(abar) x0 + sqrt(1 - abar) n; diffsolve
in variance-exploding (VE) ones x = z / sqrt(abar) = x0 + sigma n, sigma = sqrt((1 - abar) / abar).
A diffusers run starts at z_T = latents and ends at z at the scheduler's final alpha, so

    x = sample_ddim(denoiser_from_unet(unet, sched), to_ve(latents, sigmas[0]), sigmas, ...)
    latents_0 = from_ve(x, sigmas[-1])

with `sigmas, timesteps = sigmas_from_scheduler(sched, n)` reproduces `sched.set_timesteps(n)` followed
by `sched.step` in a loop. DDIM noise is the same tensor in both coordinates: diffusers adds
std_dev_t * n to z_prev; diffsolve adds sigma_up * n to x_prev = z_prev / sqrt(abar_prev), and
sigma_up = std_dev_t / sqrt(abar_prev).

Nothing here imports diffusers: the functions read the public attributes of the objects they are given
(`scheduler.alphas_cumprod`, `scheduler.config`, `unet(...)`).
"""
import torch

from diffsolve.denoisers import VPDenoiser, append_dims
from diffsolve.schedules import sigmas_discrete


class UNetEps(torch.nn.Module):
    """A diffusers `UNet2DConditionModel` as a VP network `eps_model(z, t, **cond)`.

    `t` may be a number, a 0-d tensor or a [B] float tensor (fractional timesteps are passed through);
    keyword arguments (`encoder_hidden_states`, `added_cond_kwargs`, `timestep_cond`, ...) go to the UNet.
    The output is whatever the UNet predicts (epsilon, v or the sample, per the scheduler's config).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, z, t, encoder_hidden_states=None, **kw):
        return self.unet(z, t, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kw)[0]


def denoiser_from_unet(unet, scheduler, quantize=False):
    """A VE denoiser D(x, sigma, encoder_hidden_states=...) from a diffusers UNet and its scheduler."""
    return VPDenoiser(UNetEps(unet), scheduler.alphas_cumprod, scheduler.config.prediction_type, quantize=quantize)


def _config(scheduler, key, default):
    return getattr(scheduler.config, key, default) if hasattr(scheduler, "config") else default


def final_alphas_cumprod(scheduler):
    """The alpha the scheduler's last step lands on: 1.0 with `set_alpha_to_one=True`, else abar_0."""
    acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return 1.0 if _config(scheduler, "set_alpha_to_one", True) else acp[0].item()


def sigmas_from_scheduler(scheduler, n, dtype=torch.float64):
    """`(sigmas, timesteps)` of `scheduler.set_timesteps(n)` from the scheduler's config, without touching
    the scheduler's state: n + 1 descending sigmas, the last at `final_alphas_cumprod(scheduler)` (n when
    the last timestep is 0 and the final alpha is abar_0: that diffusers step is the identity).

    diffusers' DDIM steps from t to t - T // n, which is the next timestep of this grid for "leading"
    spacing and for "trailing" when T is a multiple of n; elsewhere (e.g. "linspace") its DDIM lands off
    the grid it then continues on, which no single sigma grid reproduces.
    """
    acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    sigmas, timesteps = sigmas_discrete(acp, n, spacing=_config(scheduler, "timestep_spacing", "leading"),
                                        steps_offset=_config(scheduler, "steps_offset", 0),
                                        final_alphas_cumprod=final_alphas_cumprod(scheduler), dtype=dtype)
    if sigmas[-1] == sigmas[-2]:
        # Last timestep 0 with set_alpha_to_one=False: diffusers' last step goes from abar_0 to abar_0, the
        # identity (it costs a model call and changes nothing); drop it so the grid is strictly descending.
        if len(sigmas) == 2:
            raise ValueError(f"{n} step(s) at timestep 0 to abar_0: diffusers' only step is the identity")
        sigmas = sigmas[:-1]
    return sigmas, timesteps


def _scale(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return append_dims((1 + sigma ** 2).sqrt(), x.ndim)


def to_ve(latents, sigma):
    """VP latents at noise level sigma -> VE: latents * sqrt(1 + sigma**2) (= latents / sqrt(abar))."""
    return (latents * _scale(sigma, latents)).to(latents.dtype)


def from_ve(x, sigma):
    """VE -> VP latents at noise level sigma: x / sqrt(1 + sigma**2) (= x * sqrt(abar))."""
    return (x / _scale(sigma, x)).to(x.dtype)


def variance_noise_sampler(noises):
    """A noise sampler returning the given tensors in order, one per stochastic step: feed the same list as
    `variance_noise=` to diffusers' `DDIMScheduler.step` to make both runs draw the same noise."""
    it = iter(list(noises))

    def sample(sigma=None, sigma_next=None):
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"variance_noise_sampler ran out of noise at sigma {sigma} -> {sigma_next}") from None
    return sample
