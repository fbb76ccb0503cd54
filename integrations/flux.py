"""Flux (FluxTransformer2DModel, a rectified flow on packed latents) as a diffsolve denoiser.

diffsolve's state is the unpacked latents [B, C, h, w] (what the VAE gives, what distillers optimise); each
call packs them into 2x2 patches [B, h w / 4, 4 C] with image ids (0, row, col), runs the transformer on
(timestep = t, guidance, encoder_hidden_states = T5 states, pooled_projections = CLIP pooled, txt_ids = 0) and
unpacks v. `FluxDenoiser` is `diffsolve.FlowDenoiser` over that (time_scale 1: the transformer scales by 1000).

Two kinds of CFG. Guidance-distilled Flux (FLUX.1-dev, `guidance_embeds=True`) takes the guidance scale as an
input (`guidance=`, default 3.5 as FluxPipeline's guidance_scale): one call, no unconditional branch; it is the
model's learned approximation of CFG, not CFG. True CFG is diffsolve's `cfg(w, uncond={...negative embeds})`
over that denoiser (FluxPipeline's true_cfg_scale, neg + w (cond - neg)), two calls; both may be combined as
FluxPipeline does. A model without the guidance embedding (FLUX.1-schnell) refuses `guidance=`.

A stock FluxPipeline run (n steps, height x width) is `diffsolve.sample(Euler(), FluxDenoiser(...), noise,
flux_sigmas(scheduler, n, latents), ...)` from the pipeline's unpacked noise; the end state is the pipeline's
unpacked latents; `integrations.sd3.decode` applies Flux's scaling and shift factors too.
"""
import dataclasses

import torch

from diffsolve.flow_matching import FlowDenoiser, sigmas_flow_dynamic

from ._loading import (check_latent_size, check_layout, check_on_module, check_prompt_list, load_text_parts,
                       module_dtype_device, prepare_root)

__all__ = ["FluxComponents", "FluxDenoiser", "FluxVelocity", "encode_prompt", "flux_sigmas", "image_ids",
           "load_flux", "pack", "tiny_flux_components", "unpack"]

_TEXT = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclasses.dataclass
class FluxComponents:
    """The parts of a Flux checkpoint diffsolve uses; text parts are None when absent."""
    transformer: object
    vae: object
    scheduler: object
    text_encoder: object = None
    text_encoder_2: object = None
    tokenizer: object = None
    tokenizer_2: object = None


def _text_encoder_class(name):
    """The transformers class of a text-encoder folder of Flux: CLIP for text_encoder, T5 for text_encoder_2."""
    from transformers import CLIPTextModel, T5EncoderModel
    return T5EncoderModel if name == "text_encoder_2" else CLIPTextModel


def load_flux(path_or_id, dtype=torch.bfloat16, device="cpu", local_files_only=True, text=True):
    """`FluxComponents` from a diffusers-layout folder (transformer/, vae/, scheduler/; text_encoder*/ and
    tokenizer*/ when present and `text=True`) or a cached Hub id; everything checked before weights are read."""
    root, device = prepare_root(path_or_id, dtype, device, local_files_only)
    present = check_layout(root, ("transformer", "vae", "scheduler"), _TEXT if text else (), "Flux")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    kw = dict(torch_dtype=dtype, local_files_only=local_files_only)
    parts = dict(
        transformer=FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", **kw).to(device).eval(),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **kw).to(device).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler",
                                                                  local_files_only=local_files_only))
    parts.update(load_text_parts(root, present, _text_encoder_class, dtype, device, local_files_only))
    return FluxComponents(**parts)


@torch.no_grad()
def encode_prompt(components, prompts, max_sequence_length=512):
    """(prompt_embeds [B, L, D_t5] from T5, pooled [B, D_clip] from CLIP's pooler), FluxPipeline.encode_prompt's."""
    c, prompts = components, check_prompt_list(prompts)
    missing = [n for n in _TEXT if getattr(c, n) is None]
    if missing:
        raise ValueError(f"cannot encode prompts: the Flux components have no {', '.join(missing)}; "
                         "load a checkpoint with them or pass prompt_embeds / pooled_prompt_embeds")
    ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt")["input_ids"]
    pooled = c.text_encoder(ids.to(c.text_encoder.device), output_hidden_states=False).pooler_output
    ids = c.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                        return_tensors="pt")["input_ids"]
    return c.text_encoder_2(ids.to(c.text_encoder_2.device), output_hidden_states=False)[0], pooled


def pack(latents):
    """[B, C, h, w] -> [B, (h/2)(w/2), 4 C]: 2x2 patches, row-major (FluxPipeline._pack_latents' layout)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(packed, h, w):
    """The inverse of `pack` for latents of size h x w."""
    b, _, c4 = packed.shape
    return packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h, w, device=None, dtype=torch.float32):
    """[(h/2)(w/2), 3] ids (0, row, col) of the packed patches."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)


class FluxVelocity(torch.nn.Module):
    """FluxTransformer2DModel as v(x_t, t, encoder_hidden_states, pooled_projections, guidance) on unpacked latents."""

    def __init__(self, transformer, cast=False):
        super().__init__()
        self.transformer, self.cast = transformer, cast

    def forward(self, x_t, t, encoder_hidden_states, pooled_projections, guidance=None):
        b, _, h, w = x_t.shape
        dtype = module_dtype_device(self.transformer)[0] if self.cast else x_t.dtype
        emb = encoder_hidden_states.to(dtype)
        out = self.transformer(hidden_states=pack(x_t).to(dtype), timestep=t.to(dtype), guidance=guidance,
                               encoder_hidden_states=emb, pooled_projections=pooled_projections.to(dtype),
                               txt_ids=emb.new_zeros(emb.shape[1], 3), img_ids=image_ids(h, w, x_t.device, dtype),
                               return_dict=False)[0]
        return unpack(out, h, w)


def _expand(t, batch):
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t


class FluxDenoiser(torch.nn.Module):
    """D(x, sigma, encoder_hidden_states=..., pooled_projections=..., guidance=...) over a Flux transformer on
    unpacked latents [B, C, h, w] (h, w even). `guidance` (a number or [B] tensor): the guidance embedding's
    scale, default `guidance_scale` (3.5) when the model has the embedding; refused otherwise. True CFG: diffsolve's
    `cfg` transform (module docstring). Checks on shape, size, device and dtype come before the transformer runs."""

    def __init__(self, components=None, *, transformer=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 guidance_scale=3.5, quantize=None, cast=False):
        super().__init__()
        if components is not None:
            transformer = components.transformer
        if transformer is None:
            raise ValueError("give FluxComponents or transformer=")
        self.denoiser = FlowDenoiser(FluxVelocity(transformer, cast), time_scale=1.0, quantize=quantize)
        self.transformer, self.cast, self.guidance_scale = transformer, cast, guidance_scale
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds

    @property
    def guidance_embeds(self):
        return bool(self.transformer.config.guidance_embeds)

    def forward(self, x, sigma, encoder_hidden_states=None, pooled_projections=None, guidance=None):
        emb = self.prompt_embeds if encoder_hidden_states is None else encoder_hidden_states
        pooled = self.pooled_prompt_embeds if pooled_projections is None else pooled_projections
        if emb is None or pooled is None:
            raise ValueError("Flux needs encoder_hidden_states= and pooled_projections= (or prompt_embeds= and "
                             "pooled_prompt_embeds= at construction)")
        channels = self.transformer.config.in_channels // 4
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"x must be unpacked latents [B, {channels}, h, w], got shape {tuple(x.shape)}")
        check_latent_size(x.shape[-2], x.shape[-1], 2, "latent (Flux packs 2x2 patches)")
        for name, t in (("x (latents)", x), ("encoder_hidden_states", emb), ("pooled_projections", pooled)):
            check_on_module(t, name, self.transformer, dtype=not self.cast)
        if guidance is not None and not self.guidance_embeds:
            raise ValueError("this Flux transformer has no guidance embedding (guidance_embeds=False): use true CFG "
                             "(diffsolve.cfg) instead of guidance=")
        if self.guidance_embeds:
            g = self.guidance_scale if guidance is None else guidance
            guidance = torch.as_tensor(g, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return self.denoiser(x, sigma, encoder_hidden_states=_expand(emb, x.shape[0]),
                             pooled_projections=_expand(pooled, x.shape[0]), guidance=guidance)


def flux_sigmas(scheduler, n, latents_shape):
    """FluxPipeline's grid for n steps on latents of `latents_shape` (.., h, w): `sigmas_flow_dynamic` with the
    packed sequence length (h/2)(w/2) and the scheduler's base / max sequence lengths and shifts; inf first."""
    h, w = latents_shape[-2:]
    c = scheduler.config
    return sigmas_flow_dynamic(n, image_seq_len=(h // 2) * (w // 2), base_seq_len=c.get("base_image_seq_len", 256),
                               max_seq_len=c.get("max_image_seq_len", 4096), base_shift=c.get("base_shift", 0.5),
                               max_shift=c.get("max_shift", 1.15))


def tiny_flux_components(guidance_embeds=True):
    """FluxComponents(transformer, vae, scheduler) with diffusers' tiny test shapes (1 + 1 layers, 4 latent
    channels packed to 16, joint dim 32, pooled dim 32), SD3's tiny VAE, Flux's dynamic-shift scheduler; seed 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from .sd3 import tiny_vae
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxComponents(transformer, tiny_vae(), scheduler)
