"""diffsolve against diffusers on diffusers' own tiny random Stable Diffusion components, offline.

Every sampler comparison runs the same float32 UNet on both sides; tolerances are max abs differences of
the final latents (which reach |40-65| with a random UNet, whose epsilon does not fit its input, so 1e-4 is
about 2e-6 relative; the residual, ~2e-5, is float32 rounding, much of it diffusers computing its DDIM
coefficients in float32). Each test carries a negative control showing that the comparison can fail.
"""
import copy

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from conftest import tiny_sd_components, tiny_sd_scheduler  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.integrations.diffusers import (denoiser_from_unet, from_ve, sigmas_from_scheduler,  # noqa: E402
                                              to_ve, variance_noise_sampler)

torch.set_num_threads(1)
N, TOL = 10, 1e-4


@pytest.fixture(scope="module")
def parts():
    unet, sched, vae = tiny_sd_components()
    return unet, sched, vae


def _inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=g)
    pos, neg = torch.randn(batch, 77, 8, generator=g), torch.randn(batch, 77, 8, generator=g)
    noises = [torch.randn(batch, 4, size, size, generator=g) for _ in range(N)]
    return latents, pos, neg, noises


def _err(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def _diffusers_ddim(unet, sched, latents, emb, n=N, eta=0.0, noises=None):
    """The hand-written diffusers loop."""
    sched.set_timesteps(n)
    noises = iter(noises or ())
    for t in sched.timesteps:
        out = unet(latents, t, encoder_hidden_states=emb).sample
        kw = {"variance_noise": next(noises)} if eta > 0 else {}
        latents = sched.step(out, t, latents, eta=eta, **kw).prev_sample
    return latents


def _ours(unet, sched, latents, emb, n=N, eta=0.0, noises=None, transforms=(), sigmas=None, start=None):
    den = denoiser_from_unet(unet, sched)
    sigmas = sigmas_from_scheduler(sched, n)[0] if sigmas is None else sigmas
    x = to_ve(latents, sigmas[0]) if start is None else start
    ns = variance_noise_sampler(noises) if noises is not None else None
    x = ds.sample_ddim(den, x, sigmas, extra_args={"encoder_hidden_states": emb}, eta=eta, noise_sampler=ns,
                       transforms=transforms, disable=True)
    return from_ve(x, sigmas[-1])


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 1), ("leading", 0), ("trailing", 0)])
def test_ddim_eta0_matches_diffusers_loop(parts, spacing, steps_offset):
    unet, _, _ = parts
    sched = tiny_sd_scheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    latents, pos, _, _ = _inputs()
    ref = _diffusers_ddim(unet, sched, latents, pos)
    ours = _ours(unet, sched, latents, pos)
    assert _err(ours, ref) < TOL, _err(ours, ref)
    # negative controls: each of the three conversions of architecture.md is needed
    sigmas = sigmas_from_scheduler(sched, N)[0]
    final_scale = (1 + sigmas[-1] ** 2) ** 0.5
    to_zero = _ours(unet, sched, latents, pos, sigmas=torch.cat([sigmas[:-1], sigmas.new_zeros(1)]))
    assert _err(to_zero / final_scale, ref) > 1e-2  # ending at sigma = 0 instead of abar_0's sigma
    assert _err(ours * final_scale, ref) > 1e-2  # returning VE x without the final sqrt(abar) scaling
    ve_start = _ours(unet, sched, latents, pos, start=latents * sigmas[0])
    assert _err(ve_start, ref) > 1e-2  # starting at sigma_max * n instead of n * sqrt(1 + sigma_max**2)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_ddim_matches_diffusers_with_same_noise(parts, eta):
    unet, sched, _ = parts
    latents, pos, _, noises = _inputs()
    ref = _diffusers_ddim(unet, sched, latents, pos, eta=eta, noises=noises)
    ours = _ours(unet, sched, latents, pos, eta=eta, noises=noises)
    assert _err(ours, ref) < TOL, _err(ours, ref)
    # negative control: other noise (or none) does not match
    other = _ours(unet, sched, latents, pos, eta=eta, noises=noises[1:] + noises[:1])
    assert _err(other, ref) > 1e-2


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                                   ("trailing", 1), ("linspace", 0)])
def test_timesteps_and_sigmas_match_set_timesteps(spacing, steps_offset):
    sched = tiny_sd_scheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    acp = sched.alphas_cumprod.double()
    T = len(acp)
    for n in range(1, T + 1):  # every n: rounding at .5 and float arange lengths differ between libraries
        sched.set_timesteps(n)
        ours = ds.discrete_timesteps(T, n, spacing, steps_offset)
        assert torch.equal(ours, sched.timesteps), (n, ours.tolist(), sched.timesteps.tolist())
        if sched.timesteps.max() >= T or sched.timesteps.min() < 0:
            # leading + steps_offset=1 at n = T gives 1000; diffusers' trailing gives n + 1 timesteps ending
            # at -1 for some n (61, 103, ...: float arange length), which its DDIM reads as abar[-1]
            with pytest.raises(ValueError, match="outside"):
                sigmas_from_scheduler(sched, n)
            continue
        if n == 1 and sched.timesteps[0] == 0:
            with pytest.raises(ValueError, match="identity"):
                sigmas_from_scheduler(sched, n)
            continue
        sigmas, timesteps = sigmas_from_scheduler(sched, n)
        assert torch.equal(timesteps, sched.timesteps)
        expect = ((1 - acp[sched.timesteps]) / acp[sched.timesteps]).sqrt()
        torch.testing.assert_close(sigmas[:len(expect)], expect, rtol=1e-12, atol=0)
        final = ((1 - acp[0]) / acp[0]).sqrt()  # set_alpha_to_one=False
        torch.testing.assert_close(sigmas[-1], final, rtol=1e-12, atol=0)
        # one sigma per timestep plus the final one, less diffusers' identity step from abar_0 to abar_0
        assert len(sigmas) == n + 1 - int(timesteps[-1] == 0)
        assert (sigmas[1:] < sigmas[:-1]).all()


def test_set_alpha_to_one_ends_at_zero():
    sched = tiny_sd_scheduler(set_alpha_to_one=True)
    sigmas, _ = sigmas_from_scheduler(sched, N)
    assert sigmas[-1].item() == 0.0 and len(sigmas) == N + 1


def test_v_prediction_ddim_matches_diffusers(parts):
    unet, _, _ = parts
    sched = tiny_sd_scheduler(prediction_type="v_prediction")
    latents, pos, _, noises = _inputs()
    for eta in (0.0, 0.5):
        ref = _diffusers_ddim(unet, sched, latents, pos, eta=eta, noises=noises)
        ours = _ours(unet, sched, latents, pos, eta=eta, noises=noises if eta else None)
        assert _err(ours, ref) < TOL, (eta, _err(ours, ref))
    # negative control: the same UNet read as an epsilon model gives another chain
    eps_sched = tiny_sd_scheduler()
    assert _err(_ours(unet, eps_sched, latents, pos), _diffusers_ddim(unet, sched, latents, pos)) > 1e-2


def test_cfg_matches_stable_diffusion_pipeline(parts):
    from diffusers import StableDiffusionPipeline
    unet, sched, vae = parts
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents, pos, neg, _ = _inputs()
    ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=5.0, num_inference_steps=N,
               output_type="latent", latents=latents.clone(), height=32, width=32).images
    ours = _ours(unet, sched, latents, pos, transforms=[ds.cfg(5.0, uncond={"encoder_hidden_states": neg})])
    assert _err(ours, ref) < TOL, _err(ours, ref)
    paper = _ours(unet, sched, latents, pos,
                  transforms=[ds.cfg(4.0, uncond={"encoder_hidden_states": neg}, convention="paper")])
    assert _err(paper, ours) < 1e-6, _err(paper, ours)
    unbatched = _ours(unet, sched, latents, pos,
                      transforms=[ds.cfg(5.0, uncond={"encoder_hidden_states": neg}, batched=False)])
    assert _err(unbatched, ref) < TOL, _err(unbatched, ref)
    # negative controls: cond and uncond swapped, or the paper's convention read with s
    swapped = _ours(unet, sched, latents, neg, transforms=[ds.cfg(5.0, uncond={"encoder_hidden_states": pos})])
    assert _err(swapped, ref) > 1e-2
    wrong_scale = _ours(unet, sched, latents, pos,
                        transforms=[ds.cfg(5.0, uncond={"encoder_hidden_states": neg}, convention="paper")])
    assert _err(wrong_scale, ref) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_model_view_round_trip(parts, prediction_type, dtype):
    """VPDenoiser(VPModelView(D)) == D at table and fractional sigmas. float64 checks the maps to 1e-5
    absolute; float32 cannot: D = x - sigma * eps multiplies any one-ulp change of the UNet's input by sigma
    (up to 14.6 here, |D| up to ~50 for the random UNet), so there the bound is relative to max |D|."""
    unet, sched, _ = parts
    D = denoiser_from_unet(copy.deepcopy(unet).to(dtype), sched)
    acp = sched.alphas_cumprod
    back = ds.VPDenoiser(ds.VPModelView(D, acp, prediction_type), acp, prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(4, 4, 16, 16, generator=g, dtype=dtype), torch.randn(4, 4, 16, 16, generator=g, dtype=dtype)
    emb = torch.randn(4, 77, 8, generator=g, dtype=dtype)
    table = D.sigmas[[0, 1, 500, 999]]
    fractional = D.t_to_sigma(torch.tensor([0.5, 17.3, 400.7, 998.9], dtype=torch.float64))
    with torch.no_grad():
        for sigma in (table, fractional):
            sigma = sigma.to(dtype)
            x = x0 + ds.append_dims(sigma, 4) * n
            want = D(x, sigma, encoder_hidden_states=emb)
            got = back(x, sigma, encoder_hidden_states=emb)
            tol = 1e-5 if dtype == torch.float64 else 1e-6 * want.abs().max().item()
            assert _err(got, want) < tol, (sigma.tolist(), _err(got, want), tol)
        # negative control: a view read with the other prediction type is not D
        other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
        wrong = ds.VPDenoiser(ds.VPModelView(D, acp, prediction_type), acp, other)
        assert _err(wrong(x, sigma, encoder_hidden_states=emb), want) > 1e-2


def test_linspace_ddim_is_off_grid_in_diffusers(parts):
    """A genuine convention difference, documented in `sigmas_from_scheduler`: with "linspace" spacing
    diffusers' DDIM steps from t to t - T // n (999 -> 899) but then continues from the next grid timestep
    (888), so no sigma grid reproduces it; the grid itself still matches `set_timesteps` (test above)."""
    unet, _, _ = parts
    sched = tiny_sd_scheduler(timestep_spacing="linspace", steps_offset=0)
    latents, pos, _, _ = _inputs()
    assert _err(_ours(unet, sched, latents, pos), _diffusers_ddim(unet, sched, latents, pos)) > 1.0


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])  # diffusers skips CFG at guidance_scale <= 1
def test_same_seed_gives_the_stock_pipelines_latents(parts, guidance_scale):
    """The pipeline draws its own initial latents from a seeded generator; diffsolve draws the same
    N(0, I) latents from the same seed (diffusers' randn_tensor on the CPU is torch.randn) and samples."""
    from diffusers import StableDiffusionPipeline
    unet, sched, vae = parts
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    _, pos, neg, _ = _inputs()
    f = pipe.vae_scale_factor
    ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=guidance_scale, num_inference_steps=N,
               output_type="latent", generator=torch.Generator().manual_seed(7), height=16 * f, width=16 * f).images
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7)) * sched.init_noise_sigma
    cfg = [ds.cfg(guidance_scale, uncond={"encoder_hidden_states": neg})] if guidance_scale > 1 else []
    ours = _ours(unet, sched, latents, pos, transforms=cfg)
    assert _err(ours, ref) < TOL, _err(ours, ref)
    other_seed = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    assert _err(_ours(unet, sched, other_seed, pos, transforms=cfg), ref) > 1e-2  # negative control
