"""SDXL on tiny random components: diffsolve DDIM / Euler against a stock StableDiffusionXLPipeline (CFG and
micro-conditioning), the denoiser's checks and the loader."""
import os

import pytest
import torch

import diffsolve as ds

pytest.importorskip("diffusers")
from diffusers import StableDiffusionXLPipeline  # noqa: E402

from integrations import sdxl as X  # noqa: E402
from integrations.diffusers import from_ve, sigmas_from_scheduler, tiny_sd_components, tiny_sd_scheduler, to_ve  # noqa: E402

MICRO = dict(original_size=(40, 48), crops_coords_top_left=(4, 8), target_size=(32, 32))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts():
    c = X.tiny_sdxl_components()
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=c.unet, scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    emb = [torch.randn(1, 7, 64, generator=g), torch.randn(1, 32, generator=g), torch.randn(1, 7, 64, generator=g),
           torch.randn(1, 32, generator=g)]
    return c, pipe, emb


def _pipe(pipe, emb, w, n, scheduler, **micro):
    pipe.scheduler = scheduler
    return pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[1], negative_prompt_embeds=emb[2],
                negative_pooled_prompt_embeds=emb[3], height=32, width=32, num_inference_steps=n, guidance_scale=w,
                output_type="latent", generator=torch.Generator().manual_seed(0), **{**MICRO, **micro}).images


def _noise():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("w", [1.0, 5.0])
def test_ddim_and_euler_equal_the_pipeline(parts, w):
    c, pipe, emb = parts
    den, n = X.SDXLDenoiser(c), 5
    ea = dict(encoder_hidden_states=emb[0], text_embeds=emb[1],
              time_ids=X.time_ids(MICRO["original_size"], MICRO["target_size"], MICRO["crops_coords_top_left"]))
    tr = [ds.cfg(w, uncond={"encoder_hidden_states": emb[2], "text_embeds": emb[3]})] if w > 1 else []
    euler = c.scheduler
    ref = _pipe(pipe, emb, w, n, euler)
    x = ds.sample(ds.Euler(), den, _noise() * euler.init_noise_sigma, euler.sigmas.double(), extra_args=ea,
                  transforms=tr, disable=True)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-4)
    ddim = tiny_sd_scheduler()
    ref = _pipe(pipe, emb, w, n, ddim)
    sig, _ = sigmas_from_scheduler(ddim, n)
    x = ds.sample(ds.DDIM(), den, to_ve(_noise(), sig[0]), sig, extra_args=ea, transforms=tr, disable=True)
    torch.testing.assert_close(from_ve(x, sig[-1]), ref, rtol=0, atol=1e-4)
    # the micro-conditioning reaches the UNet: another crop is another result, in both
    other = _pipe(pipe, emb, w, n, ddim, crops_coords_top_left=(0, 0))
    assert (other - ref).abs().max() > 1e-4
    ea0 = {**ea, "time_ids": X.time_ids(MICRO["original_size"], MICRO["target_size"])}
    x0 = ds.sample(ds.DDIM(), den, to_ve(_noise(), sig[0]), sig, extra_args=ea0, transforms=tr, disable=True)
    torch.testing.assert_close(from_ve(x0, sig[-1]), other, rtol=0, atol=1e-4)
    pipe.scheduler = c.scheduler


def test_denoiser_checks_before_the_unet_runs(parts):
    c, _, emb = parts
    calls = []
    handle = c.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        den = X.SDXLDenoiser(c, prompt_embeds=emb[0], pooled_prompt_embeds=emb[1], time_ids=X.time_ids((32, 32), (32, 32)))
        with pytest.raises(ValueError, match="latent \\(UNet downsampling\\) size 15x16 is not a positive multiple of 2"):
            den(torch.zeros(1, 4, 15, 16), 1.0)
        with pytest.raises(ValueError, match=r"time_ids must be \[B, 6\]"):
            den(torch.zeros(1, 4, 16, 16), 1.0, time_ids=torch.zeros(1, 5))
        with pytest.raises(ValueError, match="x \\(latents\\) has dtype torch.float64 but the UNet2DConditionModel"):
            den(torch.zeros(1, 4, 16, 16, dtype=torch.float64), 1.0)
        with pytest.raises(ValueError, match="SDXL needs encoder_hidden_states="):
            X.SDXLDenoiser(c)(torch.zeros(1, 4, 16, 16), 1.0)
        with pytest.raises(ValueError, match="need original_size"):
            X.time_ids((32,), (32, 32))
        assert calls == []
    finally:
        handle.remove()
    sd = tiny_sd_components()
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        X.SDXLDenoiser(unet=sd.unet, scheduler=sd.scheduler)


def test_loader_round_trip_and_bad_inputs(tmp_path, monkeypatch):
    c = X.tiny_sdxl_components()
    for name in ("unet", "vae", "scheduler"):
        getattr(c, name).save_pretrained(os.path.join(tmp_path, name))
    got = X.load_sdxl(tmp_path)
    for a, b in zip(got.unet.state_dict().values(), c.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert got.text_encoder is None
    sd = tiny_sd_components()
    sd.unet.save_pretrained(os.path.join(tmp_path, "sd", "unet"))
    c.vae.save_pretrained(os.path.join(tmp_path, "sd", "vae"))
    c.scheduler.save_pretrained(os.path.join(tmp_path, "sd", "scheduler"))
    with pytest.raises(ValueError, match="not SDXL's 'text_time'"):
        X.load_sdxl(tmp_path / "sd")
    import diffusers
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        X.load_sdxl(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        X.load_sdxl(tmp_path, dtype=torch.long)
    os.makedirs(tmp_path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/ is incomplete: missing text_encoder_2/config.json"):
        X.load_sdxl(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match=r"not a complete SDXL folder: missing unet/ \(no such folder\)"):
        X.load_sdxl(tmp_path)
