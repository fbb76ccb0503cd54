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

Two loss forms (`parity=`): "diffsolve" (the default above, used by the text-to-2D runner) and
"threestudio", which follows threestudio's guidances file by file (threestudio-project/threestudio,
stored versions of threestudio/models/guidance/stable_diffusion_guidance.py, _vsd_guidance.py,
_sdi_guidance.py): per-method keys (SDS and SJC `loss_sds`, VSD `loss_vsd` + `loss_lora`, SDI
`loss_sdi`; the others `loss_<method>`), SDI's `0.5 mse(latents, x0_target, "mean") / B`, integer
timesteps t ~ U{min_step..max_step} (`timestep_sampling=`; our sigma grids stay available), rgb resized
to `image_size` (512) before the VAE and latents to `latent_size` (64), threestudio's weighting names,
each method's CFG convention (SDS / SDI / SJC: c + w (c - u); VSD, ISM, CSD, NFSD: u + s (c - u)), SDI's
t annealed from max to min step (`t_anneal`), and VSD's LoRA trained through the returned `loss_lora`.
Options, C() and timestep draws live in integrations/threestudio_config.py.

Pixel-space denoisers (`pixels=True`, with `denoiser=` and `scheduler=`, e.g. `pixel_schedule(...)`): no VAE
and no resizing; the rgb goes to the denoiser as [-1, 1] pixels (x = 2 rgb - 1), and `prompt_utils` is a
`PixelConditions`: the class labels, with the null class as CFG's unconditional, and each view's elevation
and azimuth (degrees) passed to the denoiser as keywords, the camera kept in both CFG branches. This path
also offers "sdi_official" (diffsolve.distill.OfficialSDI on the schedule's alphas_cumprod). Its prompt and
schedule live in integrations/threestudio_pixels.py.
"""
import math

import torch
import torch.nn.functional as F

from diffsolve.distill import DISTILLERS, make_distiller, should_stop
from diffsolve.transforms import autoguidance, cfg, limited_interval

from .diffusers import SDComponents, SDDenoiser, check_on_unet, vae_encode
from .threestudio_config import C, TIMESTEP_SAMPLINGS, integer_timestep_class, weighting as ts_weighting
from .threestudio_pixels import PixelConditions, PixelSchedule, pixel_schedule

__all__ = ["CONVENTIONS", "LOSS_KEYS", "METHODS", "PIXEL_METHODS", "THREESTUDIO_METHODS", "DistillationGuidance",
           "PixelConditions", "PixelSchedule", "pixel_schedule"]

METHODS = ("msd", "sds", "vsd", "sdi")
THREESTUDIO_METHODS = METHODS + ("sjc", "ism", "csd", "nfsd")
NONFINITE = ("raise", "nan_to_num")
PARITIES = ("diffsolve", "threestudio")
LOSS_KEYS = {"sds": "loss_sds", "sjc": "loss_sds", "vsd": "loss_vsd", "sdi": "loss_sdi", "msd": "loss_msd",
             "ism": "loss_ism", "csd": "loss_csd", "nfsd": "loss_nfsd"}
CONVENTIONS = {"sds": "paper", "sjc": "paper", "sdi": "paper", "msd": "paper", "vsd": "diffusers",
               "ism": "diffusers", "csd": "diffusers", "nfsd": "diffusers"}
PIXEL_METHODS = THREESTUDIO_METHODS + ("sdi_official",)  # the pixel path also runs the official SDI
LOSS_KEYS["sdi_official"], CONVENTIONS["sdi_official"] = "loss_sdi", "paper"


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
    threestudio's schedules (C(): numbers, 3- / 4- / multi-segment lists, float end steps in epochs).
    `distiller_kwargs` go to the distiller (e.g. MSD `steps=`, `sampler=`; VSD `variational=`,
    `variational_update=`; SDI `n_inversion=`; NFSD `negative=`).
    VSD without `variational=`: with parity "threestudio" and a UNet, threestudio's camera-conditioned LoRA
    copy of the UNet (integrations/threestudio_vsd.py; the camera from the call's `c2w` or `mvp_mtx` per
    `camera_condition_type`) trained through the returned `loss_lora` (`lora_n_timestamp_samples` noisy
    copies per particle, `lora_cfg_training`), with its own CFG scale `guidance_scale_lora` over the camera;
    otherwise the frozen text-conditioned model.
    The paper's §4.3 heuristics: `guidance_interval=(sigma_lo, sigma_hi)` applies CFG only there (any
    method); for MSD pass `kernel_interval=(lo, hi)` and `center="inverted"` (or "noised") through
    `distiller_kwargs`. §4.5's termination: `converged` is True once MSD's lambda is below
    `terminate_below` (the paper's lambda_1 = 1e-2); it never fires for the other methods.
    Non-finite gradients: `nonfinite="raise"` (default) lets the distiller's error through (it names the
    distiller, the sigma and the step); `nonfinite="nan_to_num"` is threestudio's behaviour (NaN -> 0,
    inf -> the largest float), and every call where it replaced something is counted in `nonfinite_calls`.
    Autoguidance (Karras et al. 2024): `guide=` a weaker denoiser with the prior's call signature; it takes the
    unconditional's place, called with the conditional arguments (the class and the camera on the pixel
    path), at `guidance_scale` in the method's convention (not with Perp-Neg prompts).
    Any denoiser with SDDenoiser's interface D(x, sigma, encoder_hidden_states=...) can stand in for the
    UNet: pass `denoiser=` with `scheduler=` (its `alphas_cumprod`) and, for the RGB path, `vae=`."""

    def __init__(self, components=None, method="msd", guidance_scale=7.5, min_step_percent=0.02,
                 max_step_percent=0.98, bandwidth_start=1e3, bandwidth_end=1e-2, trainer_max_steps=10000,
                 grad_clip=None, weighting="sds", seed=0, view_dependent_prompting=True, guidance_interval=None,
                 terminate_below=1e-2, nonfinite="raise", *, parity="diffsolve", denoiser=None, vae=None,
                 scheduler=None, timestep_sampling=None, image_size=512, latent_size=64, t_anneal=True,
                 guidance_scale_lora=1.0, lora_n_timestamp_samples=1, lora_rank=4, camera_condition_type="extrinsics",
                 lora_cfg_training=True, pixels=False, guide=None, **distiller_kwargs):
        super().__init__()
        if parity not in PARITIES:
            raise ValueError(f"parity must be one of {PARITIES}, got {parity!r}")
        methods = THREESTUDIO_METHODS if parity == "threestudio" else METHODS
        self.pixels = bool(pixels)
        if self.pixels:
            if denoiser is None or scheduler is None or vae is not None or components is not None:
                raise ValueError("pixels=True needs denoiser= and scheduler= (and no components or vae)")
            methods = PIXEL_METHODS if parity == "threestudio" else METHODS
        if method not in methods:
            raise ValueError(f"method must be one of {methods}, got {method!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite, self.nonfinite_calls, self.parity = nonfinite, 0, parity
        if guide is not None and not callable(guide):
            raise ValueError(f"guide must be a denoiser (callable), got {type(guide).__name__}")
        self.guide = guide
        if not (0 < bandwidth_end <= bandwidth_start):
            raise ValueError(f"need 0 < bandwidth_end <= bandwidth_start, got {bandwidth_end}, {bandwidth_start}")
        sampling = timestep_sampling or ("timesteps" if parity == "threestudio" else "karras")
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")
        if parity == "diffsolve" and sampling == "timesteps":
            raise ValueError("timestep_sampling='timesteps' needs parity='threestudio'")
        for name, v in (("image_size", image_size), ("latent_size", latent_size)):
            if v is not None and (int(v) != v or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if int(lora_n_timestamp_samples) != lora_n_timestamp_samples or lora_n_timestamp_samples < 1:
            raise ValueError(f"lora_n_timestamp_samples must be a positive integer, got {lora_n_timestamp_samples!r}")
        if denoiser is None:
            self.unet, self.vae, self.scheduler = _split_components(components)
            for p in list(self.unet.parameters()) + list(self.vae.parameters()):
                p.requires_grad_(False)
            self.denoiser = SDDenoiser(unet=self.unet, scheduler=self.scheduler, cast=True)
        else:
            if components is not None or scheduler is None:
                raise ValueError("give components, or denoiser= with scheduler= (not both)")
            self.unet, self.vae, self.scheduler, self.denoiser = None, vae, scheduler, denoiser
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
        self.timestep_sampling, self.image_size, self.latent_size = sampling, image_size, latent_size
        self.t_anneal, self.guidance_scale_lora = bool(t_anneal), float(guidance_scale_lora)
        self.lora_n_timestamp_samples = int(lora_n_timestamp_samples)
        acp = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64)
        self.num_train_timesteps, self.sigmas = len(acp), ((1 - acp) / acp).sqrt()
        self.global_step, self._calls, self.last_seed, self._cond, self.last_t = 0, 0, None, None, None
        self._set_steps(0, 0)
        self.lora, self._grid, self._camera, self._perp = None, None, None, None
        self._lora_options = dict(rank=lora_rank, camera_condition_type=camera_condition_type,
                                  lora_cfg_training=lora_cfg_training)
        self.distiller = self._build(method, weighting, distiller_kwargs)

    def _build(self, method, weighting, distiller_kwargs):
        smin, smax = self.sigma_of(self.min_step), self.sigma_of(self.max_step)
        threestudio = self.parity == "threestudio"
        if threestudio and not callable(weighting):
            weighting = ts_weighting(weighting)
        noisy = dict(sigma_min=smin, sigma_max=max(smax, smin * (1 + 1e-6)), weighting=weighting)
        if threestudio and self.timestep_sampling != "timesteps":
            noisy["sigma_sampling"] = self.timestep_sampling
        options = {"msd": dict(bandwidth=self.bandwidth(0), sigma_min=smin, sigma_max=smax,
                               schedule=lambda step, m_norm: self.bandwidth(step)),
                   "sds": noisy, "csd": noisy, "nfsd": noisy,
                   "sjc": dict(weighting="uniform" if threestudio else weighting),
                   "ism": {},
                   "sdi": dict(noisy, total_steps=self.trainer_max_steps, t_range=(0.0, 1.0)),
                   "vsd": dict(noisy, variational=lambda z, sigma: self.denoiser(z, sigma, **self._variational_cond())),
                   "sdi_official": dict(total_steps=self.trainer_max_steps, alphas_cumprod=self.scheduler.alphas_cumprod,
                                        t_range=(C(self.min_step_percent, 0, 0), C(self.max_step_percent, 0, 0)))}
        options = {**options[method], **distiller_kwargs}
        if threestudio and method == "sdi":
            options["weighting"] = lambda sigma: sigma  # grad = x - D: threestudio's SDI loss is against D
            # the inversion runs from the range's low end; the annealed t itself comes from the grid (t_min)
            top = self.max_step_percent if isinstance(self.max_step_percent, (int, float)) else self.max_step_percent[1]
            low = int(self.num_train_timesteps * C(self.min_step_percent, 0, 0))
            options.update(sigma_min=self.sigma_of(low), sigma_max=self.sigma_of(int(self.num_train_timesteps * top)))
        if threestudio and method == "vsd" and "variational" not in distiller_kwargs and self.unet is not None:
            from .threestudio_vsd import CameraLoRA
            self.lora = CameraLoRA(self.unet, self.scheduler, seed=self.seed, **self._lora_options)
            self.unet_lora = self.lora.unet  # a submodule: the system's optimiser sees the LoRA parameters
            options["variational"] = self._lora_guided
        if not threestudio or method in ("msd", "sdi_official"):
            return make_distiller(method, self.denoiser, **options)
        from diffsolve.distill.sjc import TimestepGrid
        grid = self._grid = TimestepGrid(self.sigmas, self.min_step, self.max_step)
        if method in ("sjc", "ism"):
            return DISTILLERS[method](self.denoiser, grid=grid, **options)
        cls = integer_timestep_class(DISTILLERS[method]) if self.timestep_sampling == "timesteps" else DISTILLERS[method]
        d = cls(self.denoiser, options.pop("variational", None), **options) if method == "vsd" else cls(self.denoiser, **options)
        if self.timestep_sampling == "timesteps":
            d.grid = grid
        else:
            self._grid = None
        return d

    def _variational_cond(self):
        """The frozen model's conditions for VSD's default variational prediction (this call's)."""
        return dict(self._cond) if self.pixels else {"encoder_hidden_states": self._cond}

    def _lora_guided(self, z, sigma):
        """VSD's variational prediction: the camera-conditioned LoRA UNet with CFG over the camera of scale
        guidance_scale_lora (integrations/threestudio_vsd.py)."""
        return self.lora.guided(z, sigma, self._cond, self._camera, self.guidance_scale_lora)

    @property
    def converged(self):
        """§4.5: MSD's bandwidth has fallen below `terminate_below` (z_0 ~ x: further steps change little)."""
        return self.method == "msd" and should_stop(self.distiller.bandwidth, lam_floor=self.terminate_below)

    def sigma_of(self, t):
        """VE sigma of training timestep t: sqrt((1 - abar_t) / abar_t)."""
        return float(self.sigmas[int(t)])

    def bandwidth(self, global_step):
        """MSD's lambda at a step: log-linear from bandwidth_start to bandwidth_end over trainer_max_steps."""
        frac = min(max(global_step / max(self.trainer_max_steps, 1), 0.0), 1.0)
        lo, hi = math.log(self.bandwidth_end), math.log(self.bandwidth_start)
        return math.exp(hi + frac * (lo - hi))

    def _set_steps(self, epoch, global_step):
        T = self.num_train_timesteps
        lo, hi = C(self.min_step_percent, epoch, global_step), C(self.max_step_percent, epoch, global_step)
        if self.parity == "threestudio" and self.method == "sdi" and self.t_anneal:
            # threestudio's SDI: one t, annealed linearly from max_step_percent to min_step_percent
            top = self.max_step_percent if isinstance(self.max_step_percent, (int, float)) else self.max_step_percent[1]
            frac = float(global_step) / self.trainer_max_steps
            lo = hi = (top - lo) * (1 - frac) + lo
        self.min_step, self.max_step = int(T * lo), int(T * hi)
        ordered = self.min_step <= self.max_step if self.parity == "threestudio" else self.min_step < self.max_step
        if not (0 < self.min_step and ordered and self.max_step < T):
            raise ValueError(f"need 0 < min_step <= max_step < {T}, got {self.min_step}, {self.max_step}")

    def update_step(self, epoch, global_step, on_load_weights=False):
        self.global_step, self._calls = int(global_step), 0
        self._set_steps(epoch, global_step)
        d = self.distiller
        sdi_range = self.parity == "threestudio" and self.method == "sdi"  # SDI's inversion range stays put
        if self.method not in ("msd", "sdi_official") and not sdi_range:  # MSD's sigma_max is its chain start
            d.sigma_min = self.sigma_of(self.min_step)
            d.sigma_max = max(self.sigma_of(self.max_step), d.sigma_min * (1 + 1e-6))
        if self.method != "msd" and self._grid is not None:
            self._grid.set_range(self.min_step, self.max_step)
        d.on_step(self.global_step)  # MSD's bandwidth schedule, SDI's annealing (VSD refits after its gradient)

    def _embeddings(self, prompt_utils, elevation, azimuth, camera_distances, batch):
        self._perp = None
        if hasattr(prompt_utils, "use_perp_neg") and prompt_utils.use_perp_neg:  # threestudio's PromptProcessorOutput
            if self.parity != "threestudio" or self.guidance_interval is not None or self.guide is not None:
                raise ValueError("prompt_utils.use_perp_neg needs parity='threestudio', no guidance_interval and "
                                 "no guide")
            from .threestudio_perpneg import perp_neg_conditions
            cond, uncond, negatives, weights = perp_neg_conditions(
                prompt_utils, elevation, azimuth, camera_distances, self.view_dependent_prompting, batch)
            self._perp = ([n.float() for n in negatives], weights)
            return cond, uncond
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
        guidance (limited to `guidance_interval` when given), both in float32. Parity "diffsolve": the paper's
        convention for every method; "threestudio": each method's own (see CONVENTIONS)."""
        convention = CONVENTIONS[self.method] if self.parity == "threestudio" else "paper"
        if self.pixels:  # keyword dicts of PixelConditions.arguments: the camera stays in both branches
            extra, override = dict(cond), dict(uncond)
        else:
            extra, override = {"encoder_hidden_states": cond.float()}, {"encoder_hidden_states": uncond.float()}
        if self._perp is not None:  # threestudio's Perp-Neg: u + s (pos + sum_i w_i perp_i), eps space
            from .threestudio_perpneg import ThreestudioPerpNeg
            negatives, weights = self._perp
            guidance = ThreestudioPerpNeg(self.guidance_scale, override,
                                          [{"encoder_hidden_states": n} for n in negatives], weights)
            return {"extra_args": extra, "transforms": [guidance]}
        if self.guide is not None:
            guidance = autoguidance(self.guide, self.guidance_scale, convention=convention)
        else:
            guidance = cfg(self.guidance_scale, uncond=override, convention=convention)
        if self.guidance_interval is not None:
            guidance = limited_interval(guidance, *self.guidance_interval)
        return {"extra_args": extra, "transforms": [guidance]}

    def _grad(self, latents, generator, extra_args, transforms):
        """The distiller's gradient for this call's conditions; non-finite values per `nonfinite`."""
        grad = self.distiller.grad(latents, generator, extra_args=extra_args, transforms=transforms,
                                   check_finite=self.nonfinite == "raise")
        if not torch.isfinite(grad).all():
            self.nonfinite_calls += 1
            grad = torch.nan_to_num(grad)
        return grad

    def _latents(self, rgb, rgb_as_latents):
        """threestudio's resizing: latents to latent_size (SDI: none), rgb to image_size before the VAE."""
        x = rgb.permute(0, 3, 1, 2)
        if self.pixels:  # the denoiser's own [-1, 1] pixels: no VAE, no resizing
            return x * 2 - 1
        resize = self.parity == "threestudio"
        if rgb_as_latents:
            if resize and self.latent_size is not None and self.method != "sdi":
                x = F.interpolate(x, (self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
            return x
        if self.vae is None:
            raise ValueError("this guidance has no VAE: pass latents with rgb_as_latents=True, or give vae=")
        if resize and self.image_size is not None:
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return vae_encode(self.vae, x, generator=torch.Generator().manual_seed(self.last_seed + 1))

    def __call__(self, rgb, prompt_utils, elevation=None, azimuth=None, camera_distances=None,
                 rgb_as_latents=False, guidance_eval=False, **kw):
        if guidance_eval and (self.parity != "threestudio" or self.guidance_interval is not None or elevation is None
                              or self.pixels):
            raise ValueError("guidance_eval=True needs parity='threestudio', no guidance_interval, and the cameras "
                             "(elevation, azimuth, camera_distances), and no pixels=True")
        B = rgb.shape[0]
        if self.pixels:
            if not isinstance(prompt_utils, PixelConditions):
                raise ValueError(f"pixels=True takes a PixelConditions as prompt_utils, got {type(prompt_utils).__name__}")
            cond, uncond = prompt_utils.arguments(elevation, azimuth, B)
        else:
            cond, uncond = self._embeddings(prompt_utils, elevation, azimuth, camera_distances, B)
        if self.unet is not None:
            for name, t in (("latents" if rgb_as_latents else "rgb", rgb), ("prompt embeddings (cond)", cond),
                            ("prompt embeddings (uncond)", uncond)):
                check_on_unet(t, name, self.unet, dtype=False)  # before any work; dtypes are cast below
        generator = self._generator()
        latents = self._latents(rgb, rgb_as_latents)
        if self.pixels:
            self._cond, self._uncond = cond, uncond
        else:
            self._cond, self._uncond = cond.float(), uncond.float()  # the distiller's working dtype
        if self.lora is not None:
            self._camera = self.lora.camera(kw, B)
        d = self.distiller
        grad = self._grad(latents.detach().float(), generator, **self.call_conditions(cond, uncond)).to(latents.dtype)
        self.last_t = d.last_t if self._grid is not None else None  # the integer timesteps drawn
        if self.grad_clip is not None:
            clip = C(self.grad_clip, 0, self.global_step)
            grad = grad.clamp(-clip, clip)
        if self.method == "vsd" and d.variational_update is not None:
            d.update(latents.detach().float(), generator)
        target = (latents - grad).detach()
        out = {"grad_norm": grad.norm(), "min_step": self.min_step, "max_step": self.max_step}
        if self.parity == "diffsolve":
            return {"loss_sds": 0.5 * F.mse_loss(latents, target, reduction="sum") / B, **out}
        if self.method in ("sdi", "sdi_official"):  # threestudio's SDI: target = x0 estimate, mean reduction, / B
            return {"loss_sdi": 0.5 * F.mse_loss(latents, target, reduction="mean") / B, **out}
        out[LOSS_KEYS[self.method]] = 0.5 * F.mse_loss(latents, target, reduction="sum") / B
        if self.method == "vsd":
            out["loss_lora"] = self.lora_loss(latents, generator)
        if guidance_eval:
            from .threestudio_eval import guidance_eval as evaluate
            out["eval"] = evaluate(self, latents.detach(), cond, uncond, elevation, azimuth, camera_distances)
        return out

    def lora_loss(self, latents, generator):
        """threestudio's `train_lora`: the LoRA's denoising MSE on lora_n_timestamp_samples noisy copies of the
        detached latents (t ~ U{0..T-1}), differentiable in the LoRA parameters; 0 without a LoRA."""
        if self.lora is None:
            return latents.new_zeros(())
        return self.lora.camera_loss(latents.detach().float(), self._cond, self._camera,
                                     self.lora_n_timestamp_samples, generator)

