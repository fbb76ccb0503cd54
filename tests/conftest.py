"""Shared test helpers. Plain functions (import them with `from conftest import ...`); the diffusers stack is
imported inside them so that the core tests run without it."""
import torch


def tiny_sd_scheduler(**overrides):
    """Stable Diffusion's DDIM scheduler config (scaled_linear betas, clip_sample=False,
    set_alpha_to_one=False, steps_offset=1), with `overrides` (e.g. prediction_type, timestep_spacing)."""
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def tiny_sd_components(prediction_type="epsilon", **scheduler_kw):
    """(unet, scheduler, vae): diffusers' own tiny random Stable Diffusion components
    (tests/pipelines/stable_diffusion/test_stable_diffusion.py::get_dummy_components), built offline,
    float32, eval mode, with `torch.manual_seed(0)` before each model. The scheduler is Stable Diffusion's
    DDIM config (scaled_linear betas, set_alpha_to_one=False, steps_offset=1); `scheduler_kw` overrides it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, time_cond_proj_dim=None, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
    scheduler = tiny_sd_scheduler(prediction_type=prediction_type, **scheduler_kw)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
    return unet.eval(), scheduler, vae.eval()
