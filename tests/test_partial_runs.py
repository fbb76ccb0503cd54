"""Partial runs (diffsolve.partial): splits, ComfyUI's denoise, diffusers' strength / refiner hand-off,
img2img starts and sigma quantisation, against hand-worked formulas and the peers (diffusers' img2img
pipeline, k-diffusion's DiscreteSchedule)."""
import functools
import re
from pathlib import Path

import pytest
import torch

import diffsolve as ds
from diffsolve.partial import (denoise_sigmas, denoise_steps, handoff_step, img2img_start, partial_sigmas,
                               quantize_sigmas, split_sigmas, strength_start_step)
from diffsolve_studies.toy.datasets import three_component_mixture

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gm():
    return three_component_mixture()


def _x(n=256, sigma=20.0, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


def _rms(a):
    return a.pow(2).mean().sqrt().item()


def _two_parts(solver, model, x, sigmas, k, **loop):
    high, low = split_sigmas(sigmas, k)
    return ds.sample(solver, model, ds.sample(solver, model, x, high, disable=True, **loop), low, disable=True,
                     **loop)


# ------------------------------------------------------------------------------------------ the grids
def test_split_shares_the_boundary_and_checks_its_step():
    sigmas = ds.sigmas_karras(10, 0.03, 14.6)
    high, low = split_sigmas(sigmas, 4)
    assert torch.equal(high, sigmas[:5]) and torch.equal(low, sigmas[4:]) and high[-1] == low[0]
    assert len(high) - 1 + len(low) - 1 == 10
    for bad in (0, 10, 11, -1):
        with pytest.raises(ValueError, match=f"step={bad}"):
            split_sigmas(sigmas, bad)
    with pytest.raises(ValueError, match="integer"):
        split_sigmas(sigmas, 2.5)
    with pytest.raises(ValueError, match="descending"):
        split_sigmas(sigmas.flip(0), 3)


def test_partial_sigmas_is_ksampler_advanced():
    sigmas = ds.sigmas_karras(10, 0.03, 14.6)
    assert torch.equal(partial_sigmas(sigmas, 3), sigmas[3:])
    assert torch.equal(partial_sigmas(sigmas, 2, 7), sigmas[2:8])
    forced = partial_sigmas(sigmas, 2, 7, force_full_denoise=True)
    assert torch.equal(forced[:-1], sigmas[2:7]) and forced[-1] == 0 and sigmas[7] > 0  # input untouched
    assert torch.equal(partial_sigmas(sigmas, 0, 10, force_full_denoise=True), sigmas)  # ran to the end already
    for start, end in ((5, 5), (6, 5), (-1, 4), (0, 11), (10, None)):
        with pytest.raises(ValueError, match=f"start_step={start}"):
            partial_sigmas(sigmas, start, end)
    with pytest.raises(ValueError, match="descending"):
        partial_sigmas(torch.tensor([1.0, 2.0, 0.0]), 0)


# ComfyUI, comfy/samplers.py at 002aefa382585d171aef13c7bd21f64b8664fe28, KSampler.set_steps:
#     if denoise is None or denoise > 0.9999: sigmas = calculate_sigmas(steps)
#     else: new_steps = int(steps / denoise); sigmas = calculate_sigmas(new_steps)[-(steps + 1):]
# worked by hand: 10 / 0.6 = 16.67 -> 16; 20 / 0.75 = 26.67 -> 26; 4 / 0.5 = 8; 3 / 0.3 = 10.000000000000002
# in floating point -> 10; 7 / 0.35 = 20.000000000000004 -> 20; 25 / 0.99995 -> 25 (the > 0.9999 shortcut);
# 1 / 1 = 1.
COMFY_DENOISE = [(10, 0.6, 16), (20, 0.75, 26), (4, 0.5, 8), (3, 0.3, 10), (7, 0.35, 20), (25, 0.99995, 25),
                 (1, 1.0, 1)]


@pytest.mark.parametrize("steps, denoise, total", COMFY_DENOISE)
def test_denoise_follows_comfyui_by_hand(steps, denoise, total):
    assert denoise_steps(steps, denoise) == total
    schedule = functools.partial(ds.sigmas_karras, sigma_min=0.0292, sigma_max=14.6146)
    got = denoise_sigmas(schedule, steps, denoise)
    full = schedule(total)
    assert len(got) == steps + 1 and torch.equal(got, full[total - steps:])  # the last steps + 1 of `total` steps


def test_denoise_validation():
    schedule = functools.partial(ds.sigmas_karras, sigma_min=0.03, sigma_max=14.6)
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=f"denoise must be a number in \\(0, 1\\], got {bad!r}"):
            denoise_sigmas(schedule, 10, bad)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="steps"):
            denoise_sigmas(schedule, bad, 0.5)
    with pytest.raises(ValueError, match="descending"):
        denoise_sigmas(lambda n: schedule(n).flip(0), 5, 0.5)
    with pytest.raises(ValueError, match="fewer than steps"):
        denoise_sigmas(lambda n: schedule(2), 5, 0.5)


# diffusers StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(n * strength), n), start = n - init.
# By hand: int(10 * 0.6) = int(6.000000000000001) = 6 -> 4; int(3 * 0.7) = int(2.0999999999999996) = 2 -> 1;
# int(50 * 0.75) = 37 -> 13; strength 1 -> 0.
@pytest.mark.parametrize("steps, strength, start", [(10, 0.6, 4), (3, 0.7, 1), (50, 0.75, 13), (10, 1.0, 0)])
def test_strength_start_step_by_hand(steps, strength, start):
    assert strength_start_step(steps, strength) == start


def test_strength_and_handoff_validation():
    with pytest.raises(ValueError, match="keeps no step"):
        strength_start_step(10, 0.05)
    with pytest.raises(ValueError, match="strength must be"):
        strength_start_step(10, 1.2)
    timesteps = torch.arange(901, 0, -100)  # SD's DDIM, 10 steps, leading spacing, steps_offset=1
    # denoising_end = 0.8: cutoff round(1000 - 800) = 200, the base keeps 901 .. 201 (8 steps)
    assert handoff_step(timesteps, 0.8) == 8
    assert handoff_step(timesteps, 0.5) == 5  # cutoff 500: 901 .. 501
    for bad in (0.0, 1.0, 0.0001):
        with pytest.raises(ValueError, match="fraction"):
            handoff_step(timesteps, bad)


def test_img2img_start_is_x0_plus_sigma_noise():
    x0, n = torch.randn(3, 4), torch.randn(3, 4)
    sigmas = torch.tensor([2.5, 1.0, 0.0], dtype=torch.float64)
    assert torch.equal(img2img_start(x0, sigmas, n), x0 + 2.5 * n)
    with pytest.raises(ValueError, match="shape"):
        img2img_start(x0, sigmas, torch.randn(3, 5))


# ------------------------------------------------------------------------------------ split runs
@pytest.mark.parametrize("solver", [ds.Euler(), ds.Heun(), ds.DDIM(), ds.DDIM(eta=1.0)], ids=repr)
@pytest.mark.parametrize("k", [1, 7, 18])
def test_split_run_is_the_full_run_bit_for_bit(gm, solver, k):
    """Single-step solvers keep no state between steps, so two `sample` calls over (high, low) are the
    full run exactly; stochastic DDIM draws the same noise because seeded_noise depends on (sigma,
    sigma_next) only."""
    sigmas, x = ds.sigmas_karras(19, 0.01, 20.0), _x()
    noise = ds.seeded_noise(x, 11) if solver.stochastic else None
    full = ds.sample(solver, gm, x, sigmas, disable=True, noise_sampler=noise)
    assert torch.equal(_two_parts(solver, gm, x, sigmas, k, noise_sampler=noise), full)


def test_multistep_history_restarts_at_the_split(gm):
    """DPM++ 2M's first step after the split has no history (first order), as in ComfyUI. The difference to
    the full run is nonzero, smaller than the run's own discretisation error, and shrinks like 1 / n**2
    (one lower-order step). Measured RMS over 256 points: 8.3e-3 (n = 20), 1.7e-3 (40), 3.9e-4 (80)."""
    x = _x()
    ref = ds.sample(ds.DPMpp2M(), gm, x, ds.sigmas_karras(4000, 0.01, 20.0), disable=True)
    diffs = []
    for n in (20, 40, 80):
        sigmas = ds.sigmas_karras(n, 0.01, 20.0)
        full = ds.sample(ds.DPMpp2M(), gm, x, sigmas, disable=True)
        diff = _rms(_two_parts(ds.DPMpp2M(), gm, x, sigmas, n // 2) - full)
        assert 0 < diff < _rms(full - ref), (n, diff, _rms(full - ref))
        diffs.append(diff)
    assert diffs[0] / diffs[1] > 3 and diffs[1] / diffs[2] > 3, diffs


def test_img2img_with_denoise_one_is_the_full_sampler(gm):
    """denoise = 1 keeps the whole schedule, and from x0 = 0 the start is sigmas[0] * noise: the full run."""
    schedule = functools.partial(ds.sigmas_karras, sigma_min=0.01, sigma_max=20.0)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = denoise_sigmas(schedule, 15, 1.0)
    assert torch.equal(sigmas, schedule(15))
    for solver in (ds.Heun(), ds.DPMpp2M()):
        full = ds.sample(solver, gm, noise * schedule(15)[0], schedule(15), disable=True)
        ours = ds.sample(solver, gm, img2img_start(torch.zeros_like(noise), sigmas, noise), sigmas, disable=True)
        assert torch.equal(ours, full)
    # with denoise < 1 the run starts part-way: from a data point it stays near the data (|x - x0| ~ sigma_start)
    x0 = gm.sample(256, generator=torch.Generator().manual_seed(4))
    part = denoise_sigmas(schedule, 10, 0.3)
    out = ds.sample(ds.Heun(), gm, img2img_start(x0, part, noise), part, disable=True)
    assert part[0] < 0.5 and _rms(out - x0) < 2 * part[0].item(), (part[0].item(), _rms(out - x0))


# -------------------------------------------------------------------------------- diffusers img2img
def test_diffusers_img2img_strength_is_a_partial_ddim_run():
    """StableDiffusionImg2ImgPipeline(strength=0.6, DDIM) on latents (a 4-channel `image` skips the VAE) equals
    diffsolve DDIM from img2img_start over partial_sigmas(grid, strength_start_step(n, 0.6)), same noise."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffsolve.integrations.diffusers import SDDenoiser, from_ve, sigmas_from_scheduler, tiny_sd_components
    c = tiny_sd_components()
    pipe = StableDiffusionImg2ImgPipeline(vae=c.vae, text_encoder=None, tokenizer=None, unet=c.unet,
                                          scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    x0, pos, neg = (torch.randn(*shape, generator=g) for shape in ((2, 4, 16, 16), (2, 77, 8), (2, 77, 8)))
    n = 10
    ref = pipe(image=x0, strength=0.6, prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=5.0,
               num_inference_steps=n, output_type="latent", generator=torch.Generator().manual_seed(5)).images
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))  # the pipeline's one draw
    den = SDDenoiser(unet=c.unet, scheduler=c.scheduler)
    cfg = [ds.cfg(5.0, uncond={"encoder_hidden_states": neg})]
    grid = sigmas_from_scheduler(c.scheduler, n)[0]

    def ours(start):
        part = partial_sigmas(grid, start)
        x = ds.sample_ddim(den, img2img_start(x0, part, noise), part, extra_args={"encoder_hidden_states": pos},
                           transforms=cfg, disable=True)
        return from_ve(x, part[-1])
    start = strength_start_step(n, 0.6)
    assert start == 4
    err = (ours(start) - ref).abs().max().item()
    assert err < 1e-4, err  # measured 3.8e-6 on |latents| <= 6.7 (float32 rounding)
    assert (ours(start + 1) - ref).abs().max().item() > 1e-2  # negative control: one step off


# ------------------------------------------------------------------------------------- quantisation
def _sd_alphas_cumprod():
    """Stable Diffusion's scaled_linear schedule (beta 0.00085 .. 0.012, 1000 steps), as diffusers builds it."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)


def test_quantize_matches_kdiffusion_discrete_schedule():
    from diffsolve.integrations.kdiffusion import load
    _, external = load()
    table = ds.sigmas_from_alphas_cumprod(_sd_alphas_cumprod())  # float64, ascending
    ks = external.DiscreteSchedule(table, quantize=True)
    g = torch.Generator().manual_seed(0)
    grids = [ds.sigmas_karras(30, table[0].item(), table[-1].item()),
             ds.append_zero(torch.logspace(1.5, -2.0, 12, dtype=torch.float64)),
             torch.cat([(torch.rand(200, generator=g, dtype=torch.float64) * 7 - 3.6).exp().sort(descending=True)
                        .values, torch.zeros(1, dtype=torch.float64)])]
    for sigmas in grids:
        ours = quantize_sigmas(sigmas, table, unique=False)
        nonzero = sigmas > 0
        want = table[ks.sigma_to_t(sigmas[nonzero], quantize=True)]
        assert torch.equal(ours[nonzero], want)
        assert (ours[~nonzero] == 0).all()
        # diffsolve's own quantised VPDenoiser timesteps pick the same entries
        t = ds.DiscreteTimesteps(_sd_alphas_cumprod(), quantize=True).sigma_to_t(sigmas[nonzero])
        assert torch.equal(table[t.long()], want)
    # negative control: between two table entries a < b, a sigma above the geometric mean but below the
    # arithmetic one is nearer to b in log space and nearer to a in sigma
    a, b = table[:-1], table[1:]
    between = 0.5 * ((a * b).sqrt() + 0.5 * (a + b))
    assert torch.equal(quantize_sigmas(between, table, unique=False), b)
    assert torch.equal(table[ks.sigma_to_t(between, quantize=True)], b)
    linear = table[(between[:, None] - table[None]).abs().argmin(-1)]
    assert torch.equal(linear, a)


def test_quantize_unique_keeps_the_grid_descending():
    table = ds.sigmas_from_alphas_cumprod(_sd_alphas_cumprod())
    sigmas = ds.sigmas_karras(200, table[0].item(), table[-1].item())  # dense near sigma_min: repeats
    full, uniq = quantize_sigmas(sigmas, table, unique=False), quantize_sigmas(sigmas, table)
    assert len(full) == len(sigmas) and (full[1:] == full[:-1]).any()
    assert (uniq[1:] < uniq[:-1]).all() and uniq[-1] == 0 and set(uniq.tolist()) == set(full.tolist())
    out = ds.sample(ds.Euler(), lambda x, s: x * 0, torch.ones(1, 1, dtype=torch.float64), uniq, disable=True)
    assert out.abs().max() == 0
    with pytest.raises(ValueError, match="model_sigmas"):
        quantize_sigmas(sigmas, torch.tensor([1.0, -1.0]))


# ------------------------------------------------------------------------------------------ the doc
def test_partial_runs_doc_examples_run():
    path = ROOT / "docs" / "partial-runs.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace = {"__name__": "__doc_example__"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
