"""Shared test helpers. Plain functions (import them with `from conftest import ...`); the diffusers stack is
imported inside them so that the core tests run without it."""


def tiny_sd_scheduler(**overrides):
    """Stable Diffusion's DDIM scheduler config with `overrides` (see integrations.diffusers)."""
    from diffsolve.integrations.diffusers import tiny_sd_scheduler as build

    return build(**overrides)


def tiny_sd_components(prediction_type="epsilon", **scheduler_kw):
    """(unet, scheduler, vae): diffusers' own tiny random Stable Diffusion components, built offline."""
    from diffsolve.integrations.diffusers import tiny_sd_components as build

    c = build(prediction_type, **scheduler_kw)
    return c.unet, c.scheduler, c.vae
