"""SD3 and Flux on tiny random components: diffsolve's solvers against the stock pipelines, and the loaders.

References: StableDiffusion3Pipeline / FluxPipeline run from prompt embeddings with the same seed (latents and
decoded images), with FlowMatchEuler, FlowMatchHeun and DPMSolverMultistep(flow sigmas, flow prediction)."""
import os

import pytest
import torch

import diffsolve as ds

pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, FluxPipeline,  # noqa: E402
                       StableDiffusion3Pipeline)

from integrations import flux as F  # noqa: E402
from integrations import sd3 as S  # noqa: E402

TOL = dict(rtol=0, atol=1e-4)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _embeds(pooled_dim):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 7, 32, generator=g), torch.randn(1, pooled_dim, generator=g),
            torch.randn(1, 7, 32, generator=g), torch.randn(1, pooled_dim, generator=g)]


def _noise():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # the pipelines' first draw


def _guidance(w, neg, negp):
    return [ds.cfg(w, uncond={"encoder_hidden_states": neg, "pooled_projections": negp})] if w > 1 else []


@pytest.fixture(scope="module")
def sd3():
    c = S.tiny_sd3_components()
    pipe = StableDiffusion3Pipeline(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return c, pipe


def _sd3_run(pipe, emb, pooled, neg, negp, w, n, output_type="latent"):
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=negp, height=32, width=32, num_inference_steps=n, guidance_scale=w,
                output_type=output_type, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_sd3_euler_heun_dpm_equal_the_pipeline(sd3, w):
    c, pipe = sd3
    emb, pooled, neg, negp = _embeds(64)
    ea, tr, n = dict(encoder_hidden_states=emb, pooled_projections=pooled), _guidance(w, neg, negp), 5
    den = S.SD3Denoiser(c)
    sig = S.sd3_sigmas(c.scheduler, n)
    assert sig[0] == float("inf")
    x = ds.sample(ds.Euler(), den, _noise(), sig, extra_args=ea, transforms=tr, disable=True)
    torch.testing.assert_close(x, _sd3_run(pipe, emb, pooled, neg, negp, w, n), **TOL)
    torch.testing.assert_close(S.decode(c.vae, x), _sd3_run(pipe, emb, pooled, neg, negp, w, n, "pt"), **TOL)
    try:
        pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
        ref = _sd3_run(pipe, emb, pooled, neg, negp, w, n)
        x = ds.sample(ds.FlowTime(ds.Heun()), den, _noise(), sig, extra_args=ea, transforms=tr, disable=True)
        torch.testing.assert_close(x, ref, **TOL)
        ve = ds.sample(ds.Heun(), den, _noise(), sig, extra_args=ea, transforms=tr, disable=True)
        assert (ve - ref).abs().max() > 1e-2  # Heun in sigma is not the scheduler's Heun in t
        pipe.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                     prediction_type="flow_prediction")
        ref = _sd3_run(pipe, emb, pooled, neg, negp, w, n)
        sig = ds.sigmas_flow_dpm(n, 3.0)  # starts below t = 1: the VE state is the noise times 1 + sigma
        x = ds.sample(ds.DPMpp2M(), S.SD3Denoiser(c, quantize=1000), _noise() * (1 + sig[0]), sig, extra_args=ea,
                      transforms=tr, disable=True)
        torch.testing.assert_close(x, ref, **TOL)
        exact_t = ds.sample(ds.DPMpp2M(), den, _noise() * (1 + sig[0]), sig, extra_args=ea, transforms=tr, disable=True)
        assert (exact_t - ref).abs().max() > 1e-3  # the scheduler hands the model int64 timesteps
    finally:
        pipe.scheduler = c.scheduler


def test_sd3_denoiser_checks_before_the_transformer_runs(sd3):
    c, _ = sd3
    emb, pooled, _, _ = _embeds(64)
    calls = []
    handle = c.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        den = S.SD3Denoiser(c, prompt_embeds=emb, pooled_prompt_embeds=pooled)
        with pytest.raises(ValueError, match=r"x must be latents \[B, 4, h, w\]"):
            den(torch.zeros(1, 3, 8, 8), 1.0)
        with pytest.raises(ValueError, match="x \\(latents\\) has dtype torch.float64 but the SD3Transformer2DModel"):
            den(torch.zeros(1, 4, 8, 8, dtype=torch.float64), 1.0)
        with pytest.raises(ValueError, match="needs encoder_hidden_states= and pooled_projections="):
            S.SD3Denoiser(c)(torch.zeros(1, 4, 8, 8), 1.0)
        with pytest.raises(ValueError, match="image \\(VAE downsampling\\) size 31x32 is not a positive multiple of 2"):
            S.encode_images(c.vae, torch.zeros(1, 3, 31, 32))
        assert calls == []
    finally:
        handle.remove()
    from diffusers import SD3Transformer2DModel
    patched = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=64, out_channels=4).eval()
    den = S.SD3Denoiser(transformer=patched, scheduler=c.scheduler, prompt_embeds=emb, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="latent \\(SD3 patch size\\) size 15x16 is not a positive multiple of 2"):
        den(torch.zeros(1, 4, 15, 16), 1.0)
    assert den(torch.zeros(1, 4, 16, 16), 1.0).shape == (1, 4, 16, 16)


@pytest.fixture(scope="module", params=[True, False], ids=["guidance_embeds", "no_guidance_embeds"])
def flux(request):
    c = F.tiny_flux_components(guidance_embeds=request.param)
    pipe = FluxPipeline(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return c, pipe


def _flux_run(pipe, emb, pooled, neg, negp, w, n, output_type="latent"):
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=negp, height=32, width=32, num_inference_steps=n, guidance_scale=2.5,
                true_cfg_scale=w, output_type=output_type, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_flux_euler_and_dpm_equal_the_pipeline(flux, w):
    """Guidance embedding (scale 2.5, one call) and / or true CFG (w > 1, two calls), as FluxPipeline does."""
    c, pipe = flux
    emb, pooled, neg, negp = _embeds(32)
    ea, tr, n = dict(encoder_hidden_states=emb, pooled_projections=pooled), _guidance(w, neg, negp), 4
    den = F.FluxDenoiser(c, guidance_scale=2.5)
    x, info = ds.sample(ds.Euler(), den, _noise(), F.flux_sigmas(c.scheduler, n, (16, 16)), extra_args=ea,
                        transforms=tr, disable=True, return_info=True)
    assert info.nfe == n * (2 if w > 1 else 1)
    torch.testing.assert_close(x, F.unpack(_flux_run(pipe, emb, pooled, neg, negp, w, n), 16, 16), **TOL)
    torch.testing.assert_close(S.decode(c.vae, x), _flux_run(pipe, emb, pooled, neg, negp, w, n, "pt"), **TOL)
    if c.transformer.config.guidance_embeds:  # the embedding's scale is an input: another scale, another result
        other = ds.sample(ds.Euler(), F.FluxDenoiser(c, guidance_scale=6.0), _noise(),
                          F.flux_sigmas(c.scheduler, n, (16, 16)), extra_args=ea, transforms=tr, disable=True)
        assert (other - x).abs().max() > 1e-4
    else:
        with pytest.raises(ValueError, match="has no guidance embedding"):
            den(_noise(), 1.0, **ea, guidance=3.0)
    try:
        pipe.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                     use_dynamic_shifting=True, time_shift_type="exponential")
        ref = F.unpack(_flux_run(pipe, emb, pooled, neg, negp, w, n), 16, 16)
        sig = ds.sigmas_flow_dpm(n, shift=float(torch.tensor(ds.flux_mu(64), dtype=torch.float64).exp()))
        x = ds.sample(ds.DPMpp2M(), F.FluxDenoiser(c, guidance_scale=2.5, quantize=1000), _noise() * (1 + sig[0]),
                      sig, extra_args=ea, transforms=tr, disable=True)
        torch.testing.assert_close(x, ref, **TOL)
    finally:
        pipe.scheduler = c.scheduler


def test_flux_heun_is_flow_match_heun_on_the_flux_transformer(flux):
    """FluxPipeline refuses FlowMatchHeun (it passes custom sigmas); the scheduler's own loop is the reference."""
    c, pipe = flux
    emb, pooled, _, _ = _embeds(32)
    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    den = F.FluxDenoiser(c, prompt_embeds=emb, pooled_prompt_embeds=pooled, guidance_scale=2.5)
    velocity = ds.FlowModelView(den)
    z = _noise()
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(velocity(z, t / 1000), t, z).prev_sample
    x = ds.sample(ds.FlowTime(ds.Heun()), den, _noise(), S.sd3_sigmas(sched, 4), disable=True)
    torch.testing.assert_close(x, z, **TOL)
    with pytest.raises(ValueError, match="does not support custom sigmas|sigmas"):
        pipe.scheduler = sched
        try:
            _flux_run(pipe, emb, pooled, emb, pooled, 1.0, 4)
        finally:
            pipe.scheduler = c.scheduler


def test_flux_pack_unpack_and_checks(flux):
    c, _ = flux
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(F.unpack(F.pack(x), 6, 8), x)
    assert torch.equal(F.pack(x)[0, 1, 0::4], x[0, :, 0, 2])  # patch (0, 1): channels x (2 x 2), top-left first
    ids = F.image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]
    emb, pooled, _, _ = _embeds(32)
    den = F.FluxDenoiser(c, prompt_embeds=emb, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="latent \\(Flux packs 2x2 patches\\) size 7x8"):
        den(torch.zeros(1, 4, 7, 8), 1.0)
    with pytest.raises(ValueError, match=r"unpacked latents \[B, 4, h, w\]"):
        den(torch.zeros(1, 16, 8, 8), 1.0)


def _save(parts, root, names):
    for name in names:
        getattr(parts, name).save_pretrained(os.path.join(root, name))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_loaders_round_trip_and_bad_inputs(family, tmp_path, monkeypatch):
    mod, parts = (S, S.tiny_sd3_components()) if family == "sd3" else (F, F.tiny_flux_components())
    load = S.load_sd3 if family == "sd3" else F.load_flux
    _save(parts, tmp_path, ("transformer", "vae", "scheduler"))
    got = load(tmp_path, dtype=torch.float32)
    for a, b in zip(got.transformer.state_dict().values(), parts.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert got.text_encoder is None and got.tokenizer is None
    # every bad input fails before a model is built
    import diffusers
    cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
    monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        load(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device"):
        load(tmp_path, dtype=torch.float32, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(tmp_path, dtype=torch.float32, device="cuda")
    for f in os.listdir(tmp_path / "vae"):
        if f.endswith(".safetensors"):
            os.remove(tmp_path / "vae" / f)
    os.remove(tmp_path / "scheduler" / "scheduler_config.json")
    with pytest.raises(FileNotFoundError, match=r"missing vae/ weights .*scheduler/scheduler_config.json"):
        load(tmp_path, dtype=torch.float32)
    os.makedirs(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="missing"):
        load(tmp_path, dtype=torch.float32)
