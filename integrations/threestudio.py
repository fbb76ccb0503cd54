"""threestudio-style guidance: diffsolve's distillers (MSD, SDS, VSD, SDI) behind threestudio's guidance
contract, so a text-to-3D pipeline can swap `stable-diffusion-guidance` for MSD.

This module never imports threestudio (see docs/threestudio.md for the registration wrapper a user adds to
a threestudio fork). Contract honoured (threestudio HEAD, `BaseObject` guidance):
  - `__call__(rgb [B,H,W,3] in [0,1], prompt_utils, elevation, azimuth, camera_distances,
    rgb_as_latents=False, **kw)` -> {"loss_sds", "grad_norm", "min_step", "max_step"};
  - `loss_sds = 0.5 * mse(latents, (latents - grad).detach(), "sum") / B`, so d loss_sds / d latents =
    grad / B, and a config's `lambda_sds` scales it;
  - `update_step(epoch, global_step, on_load_weights=False)` resolves the scheduled scalars.
Coordinates: the VAE gives clean latents x0; diffsolve's VE clean state is x0 itself (sigma = 0), so the
distiller works on the latents unscaled, with sigma in [sigma(min_step), sigma(max_step)] of the scheduler.
CFG is threestudio's / the paper's convention c + w (c - u) (diffsolve `cfg(w, convention="paper")`).
Randomness: call k (k = 0, 1, ...) since the last `update_step` draws from a CPU generator seeded with
`seed + global_step + k * 1_000_003` (recorded in `last_seed`); the VAE posterior uses `last_seed + 1`.
Precision and devices: the distiller works in float32 and each UNet call casts to the UNet's dtype
(`SDDenoiser(cast=True)`), so a float32 render drives a float16 UNet as in threestudio; rgb / latents and
the prompt embeddings must sit on the UNet's device (a ValueError naming both otherwise, before any work).
"""
import math

import torch
import torch.nn.functional as F

from diffsolve.distill import make_distiller, should_stop
from diffsolve.transforms import cfg, limited_interval

from .diffusers import SDComponents, SDDenoiser, check_on_unet, vae_encode

METHODS = ("msd", "sds", "vsd", "sdi")
NONFINITE = ("raise", "nan_to_num")


def C(value, global_step):
    """threestudio's scheduled scalar: a number, or [start_step, start_value, end_value, end_step] (linear)."""
    if isinstance(value, (int, float)):
        return value
    if len(value) != 4:
        raise ValueError(f"a scheduled value is a number or [start_step, start, end, end_step], got {value!r}")
    start_step, start, end, end_step = value
    frac = min(max((global_step - start_step) / max(end_step - start_step, 1), 0.0), 1.0)
    return start + (end - start) * frac


def _split_components(components):
    if isinstance(components, SDComponents):
        return components.unet, components.vae, components.scheduler
    parts = list(components)
    sched = [p for p in parts if hasattr(p, "alphas_cumprod")]
    vae = [p for p in parts if hasattr(p, "encode") and p not in sched]
    unet = [p for p in parts if p not in sched and p not in vae]
    if len(parts) != 3 or not (len(sched) == len(vae) == len(unet) == 1):
        raise ValueError("components must be SDComponents or a (unet, vae, scheduler) tuple in any order")
    return unet[0], vae[0], sched[0]


class DistillationGuidance(torch.nn.Module):
    """A diffsolve distiller as a threestudio guidance. `bandwidth_start` / `bandwidth_end` (MSD): lambda
    decays log-linearly from start to end over `trainer_max_steps` (default the paper's 1e3 -> 1e-2, the
    paper leaves the form unspecified). `grad_clip`, `min_step_percent`, `max_step_percent` accept
    threestudio's [start_step, start, end, end_step] schedules. `distiller_kwargs` go to the distiller
    (e.g. MSD `steps=`, `sampler=`; VSD `variational=`, `variational_update=`; SDI `n_inversion=`).
    VSD without `variational=` uses the frozen text-conditioned model (zero-initialised LoRA at step 0).
    The paper's §4.3 heuristics: `guidance_interval=(sigma_lo, sigma_hi)` applies CFG only there (any
    method); for MSD pass `kernel_interval=(lo, hi)` and `center="inverted"` (or "noised") through
    `distiller_kwargs`. §4.5's termination: `converged` is True once MSD's lambda is below
    `terminate_below` (the paper's lambda_1 = 1e-2); it never fires for the other methods.
    Non-finite gradients: `nonfinite="raise"` (default) lets the distiller's error through (it names the
    distiller, the sigma and the step); `nonfinite="nan_to_num"` is threestudio's behaviour (NaN -> 0,
    inf -> the largest float), and every call where it replaced something is counted in `nonfinite_calls`."""

    def __init__(self, components, method="msd", guidance_scale=7.5, min_step_percent=0.02,
                 max_step_percent=0.98, bandwidth_start=1e3, bandwidth_end=1e-2, trainer_max_steps=10000,
                 grad_clip=None, weighting="sds", seed=0, view_dependent_prompting=True, guidance_interval=None,
                 terminate_below=1e-2, nonfinite="raise", **distiller_kwargs):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite, self.nonfinite_calls = nonfinite, 0
        if not (0 < bandwidth_end <= bandwidth_start):
            raise ValueError(f"need 0 < bandwidth_end <= bandwidth_start, got {bandwidth_end}, {bandwidth_start}")
        self.unet, self.vae, self.scheduler = _split_components(components)
        for p in list(self.unet.parameters()) + list(self.vae.parameters()):
            p.requires_grad_(False)
        self.method, self.guidance_scale, self.seed = method, guidance_scale, int(seed)
        self.min_step_percent, self.max_step_percent = min_step_percent, max_step_percent
        self.bandwidth_start, self.bandwidth_end = float(bandwidth_start), float(bandwidth_end)
        self.trainer_max_steps, self.grad_clip = int(trainer_max_steps), grad_clip
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0 <= lo < hi:
                raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {guidance_interval}")
        self.guidance_interval, self.terminate_below = guidance_interval, float(terminate_below)
        self.view_dependent_prompting = view_dependent_prompting
        self.denoiser = SDDenoiser(unet=self.unet, scheduler=self.scheduler, cast=True)
        self.num_train_timesteps = len(self.scheduler.alphas_cumprod)
        self.global_step, self._calls, self.last_seed, self._cond = 0, 0, None, None
        self._set_steps(0)
        smin, smax = self.sigma_of(self.min_step), self.sigma_of(self.max_step)
        noisy = dict(sigma_min=smin, sigma_max=smax, weighting=weighting)
        options = {"msd": dict(bandwidth=self.bandwidth(0), sigma_min=smin, sigma_max=smax,
                               schedule=lambda step, m_norm: self.bandwidth(step)),
                   "sds": noisy,
                   "sdi": dict(noisy, total_steps=self.trainer_max_steps, t_range=(0.0, 1.0)),
                   "vsd": dict(noisy, variational=lambda z, sigma: self.denoiser(z, sigma, encoder_hidden_states=self._cond))}
        self.distiller = make_distiller(method, self.denoiser, **{**options[method], **distiller_kwargs})

    @property
    def converged(self):
        """§4.5: MSD's bandwidth has fallen below `terminate_below` (z_0 ~ x: further steps change little)."""
        return self.method == "msd" and should_stop(self.distiller.bandwidth, lam_floor=self.terminate_below)

    def sigma_of(self, t):
        """VE sigma of training timestep t: sqrt((1 - abar_t) / abar_t)."""
        abar = float(self.scheduler.alphas_cumprod[int(t)])
        return math.sqrt((1 - abar) / abar)

    def bandwidth(self, global_step):
        """MSD's lambda at a step: log-linear from bandwidth_start to bandwidth_end over trainer_max_steps."""
        frac = min(max(global_step / max(self.trainer_max_steps, 1), 0.0), 1.0)
        lo, hi = math.log(self.bandwidth_end), math.log(self.bandwidth_start)
        return math.exp(hi + frac * (lo - hi))

    def _set_steps(self, global_step):
        T = self.num_train_timesteps
        self.min_step = int(T * C(self.min_step_percent, global_step))
        self.max_step = int(T * C(self.max_step_percent, global_step))
        if not 0 < self.min_step < self.max_step < T:
            raise ValueError(f"need 0 < min_step < max_step < {T}, got {self.min_step}, {self.max_step}")

    def update_step(self, epoch, global_step, on_load_weights=False):
        self.global_step, self._calls = int(global_step), 0
        self._set_steps(global_step)
        d = self.distiller
        if self.method != "msd":  # MSD's sigma_max is its chain start and stays put; the others follow the t range
            d.sigma_min, d.sigma_max = self.sigma_of(self.min_step), self.sigma_of(self.max_step)
        d.on_step(self.global_step)  # MSD's bandwidth schedule, SDI's annealing (VSD refits after its gradient)

    def _embeddings(self, prompt_utils, elevation, azimuth, camera_distances, batch):
        if hasattr(prompt_utils, "get_text_embeddings"):
            emb = prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances, self.view_dependent_prompting)
            cond, uncond = emb.chunk(2)  # threestudio's order: cond first, then uncond
        else:
            cond, uncond = prompt_utils.cond, prompt_utils.uncond
        return [e.expand(batch, *e.shape[1:]) if e.shape[0] == 1 else e for e in (cond, uncond)]

    def _generator(self):
        self.last_seed = self.seed + self.global_step + self._calls * 1_000_003
        self._calls += 1
        return torch.Generator().manual_seed(self.last_seed)

    def call_conditions(self, cond, uncond):
        """The distiller's per-call arguments for prompt embeddings (cond, uncond): the text condition and the
        guidance (paper convention, limited to `guidance_interval` when given), both in float32."""
        guidance = cfg(self.guidance_scale, uncond={"encoder_hidden_states": uncond.float()}, convention="paper")
        if self.guidance_interval is not None:
            guidance = limited_interval(guidance, *self.guidance_interval)
        return {"extra_args": {"encoder_hidden_states": cond.float()}, "transforms": [guidance]}

    def _grad(self, latents, generator, extra_args, transforms):
        """The distiller's gradient for this call's conditions; non-finite values per `nonfinite`."""
        grad = self.distiller.grad(latents, generator, extra_args=extra_args, transforms=transforms,
                                   check_finite=self.nonfinite == "raise")
        if not torch.isfinite(grad).all():
            self.nonfinite_calls += 1
            grad = torch.nan_to_num(grad)
        return grad

    def __call__(self, rgb, prompt_utils, elevation=None, azimuth=None, camera_distances=None,
                 rgb_as_latents=False, guidance_eval=False, **kw):
        B = rgb.shape[0]
        cond, uncond = self._embeddings(prompt_utils, elevation, azimuth, camera_distances, B)
        for name, t in (("latents" if rgb_as_latents else "rgb", rgb), ("prompt embeddings (cond)", cond),
                        ("prompt embeddings (uncond)", uncond)):
            check_on_unet(t, name, self.unet, dtype=False)  # before any work; dtypes are cast below
        generator = self._generator()
        if rgb_as_latents:
            latents = rgb.permute(0, 3, 1, 2)
        else:
            vae_gen = torch.Generator().manual_seed(self.last_seed + 1)
            latents = vae_encode(self.vae, rgb.permute(0, 3, 1, 2), generator=vae_gen)
        self._cond = cond.float()  # the distiller's working dtype; the UNet call casts (cast=True)
        d = self.distiller
        grad = self._grad(latents.detach().float(), generator, **self.call_conditions(cond, uncond)).to(latents.dtype)
        if self.grad_clip is not None:
            clip = C(self.grad_clip, self.global_step)
            grad = grad.clamp(-clip, clip)
        if self.method == "vsd" and d.variational_update is not None:
            d.update(latents.detach().float(), generator)
        target = (latents - grad).detach()
        loss_sds = 0.5 * F.mse_loss(latents, target, reduction="sum") / B
        return {"loss_sds": loss_sds, "grad_norm": grad.norm(), "min_step": self.min_step, "max_step": self.max_step}
