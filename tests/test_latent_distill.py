"""Distillation in latent space (acceptance 1 and 4 of the Stable Diffusion issue), offline on the tiny random
components: for SDS, MSD, VSD and SDI the gradient that `DistillationGuidance` puts on the latents equals the
core distiller's `grad`, built independently here on the wrapped denoiser (`SDDenoiser` + diffsolve's CFG
transform) with the same generator seed; and latents / embeddings of the wrong dtype or device fail with a
ValueError naming both before the UNet runs."""
import math

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from diffsolve.distill import MSD, SDI, SDS, VSD  # noqa: E402
from diffsolve.integrations.diffusers import SDDenoiser, tiny_sd_components, vae_encode  # noqa: E402
from diffsolve.integrations.threestudio import DistillationGuidance  # noqa: E402
from diffsolve.transforms import cfg  # noqa: E402

torch.set_num_threads(1)
B, SEED, STEP, MAX_STEPS, W = 2, 11, 30, 100, 7.5


class Prompts:
    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_components()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return Prompts(torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g))


def _sigma(scheduler, t):
    abar = float(scheduler.alphas_cumprod[t])
    return math.sqrt((1 - abar) / abar)


def _core(method, sd, prompts):
    """The core distiller over the wrapped denoiser, configured by hand the way the guidance documents it:
    sigma in [sigma(t=20), sigma(t=980)] (min/max_step_percent 0.02 / 0.98 of 1000), DreamFusion weighting,
    CFG c + w (c - u), MSD's lambda log-linear from 1e3 to 1e-2 over the run."""
    den = SDDenoiser(unet=sd.unet, scheduler=sd.scheduler)
    cond, uncond = (e.expand(B, -1, -1) for e in (prompts.cond, prompts.uncond))
    common = dict(transforms=[cfg(W, uncond={"encoder_hidden_states": uncond}, convention="paper")],
                  extra_args={"encoder_hidden_states": cond})
    lo, hi = _sigma(sd.scheduler, 20), _sigma(sd.scheduler, 980)
    noisy = dict(sigma_min=lo, sigma_max=hi, weighting="sds", **common)
    if method == "sds":
        return SDS(den, **noisy)
    if method == "vsd":  # the guidance's default variational: the frozen, unguided conditional model
        return VSD(den, SDDenoiser(unet=sd.unet, scheduler=sd.scheduler, prompt_embeds=cond), **noisy)
    if method == "sdi":
        sdi = SDI(den, total_steps=MAX_STEPS, t_range=(0.0, 1.0), n_inversion=2, **noisy)
        sdi.update_step(STEP)
        return sdi
    lam = math.exp(math.log(1e3) + STEP / MAX_STEPS * (math.log(1e-2) - math.log(1e3)))
    return MSD(den, lam, steps=4, sigma_min=lo, sigma_max=hi, **common)


FAST = {"msd": dict(steps=4), "sds": {}, "vsd": {}, "sdi": dict(n_inversion=2)}


@pytest.mark.parametrize("method", ["sds", "msd", "vsd", "sdi"])
def test_latent_gradient_equals_core_distiller(sd, prompts, method):
    guidance = DistillationGuidance(sd, method=method, seed=SEED, trainer_max_steps=MAX_STEPS, **FAST[method])
    guidance.update_step(0, STEP)
    latents = torch.randn(B, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = guidance(latents, prompts, rgb_as_latents=True)
    out["loss_sds"].backward()
    assert guidance.last_seed == SEED + STEP

    core = _core(method, sd, prompts)
    x = latents.detach().permute(0, 3, 1, 2)
    expected = core.grad(x, torch.Generator().manual_seed(SEED + STEP))
    assert torch.isfinite(expected).all() and expected.abs().max() > 1e-3
    got = latents.grad.permute(0, 3, 1, 2) * B  # loss_sds = 0.5 |x - sg(x - g)|^2 / B
    err = (got - expected).abs().max().item()
    assert err <= 1e-6 * max(1.0, expected.abs().max().item()), f"max |diff| = {err:g}"
    assert core.last_nfe == guidance.distiller.last_nfe
    # the comparison can fail: another seed gives another gradient
    other = _core(method, sd, prompts).grad(x, torch.Generator().manual_seed(SEED + STEP + 1))
    assert (other - expected).abs().max() > 1e-4


def test_rgb_path_gradient_norm_equals_core_on_encoded_latents(sd, prompts):
    guidance = DistillationGuidance(sd, method="sds", seed=SEED, trainer_max_steps=MAX_STEPS)
    guidance.update_step(0, STEP)
    rgb = torch.rand(B, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    out = guidance(rgb, prompts)
    with torch.no_grad():
        latents = vae_encode(sd.vae, rgb.permute(0, 3, 1, 2), generator=torch.Generator().manual_seed(SEED + STEP + 1))
    expected = _core("sds", sd, prompts).grad(latents, torch.Generator().manual_seed(SEED + STEP))
    assert abs(out["grad_norm"].item() - expected.norm().item()) <= 1e-6 * expected.norm().item()


# ------------------------------------------------------------------ mismatched dtype / device (acceptance 4)
def test_sd_denoiser_refuses_mismatched_dtype_and_device(sd, prompts):
    den = SDDenoiser(unet=sd.unet, scheduler=sd.scheduler, prompt_embeds=prompts.cond)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    calls = []
    hook = sd.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"x \(latents\) has dtype torch.float64 but the UNet has dtype "
                                             r"torch.float32"):
            den(x.double(), sigma)
        with pytest.raises(ValueError, match="encoder_hidden_states.*torch.float64.*torch.float32"):
            den(x, sigma, encoder_hidden_states=prompts.cond.double())
        with pytest.raises(ValueError, match="x \\(latents\\) is on device meta but the UNet is on device cpu"):
            den(torch.empty(1, 4, 8, 8, device="meta"), sigma)
        with pytest.raises(ValueError, match="encoder_hidden_states.*on device meta.*UNet is on device cpu"):
            den(x, sigma, encoder_hidden_states=torch.empty(1, 7, 8, device="meta"))
        assert calls == []  # refused before the UNet ran
        assert den(x, sigma).shape == x.shape and calls == [1]
    finally:
        hook.remove()


def test_guidance_refuses_other_device_before_work(sd, prompts):
    guidance = DistillationGuidance(sd, method="sds")
    x = torch.randn(1, 8, 8, 4)
    with pytest.raises(ValueError, match="latents is on device meta but the UNet is on device cpu"):
        guidance(x.to("meta"), prompts, rgb_as_latents=True)
    with pytest.raises(ValueError, match="rgb is on device meta"):
        guidance(torch.empty(1, 32, 32, 3, device="meta"), prompts)
    with pytest.raises(ValueError, match=r"prompt embeddings \(uncond\) is on device meta"):
        guidance(x, Prompts(prompts.cond, prompts.uncond.to("meta")), rgb_as_latents=True)
    with pytest.raises(ValueError, match="floating-point"):
        guidance(torch.zeros(1, 8, 8, 4, dtype=torch.long), prompts, rgb_as_latents=True)
    assert guidance.last_seed is None  # no call got as far as drawing noise


def test_guidance_casts_to_a_half_precision_unet():
    """threestudio renders in float32 and runs the UNet in half precision: the guidance casts per UNet call
    (SDDenoiser(cast=True)) while the strict SDDenoiser refuses the mix. bfloat16 stands in for float16 on CPU."""
    half = tiny_sd_components()
    half.unet.to(torch.bfloat16)
    full = tiny_sd_components()
    g = torch.Generator().manual_seed(4)
    prompts = Prompts(torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g))
    x = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    losses = [DistillationGuidance(c, method=m, seed=1, **FAST[m])(x, prompts, rgb_as_latents=True)["loss_sds"]
             for c in (half, full) for m in ("sds", "msd")]
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses)
    for lo, hi in ((losses[0], losses[2]), (losses[1], losses[3])):  # bfloat16 UNet vs float32 UNet, same noise
        assert abs(lo.item() - hi.item()) <= 0.05 * hi.item(), (lo.item(), hi.item())
    with pytest.raises(ValueError, match="torch.float32 but the UNet has dtype torch.bfloat16"):
        SDDenoiser(unet=half.unet, scheduler=half.scheduler, prompt_embeds=prompts.cond)(x.permute(0, 3, 1, 2), 1.0)
