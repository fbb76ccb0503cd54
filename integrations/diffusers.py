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

The sampling helpers import nothing from diffusers: they read the public attributes of the objects they are given
(`scheduler.alphas_cumprod`, `scheduler.config`, `unet(...)`). The Stable Diffusion helpers below
(`load_stable_diffusion`, `encode_prompt`, `SDDenoiser`, `vae_encode` / `vae_decode`, `kernel_flow_callback`)
import diffusers / transformers lazily, where they need them.
"""
import dataclasses
import math
import os

import torch

from diffsolve.denoisers import VPDenoiser, append_dims
from diffsolve.schedules import sigmas_discrete


class UNetEps(torch.nn.Module):
    """A diffusers `UNet2DConditionModel` as a VP network `eps_model(z, t, **cond)`.

    `t` may be a number, a 0-d tensor or a [B] float tensor (fractional timesteps are passed through);
    keyword arguments (`encoder_hidden_states`, `added_cond_kwargs`, `timestep_cond`, ...) go to the UNet.
    The output is whatever the UNet predicts (epsilon, v or the sample, per the scheduler's config).
    `cast=True` casts z and `encoder_hidden_states` to the UNet's dtype first (mixed precision: a float32
    state over a float16 UNet); the output then comes back in the UNet's dtype.
    """

    def __init__(self, unet, cast=False):
        super().__init__()
        self.unet, self.cast = unet, cast

    def forward(self, z, t, encoder_hidden_states=None, **kw):
        if self.cast:
            dtype = unet_dtype_device(self.unet)[0]
            z = z.to(dtype)
            if isinstance(encoder_hidden_states, torch.Tensor):
                encoder_hidden_states = encoder_hidden_states.to(dtype)
        return self.unet(z, t, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kw)[0]


def denoiser_from_unet(unet, scheduler, quantize=False, cast=False):
    """A VE denoiser D(x, sigma, encoder_hidden_states=...) from a diffusers UNet and its scheduler."""
    return VPDenoiser(UNetEps(unet, cast=cast), scheduler.alphas_cumprod, scheduler.config.prediction_type,
                      quantize=quantize)


def module_dtype_device(module, what=None):
    """(dtype, device) of a module's first floating-point parameter (`what` names it in the error)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError(f"{what or type(module).__name__} has no floating-point parameters")


def unet_dtype_device(unet):
    """(dtype, device) of the UNet's first floating-point parameter."""
    return module_dtype_device(unet, "the UNet")


def check_on_module(tensor, name, module, dtype=True, what=None, cast="build the denoiser with cast=True"):
    """Raise a ValueError naming both sides unless `tensor` is a floating-point tensor on `module`'s device
    (and, with `dtype=True`, of its dtype); `what` names the module (default: its class), `cast` the way to
    mixed precision. Called before any model evaluation."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    mod_dtype, mod_device = module_dtype_device(module, what and f"the {what}")
    what = what or type(module).__name__
    if tensor.device != mod_device:
        raise ValueError(f"{name} is on device {tensor.device} but the {what} is on device {mod_device}; "
                         f"move it with .to({str(mod_device)!r})")
    if dtype and tensor.dtype != mod_dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but the {what} has dtype {mod_dtype}; cast it with "
                         f".to({mod_dtype}) (or {cast} for mixed precision)")


def check_on_unet(tensor, name, unet, dtype=True):
    """`check_on_module` for the UNet (the Stable Diffusion integrations' wording)."""
    check_on_module(tensor, name, unet, dtype, what="UNet", cast="build SDDenoiser(..., cast=True)")


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


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion: loading, text conditioning, VAE helpers, and a kernel-flow callback for stock pipelines.
# These import diffusers / transformers lazily, inside the functions that need them.
# ---------------------------------------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclasses.dataclass
class SDComponents:
    """The parts of a Stable Diffusion checkpoint diffsolve uses; text parts are None when absent."""
    unet: object
    vae: object
    scheduler: object
    text_encoder: object = None
    tokenizer: object = None


def _check_dtype_device(dtype, device):
    """Validate `dtype` (a floating torch.dtype) and `device` (parsable, and available) before any loading."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device or a string like 'cpu' / 'cuda:0', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    return device


def _resolve_root(path_or_id, local_files_only):
    """A local folder, or the cached (local_files_only) / downloaded snapshot of a Hub id."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_id:
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(path, local_files_only=local_files_only)
        except Exception as err:  # noqa: BLE001 -- hub errors vary by version; re-raised with the cause
            raise FileNotFoundError(
                f"Stable Diffusion weights {path!r} are not a local folder and not in the Hugging Face cache"
                f"{' (local_files_only=True)' if local_files_only else ''}: {err}") from err
    raise FileNotFoundError(f"Stable Diffusion model folder {path!r} does not exist")


def _check_subfolder(root, name, needs_weights, required=True):
    """True when `root/name` holds a config (and weights where needed); raise naming what is missing."""
    sub = os.path.join(root, name)
    if not os.path.isdir(sub):
        if required:
            raise FileNotFoundError(f"{root!r} has no {name!r} subfolder (a diffusers Stable Diffusion layout "
                                    f"needs unet/, vae/ and scheduler/)")
        return False
    files = os.listdir(sub)
    config = "scheduler_config.json" if name == "scheduler" else "config.json"
    if name != "tokenizer" and config not in files:
        raise FileNotFoundError(f"{sub!r} has no {config}")
    if needs_weights and not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise FileNotFoundError(f"{sub!r} has no weights (*.safetensors or *.bin); found {sorted(files)}")
    return True


def load_stable_diffusion(path_or_id, dtype=torch.float32, device="cpu", local_files_only=True):
    """`SDComponents` from a diffusers-layout folder (unet/, vae/, scheduler/, optional text_encoder/ and
    tokenizer/) or a Hub id already in the local cache. The scheduler is loaded as a `DDIMScheduler`.
    Arguments and files are checked before any weights are read; models are put in eval mode."""
    device = _check_dtype_device(dtype, device)
    root = _resolve_root(path_or_id, local_files_only)
    for name in ("unet", "vae"):
        _check_subfolder(root, name, needs_weights=True)
    _check_subfolder(root, "scheduler", needs_weights=False)
    has_text = _check_subfolder(root, "text_encoder", needs_weights=True, required=False)
    has_tok = _check_subfolder(root, "tokenizer", needs_weights=False, required=False)

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    kw = dict(torch_dtype=dtype, local_files_only=local_files_only)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw).to(device).eval()
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw).to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=local_files_only)
    text_encoder = tokenizer = None
    if has_text:
        from transformers import CLIPTextModel
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw).to(device).eval()
    if has_tok:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=local_files_only)
    return SDComponents(unet, vae, scheduler, text_encoder, tokenizer)


@torch.no_grad()
def encode_prompt(components, prompts):
    """Text embeddings [len(prompts), L, D] from the components' tokenizer and text encoder
    (padded to the tokenizer's `model_max_length`, Stable Diffusion's convention)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must all be strings, got {[type(p).__name__ for p in prompts]}")
    missing = [n for n in ("tokenizer", "text_encoder") if getattr(components, n, None) is None]
    if missing:
        raise ValueError(f"cannot encode prompts: the components have no {' and no '.join(missing)}; "
                         "load a checkpoint with tokenizer/ and text_encoder/ or pass prompt_embeds")
    tok, enc = components.tokenizer, components.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")["input_ids"]
    return enc(ids.to(enc.device))[0]


class SDDenoiser(torch.nn.Module):
    """A diffsolve denoiser D(x, sigma, encoder_hidden_states=...) over a Stable Diffusion UNet.

    Built from `SDComponents` or from `unet=..., scheduler=...`; epsilon / v-prediction is read from the
    scheduler's config. `prompt_embeds`, when given, is the default `encoder_hidden_states` (broadcast over
    the batch when it has batch 1). CFG is diffsolve's transform, e.g.
    `transforms=[cfg(7.5, uncond={"encoder_hidden_states": neg})]`.
    x and the embeddings must sit on the UNet's device and, unless `cast=True`, have the UNet's dtype: a
    mismatch is a ValueError naming both before the UNet runs. With `cast=True` (mixed precision) they may
    have any floating dtype; each UNet call sees them in the UNet's dtype and D comes back in x's dtype.
    """

    def __init__(self, components=None, *, unet=None, scheduler=None, prompt_embeds=None, quantize=False,
                 cast=False):
        super().__init__()
        if components is not None:
            unet, scheduler = components.unet, components.scheduler
        if unet is None or scheduler is None:
            raise ValueError("give SDComponents, or both unet= and scheduler=")
        self.denoiser = denoiser_from_unet(unet, scheduler, quantize=quantize, cast=cast)
        self.prompt_embeds, self.cast = prompt_embeds, cast

    @property
    def unet(self):
        return self.denoiser.inner_model.unet

    def forward(self, x, sigma, encoder_hidden_states=None, **cond):
        emb = self.prompt_embeds if encoder_hidden_states is None else encoder_hidden_states
        if emb is None:
            raise ValueError("no text conditioning: pass encoder_hidden_states= or build with prompt_embeds=")
        check_on_unet(x, "x (latents)", self.unet, dtype=not self.cast)
        check_on_unet(emb, "encoder_hidden_states (prompt embeddings)", self.unet, dtype=not self.cast)
        if emb.shape[0] == 1 and x.shape[0] > 1:
            emb = emb.expand(x.shape[0], *emb.shape[1:])
        return self.denoiser(x, sigma, encoder_hidden_states=emb, **cond)


def _check_vae_size(vae, height, width, what):
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"{what} size {height}x{width} is not divisible by the VAE's downsampling factor {factor}")


def vae_encode(vae, images, generator=None):
    """Images [B, 3, H, W] in [0, 1] -> latents (a sample of the posterior) * `scaling_factor`."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    _check_vae_size(vae, images.shape[-2], images.shape[-1], "image")
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


def vae_decode(vae, latents):
    """Latents (scaled by `scaling_factor`) -> images in [0, 1], [B, 3, H * f, W * f]."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def _step_alphas(scheduler, i, t):
    """(abar_t, abar_prev) of the DDIM step the pipeline just took from timestep t (step i)."""
    acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar_prev = acp[prev].item() if prev >= 0 else final_alphas_cumprod(scheduler)
    return acp[t].item(), abar_prev


def kernel_flow_callback(center_latents, bandwidth, sigma_lo=0.0, sigma_hi=math.inf):
    """A `callback_on_step_end(pipe, i, t, callback_kwargs)` for a stock `StableDiffusionPipeline` (DDIM
    scheduler) applying the Gaussian kernel's exact flow (split face, `GaussianKernel.flow`) after each step.

    The pipeline's latents are VP: z = sqrt(abar) x with x the VE state, and the kernel centre `center_latents`
    (clean latents c) sits at sqrt(abar) c. After the step t -> prev (prev = t - T // n, or the final alpha)
    the flow x <- c + (x - c) exp(-(sigma**2 - sigma_next**2) / lambda**2) reads, in the pipeline's coordinates,
    z <- sqrt(abar_prev) c + (z - sqrt(abar_prev) c) * factor. Like `limited_interval`, the flow is integrated
    only over the overlap of [sigma_next, sigma] with [sigma_lo, sigma_hi].
    Use with `callback_on_step_end_tensor_inputs=["latents"]`. With CFG the latents are not batched, so
    `center_latents` has the latents' shape (or batch 1).
    """
    from diffsolve.transforms import GaussianKernel
    kernel = GaussianKernel(center_latents, bandwidth, face="split")
    if not 0 <= sigma_lo < sigma_hi:
        raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")

    def callback(pipe, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        abar, abar_prev = _step_alphas(pipe.scheduler, i, t)
        sigma, sigma_next = math.sqrt((1 - abar) / abar), math.sqrt((1 - abar_prev) / abar_prev)
        hi, lo = min(sigma, sigma_hi), max(sigma_next, sigma_lo)
        if hi <= lo:
            return {"latents": latents}
        factor = kernel.factor(hi, lo)
        c = math.sqrt(abar_prev) * center_latents.to(device=latents.device, dtype=torch.float64)
        new = c + (latents.to(torch.float64) - c) * factor
        return {"latents": new.to(latents.dtype)}
    return callback


# Tiny random components with diffusers' own test shapes, for offline smoke runs and tests.
def tiny_sd_scheduler(**overrides):
    """Stable Diffusion's DDIM scheduler config (scaled_linear betas, clip_sample=False,
    set_alpha_to_one=False, steps_offset=1), with `overrides` (e.g. prediction_type, timestep_spacing)."""
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def tiny_unet():
    """diffusers' tiny random UNet2DConditionModel (1.4 M parameters), `torch.manual_seed(0)`, eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, time_cond_proj_dim=None, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2).eval()


def tiny_sd_components(prediction_type="epsilon", **scheduler_kw):
    """SDComponents(unet, vae, scheduler) with the shapes of diffusers' own Stable Diffusion tests, built
    offline in float32, `torch.manual_seed(0)` before each model; `scheduler_kw` overrides the config."""
    from diffusers import AutoencoderKL

    unet = tiny_unet()
    scheduler = tiny_sd_scheduler(prediction_type=prediction_type, **scheduler_kw)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2).eval()
    return SDComponents(unet, vae, scheduler)
