"""Stable Diffusion XL as a diffsolve denoiser: the SD UNet convention (`VPDenoiser`) plus SDXL's conditioning.

The UNet takes `encoder_hidden_states` (the two CLIP encoders' penultimate states side by side) and
`added_cond_kwargs = {"text_embeds": pooled output of the second encoder, "time_ids": micro-conditioning}`, the
time ids being original size (h, w) + crop top-left (y, x) + target size (h, w) in pixels (Podell et al. 2023,
§2.2). `SDXLDenoiser` takes them as flat tensor keywords (`encoder_hidden_states`, `text_embeds`, `time_ids`), so
CFG is `cfg(w, uncond={"encoder_hidden_states": neg, "text_embeds": neg_pooled})` (time ids shared, or a
negative set as StableDiffusionXLPipeline's negative_original_size etc.).

A StableDiffusionXLPipeline run with DDIMScheduler is `ds.sample(DDIM(), den, to_ve(latents, sigmas[0]), sigmas)`
and `from_ve(x, sigmas[-1])` with `sigmas_from_scheduler` (integrations.diffusers); with EulerDiscreteScheduler
the scheduler's own VE sigmas and `latents * init_noise_sigma`. The VAE helpers of integrations.diffusers apply
(no shift factor). diffusers / transformers are imported lazily.
"""
import dataclasses

import torch

from diffsolve.denoisers import VPDenoiser

from ._loading import (check_latent_size, check_layout, check_on_module, check_prompt_list, load_text_parts,
                       module_dtype_device, prepare_root)

__all__ = ["SDXLComponents", "SDXLDenoiser", "SDXLUNet", "encode_prompt", "load_sdxl", "time_ids",
           "tiny_sdxl_components"]

_TEXT = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclasses.dataclass
class SDXLComponents:
    """The parts of an SDXL checkpoint diffsolve uses; text parts are None when absent."""
    unet: object
    vae: object
    scheduler: object
    text_encoder: object = None
    text_encoder_2: object = None
    tokenizer: object = None
    tokenizer_2: object = None


def _text_encoder_class(name):
    """The transformers class of a text-encoder folder of SDXL: CLIP for text_encoder, CLIP with projection for text_encoder_2."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel


def load_sdxl(path_or_id, dtype=torch.float32, device="cpu", local_files_only=True, text=True):
    """`SDXLComponents` from a diffusers-layout folder (unet/, vae/, scheduler/; text_encoder*/ and tokenizer*/
    when present and `text=True`) or a cached Hub id; all checked before weights are read. The scheduler is
    loaded as an EulerDiscreteScheduler (SDXL's default; the denoiser reads only its alphas and prediction type)."""
    root, device = prepare_root(path_or_id, dtype, device, local_files_only)
    present = check_layout(root, ("unet", "vae", "scheduler"), _TEXT if text else (), "SDXL")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    kw = dict(torch_dtype=dtype, local_files_only=local_files_only)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw).to(device).eval()
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(f"{root!r}: the UNet has addition_embed_type={unet.config.addition_embed_type!r}, not SDXL's "
                         "'text_time'; load it with integrations.diffusers.load_stable_diffusion")
    parts = dict(unet=unet, vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **kw).to(device).eval(),
                 scheduler=EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler",
                                                                  local_files_only=local_files_only))
    parts.update(load_text_parts(root, present, _text_encoder_class, dtype, device, local_files_only))
    return SDXLComponents(**parts)


@torch.no_grad()
def encode_prompt(components, prompts):
    """(prompt_embeds [B, 77, D1 + D2], pooled [B, D2]) as StableDiffusionXLPipeline.encode_prompt builds them
    (clip_skip None: penultimate hidden states of both encoders; pooled: the second encoder's projection)."""
    c, prompts = components, check_prompt_list(prompts)
    missing = [n for n in _TEXT if getattr(c, n) is None]
    if missing:
        raise ValueError(f"cannot encode prompts: the SDXL components have no {', '.join(missing)}; "
                         "load a checkpoint with them or pass the embeddings")
    states, pooled = [], None
    for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")["input_ids"]
        out = enc(ids.to(enc.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, -1), pooled


def time_ids(original_size, target_size, crops_coords_top_left=(0, 0), batch=1, dtype=torch.float32, device="cpu"):
    """SDXL's micro-conditioning [batch, 6]: original (h, w) + crop (top, left) + target (h, w), in pixels."""
    values = [*original_size, *crops_coords_top_left, *target_size]
    if len(values) != 6 or not all(isinstance(v, (int, float)) and v >= 0 for v in values):
        raise ValueError(f"need original_size (h, w), crops_coords_top_left (top, left) and target_size (h, w) of "
                         f"numbers >= 0, got {original_size}, {crops_coords_top_left}, {target_size}")
    return torch.tensor([values], dtype=dtype, device=device).expand(batch, 6)


class SDXLUNet(torch.nn.Module):
    """An SDXL UNet as eps_model(z, t, encoder_hidden_states, text_embeds, time_ids); `cast` for mixed precision."""

    def __init__(self, unet, cast=False):
        super().__init__()
        self.unet, self.cast = unet, cast

    def forward(self, z, t, encoder_hidden_states, text_embeds, time_ids):
        if self.cast:
            dtype = module_dtype_device(self.unet)[0]
            z, encoder_hidden_states, text_embeds = z.to(dtype), encoder_hidden_states.to(dtype), text_embeds.to(dtype)
        return self.unet(z, t, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


def _expand(t, batch):
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t


class SDXLDenoiser(torch.nn.Module):
    """D(x, sigma, encoder_hidden_states=..., text_embeds=..., time_ids=...) over an SDXL UNet and its scheduler
    (epsilon / v from its config). Defaults from construction: `prompt_embeds`, `pooled_prompt_embeds` and
    `time_ids` (or `original_size` / `target_size` / `crops_coords_top_left` in pixels; target defaults to the
    latents' size times the VAE factor, 8). Shapes, the VAE-factor size, device and dtype are checked first."""

    def __init__(self, components=None, *, unet=None, scheduler=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 time_ids=None, quantize=False, cast=False):
        super().__init__()
        if components is not None:
            unet, scheduler = components.unet, components.scheduler
        if unet is None or scheduler is None:
            raise ValueError("give SDXLComponents, or both unet= and scheduler=")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"not an SDXL UNet: addition_embed_type={unet.config.addition_embed_type!r}")
        self.denoiser = VPDenoiser(SDXLUNet(unet, cast), scheduler.alphas_cumprod, scheduler.config.prediction_type,
                                   quantize=quantize)
        self.unet, self.cast = unet, cast
        self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids = prompt_embeds, pooled_prompt_embeds, time_ids

    def forward(self, x, sigma, encoder_hidden_states=None, text_embeds=None, time_ids=None):
        emb = self.prompt_embeds if encoder_hidden_states is None else encoder_hidden_states
        pooled = self.pooled_prompt_embeds if text_embeds is None else text_embeds
        ids = self.time_ids if time_ids is None else time_ids
        if emb is None or pooled is None or ids is None:
            raise ValueError("SDXL needs encoder_hidden_states=, text_embeds= (pooled) and time_ids= (or their "
                             "defaults prompt_embeds=, pooled_prompt_embeds=, time_ids= at construction)")
        if x.ndim != 4 or x.shape[1] != self.unet.config.in_channels:
            raise ValueError(f"x must be latents [B, {self.unet.config.in_channels}, h, w], got {tuple(x.shape)}")
        down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        check_latent_size(x.shape[-2], x.shape[-1], down, "latent (UNet downsampling)")
        if ids.shape[-1] != 6:
            raise ValueError(f"time_ids must be [B, 6] (original h, w, crop top, left, target h, w), got "
                             f"{tuple(ids.shape)}")
        for name, t in (("x (latents)", x), ("encoder_hidden_states", emb), ("text_embeds", pooled),
                        ("time_ids", ids)):
            check_on_module(t, name, self.unet, dtype=not self.cast)
        b = x.shape[0]
        return self.denoiser(x, sigma, encoder_hidden_states=_expand(emb, b), text_embeds=_expand(pooled, b),
                             time_ids=_expand(ids, b))


def tiny_sdxl_components():
    """SDXLComponents(unet, vae, scheduler) with diffusers' tiny SDXL test shapes (text_time embedding with
    time embed dim 8 and pooled dim 32, cross-attention 64), float32, seed 0; SD's tiny VAE; Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, scaling_factor=0.13025).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return SDXLComponents(unet, vae, scheduler)
