"""SDXL / SD3 / Flux behind the threestudio-style guidance (integrations.threestudio.DistillationGuidance).

That guidance speaks Stable Diffusion's contract: one tensor condition per branch (`encoder_hidden_states`, cond and
uncond from the prompt processor), a scheduler's `alphas_cumprod` for its sigma range and an SD VAE. The newer
families need more conditions (pooled embeddings; SDXL's time ids; Flux's guidance embedding is a constant of the
denoiser). This module meets the contract without changing it:

  - `pack_conditions(emb, pooled, ...)` appends the extra conditions to the token sequence as trailing tokens (their
    values flattened, zero-padded to the token width), and `PackedConditions(denoiser, names, sizes)` splits them
    off again before each call, so CFG's uncond branch carries the negative pooled embedding too;
  - `flow_training_schedule(T)`: `alphas_cumprod` of a rectified flow at t_i = (i + 1) / (T + 1), i.e.
    abar = 1 / (1 + sigma^2) with sigma = t / (1 - t), so min/max_step_percent are flow times t;
  - `ShiftedVAE(vae)`: SD3 / Flux's VAE seen as an SD VAE (the latents subtract the shift factor before scaling).

`family_guidance(family, components, cond, uncond, ...)` builds the whole thing (see tests/test_modern_distill.py).
"""
import math

import torch

__all__ = ["PackedConditions", "ShiftedVAE", "family_guidance", "flow_training_schedule", "pack_conditions"]


def pack_conditions(emb, *extras):
    """[B, L + k, D]: emb [B, L, D] then the extras (each [B, ...]) flattened, concatenated, zero-padded to a
    multiple of D and laid out as k trailing tokens."""
    b, _, d = emb.shape
    flat = torch.cat([e.reshape(e.shape[0], -1).to(emb.dtype).expand(b, -1) for e in extras], -1)
    k = math.ceil(flat.shape[-1] / d)
    flat = torch.nn.functional.pad(flat, (0, k * d - flat.shape[-1]))
    return torch.cat([emb, flat.reshape(b, k, d)], 1)


class PackedConditions(torch.nn.Module):
    """A denoiser taking `pack_conditions` output as its one `encoder_hidden_states`: the trailing tokens are
    split back into the keyword conditions `names` of shapes `sizes` (per row, without the batch)."""

    def __init__(self, denoiser, names, sizes):
        super().__init__()
        if len(names) != len(sizes):
            raise ValueError(f"names and sizes must pair up, got {names} and {sizes}")
        self.denoiser, self.names, self.sizes = denoiser, tuple(names), [tuple(s) for s in sizes]
        self.numels = [math.prod(s) for s in self.sizes]

    def split(self, packed):
        d = packed.shape[-1]
        k = math.ceil(sum(self.numels) / d)
        emb, flat = packed[:, :-k], packed[:, -k:].reshape(packed.shape[0], -1)
        out, at = {}, 0
        for name, size, n in zip(self.names, self.sizes, self.numels):
            out[name] = flat[:, at:at + n].reshape(packed.shape[0], *size)
            at += n
        return emb, out

    def forward(self, x, sigma, encoder_hidden_states):
        emb, extra = self.split(encoder_hidden_states)
        return self.denoiser(x, sigma, encoder_hidden_states=emb, **extra)


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _FlowSchedule:
    def __init__(self, alphas_cumprod, T):
        self.alphas_cumprod, self.config = alphas_cumprod, _Config(num_train_timesteps=T, prediction_type="flow")


def flow_training_schedule(num_train_timesteps=1000):
    """An object with `alphas_cumprod` [T] for t_i = (i + 1) / (T + 1): abar = (1 - t)^2 / ((1 - t)^2 + t^2), so
    sqrt((1 - abar) / abar) = t / (1 - t) = sigma (never 0 or inf)."""
    T = int(num_train_timesteps)
    t = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    return _FlowSchedule(((1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)), T)


class _Shifted:
    def __init__(self, dist, shift):
        self.dist, self.shift = dist, shift

    def sample(self, generator=None):
        return self.dist.sample(generator=generator) - self.shift


class _Encoded:
    def __init__(self, dist):
        self.latent_dist = dist


class ShiftedVAE(torch.nn.Module):
    """SD3 / Flux's AutoencoderKL as integrations.diffusers.vae_encode sees an SD VAE: `encode(x).latent_dist
    .sample(generator) * scaling_factor` is then (sample - shift_factor) * scaling_factor, the family's latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @property
    def config(self):
        return self.vae.config

    @property
    def dtype(self):
        return self.vae.dtype

    def encode(self, x):
        return _Encoded(_Shifted(self.vae.encode(x).latent_dist, self.vae.config.shift_factor or 0.0))


def family_guidance(family, components, cond, uncond, method="msd", **guidance_kwargs):
    """(DistillationGuidance over the family's denoiser, prompt_utils) for family "sdxl" / "sd3" / "flux".
    cond / uncond: dicts of the family's conditions (sd3 / flux: encoder_hidden_states, pooled_projections;
    sdxl: encoder_hidden_states, text_embeds, time_ids), packed into one tensor each. Flux's guidance embedding
    scale is `flux_guidance=` (default 3.5); the guidance's CFG is then true CFG on top of it."""
    from .threestudio import DistillationGuidance
    if family == "sdxl":
        from .sdxl import SDXLDenoiser
        names, den = ("text_embeds", "time_ids"), SDXLDenoiser(components, cast=True)
        schedule, vae = components.scheduler, components.vae
    elif family in ("sd3", "flux"):
        if family == "sd3":
            from .sd3 import SD3Denoiser
            den = SD3Denoiser(components, cast=True)
        else:
            from .flux import FluxDenoiser
            den = FluxDenoiser(components, cast=True, guidance_scale=guidance_kwargs.pop("flux_guidance", 3.5))
        names, vae = ("pooled_projections",), ShiftedVAE(components.vae)
        schedule = flow_training_schedule(components.scheduler.config.num_train_timesteps)
    else:
        raise ValueError(f"family must be 'sdxl', 'sd3' or 'flux', got {family!r}")
    sizes = [tuple(cond[n].shape[1:]) for n in names]
    for side in (cond, uncond):
        missing = [n for n in ("encoder_hidden_states", *names) if n not in side]
        if missing:
            raise ValueError(f"{family} conditions need {', '.join(missing)}")
    packed = [pack_conditions(side["encoder_hidden_states"], *(side[n] for n in names)) for side in (cond, uncond)]
    guidance = DistillationGuidance(method=method, denoiser=PackedConditions(den, names, sizes), scheduler=schedule,
                                    vae=vae, **guidance_kwargs)

    class PromptUtils:
        pass
    utils = PromptUtils()
    utils.cond, utils.uncond = packed
    return guidance, utils
