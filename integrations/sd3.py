"""Stable Diffusion 3 (SD3Transformer2DModel, a rectified flow) as a diffsolve denoiser.

The transformer predicts v = n - x0 at x_t = (1 - t) x0 + t n from `timestep = 1000 t`, `encoder_hidden_states`
(the two CLIP encoders' penultimate states side by side, zero-padded to T5's width, then T5's states along the
sequence) and `pooled_projections` (the two CLIPs' pooled outputs side by side). `SD3Denoiser` is
`diffsolve.FlowDenoiser` over it: D(x, sigma) with sigma = t / (1 - t), x = x_t / (1 - t), sigma = inf at t = 1.

A stock StableDiffusion3Pipeline run (FlowMatchEulerDiscreteScheduler, shift s, n steps) is
`diffsolve.sample(Euler(), SD3Denoiser(...), noise, sd3_sigmas(scheduler, n), transforms=[cfg(w, uncond=...)])`
from the pipeline's noise (x holds n at sigma = inf); the end state (sigma = 0) is the pipeline's latents and
`decode(vae, latents)` undoes the VAE's scaling and shift factors. FlowMatchHeunDiscreteScheduler is
`FlowTime(Heun())` on the same grid; DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction") is DPM++ 2M on `sigmas_flow_dpm`, with `quantize=1000` (that scheduler
hands the model int64 timesteps). diffusers / transformers are imported lazily.
"""
import dataclasses

import torch

from diffsolve.flow_matching import FlowDenoiser, sigmas_flow_shift

from ._loading import (check_latent_size, check_layout, check_on_module, check_prompt_list, load_text_parts,
                       module_dtype_device, prepare_root)

__all__ = ["SD3Components", "SD3Denoiser", "SD3Velocity", "decode", "encode_images", "encode_prompt", "load_sd3",
           "sd3_sigmas", "tiny_sd3_components"]

_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@dataclasses.dataclass
class SD3Components:
    """The parts of an SD3 checkpoint diffsolve uses; text parts are None when absent."""
    transformer: object
    vae: object
    scheduler: object
    text_encoder: object = None
    text_encoder_2: object = None
    text_encoder_3: object = None
    tokenizer: object = None
    tokenizer_2: object = None
    tokenizer_3: object = None


def _text_encoder_class(name):
    """The transformers class of a text-encoder folder of SD3: CLIP with projection for text_encoder and text_encoder_2, T5 for text_encoder_3."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    return T5EncoderModel if name == "text_encoder_3" else CLIPTextModelWithProjection


def load_sd3(path_or_id, dtype=torch.float32, device="cpu", local_files_only=True, text=True):
    """`SD3Components` from a diffusers-layout folder (transformer/, vae/, scheduler/; with `text=True` also
    every text_encoder*/ and tokenizer*/ present) or a cached Hub id. Everything is checked before any weights
    are read; models in eval mode. The scheduler is a FlowMatchEulerDiscreteScheduler."""
    root, device = prepare_root(path_or_id, dtype, device, local_files_only)
    present = check_layout(root, ("transformer", "vae", "scheduler"), _TEXT if text else (), "SD3")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    kw = dict(torch_dtype=dtype, local_files_only=local_files_only)
    parts = dict(
        transformer=SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", **kw).to(device).eval(),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **kw).to(device).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler",
                                                                  local_files_only=local_files_only))
    parts.update(load_text_parts(root, present, _text_encoder_class, dtype, device, local_files_only))
    return SD3Components(**parts)


def _ids(tokenizer, prompts, length):
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out["input_ids"]


@torch.no_grad()
def encode_prompt(components, prompts, max_sequence_length=256):
    """(prompt_embeds [B, 77 + L, D_t5], pooled [B, D1 + D2]) as StableDiffusion3Pipeline.encode_prompt builds them
    (clip_skip None: penultimate hidden states; no T5 encoder: zeros of the transformer's joint_attention_dim)."""
    prompts = check_prompt_list(prompts)
    c = components
    missing = [n for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2") if getattr(c, n) is None]
    if missing:
        raise ValueError(f"cannot encode prompts: the SD3 components have no {', '.join(missing)}; "
                         "load a checkpoint with them or pass prompt_embeds / pooled_prompt_embeds")
    states, pooled = [], []
    for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        out = enc(_ids(tok, prompts, tok.model_max_length).to(enc.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(states, -1)
    joint = c.transformer.config.joint_attention_dim
    if c.text_encoder_3 is None or c.tokenizer_3 is None:
        t5 = clip.new_zeros(len(prompts), max_sequence_length, joint)
    else:
        t5 = c.text_encoder_3(_ids(c.tokenizer_3, prompts, max_sequence_length).to(c.text_encoder_3.device))[0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], -2), torch.cat(pooled, -1)


class SD3Velocity(torch.nn.Module):
    """SD3Transformer2DModel as v(x_t, timestep, encoder_hidden_states, pooled_projections); `cast` casts the
    inputs to the transformer's dtype (mixed precision)."""

    def __init__(self, transformer, cast=False):
        super().__init__()
        self.transformer, self.cast = transformer, cast

    def forward(self, x_t, timestep, encoder_hidden_states, pooled_projections):
        if self.cast:
            dtype = module_dtype_device(self.transformer)[0]
            x_t, encoder_hidden_states = x_t.to(dtype), encoder_hidden_states.to(dtype)
            pooled_projections = pooled_projections.to(dtype)
        return self.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


def _expand(t, batch):
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t


class SD3Denoiser(torch.nn.Module):
    """D(x, sigma, encoder_hidden_states=..., pooled_projections=...) over an SD3 transformer (`FlowDenoiser`,
    time_scale = the scheduler's num_train_timesteps). `prompt_embeds` / `pooled_prompt_embeds` are the default
    conditions (batch 1 broadcasts). CFG is diffsolve's transform: `cfg(w, uncond={"encoder_hidden_states": neg,
    "pooled_projections": neg_pooled})` (the pipeline's u + w (c - u)). x must have the transformer's latent
    channels and a size divisible by its patch size, and sit on its device (dtype too unless cast=True): a
    ValueError naming what is wrong comes before the transformer runs."""

    def __init__(self, components=None, *, transformer=None, scheduler=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, quantize=None, cast=False):
        super().__init__()
        if components is not None:
            transformer, scheduler = components.transformer, components.scheduler
        if transformer is None:
            raise ValueError("give SD3Components or transformer= (and scheduler=)")
        T = scheduler.config.num_train_timesteps if scheduler is not None else 1000
        self.denoiser = FlowDenoiser(SD3Velocity(transformer, cast), time_scale=T, quantize=quantize)
        self.transformer, self.cast = transformer, cast
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds

    def forward(self, x, sigma, encoder_hidden_states=None, pooled_projections=None):
        emb = self.prompt_embeds if encoder_hidden_states is None else encoder_hidden_states
        pooled = self.pooled_prompt_embeds if pooled_projections is None else pooled_projections
        if emb is None or pooled is None:
            raise ValueError("SD3 needs encoder_hidden_states= and pooled_projections= (or prompt_embeds= and "
                             "pooled_prompt_embeds= at construction)")
        cfg_ = self.transformer.config
        if x.ndim != 4 or x.shape[1] != cfg_.in_channels:
            raise ValueError(f"x must be latents [B, {cfg_.in_channels}, h, w], got shape {tuple(x.shape)}")
        check_latent_size(x.shape[-2], x.shape[-1], cfg_.patch_size, "latent (SD3 patch size)")
        for name, t in (("x (latents)", x), ("encoder_hidden_states", emb), ("pooled_projections", pooled)):
            check_on_module(t, name, self.transformer, dtype=not self.cast)
        return self.denoiser(x, sigma, encoder_hidden_states=_expand(emb, x.shape[0]),
                             pooled_projections=_expand(pooled, x.shape[0]))


def sd3_sigmas(scheduler, n):
    """The VE grid of `scheduler.set_timesteps(n)` for a static-shift FlowMatchEulerDiscreteScheduler /
    FlowMatchHeunDiscreteScheduler config (`sigmas_flow_shift`); it starts at inf (t = 1)."""
    c = scheduler.config
    if getattr(c, "use_dynamic_shifting", False):
        raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting); build the grid with "
                         "diffsolve.sigmas_flow_dynamic(n, mu=...) or use the static-shift config")
    return sigmas_flow_shift(n, c.shift, c.num_train_timesteps)


def decode(vae, latents):
    """Latents -> images in [0, 1]: vae.decode(latents / scaling_factor + shift_factor) (SD3 and Flux)."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    shift = vae.config.shift_factor or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def encode_images(vae, images, generator=None):
    """Images [B, 3, H, W] in [0, 1] -> latents (posterior sample - shift_factor) * scaling_factor (SD3 / Flux)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    check_latent_size(images.shape[-2], images.shape[-1], 2 ** (len(vae.config.block_out_channels) - 1),
                      "image (VAE downsampling)")
    sample = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample(generator=generator)
    return (sample - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def tiny_vae(latent_channels=4):
    """A tiny random AutoencoderKL with SD3's scaling and shift factors (diffusers' test shapes), seed 0."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=16, scaling_factor=1.5305,
                         shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_sd3_components(shift=3.0):
    """SD3Components(transformer, vae, scheduler) with diffusers' own tiny test shapes (1 layer, 4 latent
    channels, patch 1, joint dim 32, pooled dim 64), float32, seed 0 before each model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    return SD3Components(transformer, tiny_vae(), FlowMatchEulerDiscreteScheduler(shift=shift))

