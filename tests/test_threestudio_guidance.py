"""threestudio-style guidance (integrations/threestudio.py) on diffusers' tiny random components, offline and
without threestudio: the contract's keys, loss gradient = distiller gradient / B, the RGB path through the
VAE, update_step schedules, and an import that does not pull threestudio in."""
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from conftest import tiny_sd_components  # noqa: E402

from diffsolve.integrations.threestudio import C, DistillationGuidance  # noqa: E402

torch.set_num_threads(1)
FAST = {"msd": dict(steps=4), "sds": {}, "vsd": {}, "sdi": dict(n_inversion=2)}


class Prompts:
    """The minimal prompt_utils: cond / uncond tensors."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond


class ThreestudioLikePrompts(Prompts):
    """threestudio's PromptProcessorOutput shape: get_text_embeddings returns cat([cond, uncond])."""

    def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
        B = elevation.shape[0]
        return torch.cat([self.cond.expand(B, -1, -1), self.uncond.expand(B, -1, -1)])


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return Prompts(torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g))


def _cams(B):
    return torch.zeros(B), torch.zeros(B), torch.ones(B)


@pytest.mark.parametrize("method", ["msd", "sds", "vsd", "sdi"])
def test_keys_and_loss_gradient_equal_distiller_gradient(parts, prompts, method):
    B = 2
    guidance = DistillationGuidance(parts, method=method, seed=3, trainer_max_steps=10, **FAST[method])
    guidance.update_step(0, 5)
    latents = torch.randn(B, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = guidance(latents, prompts, *_cams(B), rgb_as_latents=True)
    assert set(out) == {"loss_sds", "grad_norm", "min_step", "max_step"}
    assert (out["min_step"], out["max_step"]) == (20, 980)
    assert guidance.last_seed == 3 + 5
    out["loss_sds"].backward()
    reference = guidance.distiller.grad(latents.detach().permute(0, 3, 1, 2),
                                        torch.Generator().manual_seed(guidance.last_seed),
                                        **guidance.call_conditions(prompts.cond.expand(B, -1, -1),
                                                                   prompts.uncond.expand(B, -1, -1)))
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    torch.testing.assert_close(latents.grad, reference.permute(0, 2, 3, 1) / B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["grad_norm"], reference.norm(), rtol=1e-5, atol=1e-6)


def test_threestudio_prompt_utils_order_cond_then_uncond(parts, prompts):
    B = 2
    cams = _cams(B)
    x = torch.randn(B, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    a = DistillationGuidance(parts, method="sds")
    b = DistillationGuidance(parts, method="sds")
    ga = a(x, prompts, *cams, rgb_as_latents=True)["grad_norm"]
    gb = b(x, ThreestudioLikePrompts(prompts.cond, prompts.uncond), *cams, rgb_as_latents=True)["grad_norm"]
    torch.testing.assert_close(ga, gb)
    swapped = DistillationGuidance(parts, method="sds")(x, Prompts(prompts.uncond, prompts.cond), *cams,
                                                        rgb_as_latents=True)["grad_norm"]
    assert not torch.allclose(ga, swapped)


def test_rgb_through_vae_gives_gradient_on_rgb(parts, prompts):
    rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    guidance = DistillationGuidance(parts, method="msd", steps=4)
    out = guidance(rgb, prompts, *_cams(1))
    out["loss_sds"].backward()
    assert torch.isfinite(out["loss_sds"]) and rgb.grad is not None and rgb.grad.abs().max() > 0


def test_repeated_calls_in_one_step_draw_fresh_noise(parts, prompts):
    guidance = DistillationGuidance(parts, method="sds")
    x = torch.randn(1, 8, 8, 4)
    first, second = (guidance(x, prompts, *_cams(1), rgb_as_latents=True)["grad_norm"] for _ in range(2))
    assert not torch.allclose(first, second)
    guidance.update_step(0, 0)
    torch.testing.assert_close(guidance(x, prompts, *_cams(1), rgb_as_latents=True)["grad_norm"], first)


def test_update_step_schedules(parts, prompts):
    msd = DistillationGuidance(parts, method="msd", trainer_max_steps=100)
    assert msd.distiller.bandwidth == pytest.approx(1e3)
    msd.update_step(0, 50)
    assert msd.distiller.bandwidth == pytest.approx(10 ** 0.5)  # log-linear midpoint of 1e3 -> 1e-2
    msd.update_step(0, 1000)
    assert msd.distiller.bandwidth == pytest.approx(1e-2)
    sdi = DistillationGuidance(parts, method="sdi", trainer_max_steps=100, n_inversion=2)
    sdi.update_step(0, 7)
    assert sdi.distiller.step == 7
    sds = DistillationGuidance(parts, method="sds", min_step_percent=[0, 0.5, 0.02, 100])
    assert sds.min_step == 500
    sds.update_step(0, 100)
    assert sds.min_step == 20 and sds.distiller.sigma_min == pytest.approx(sds.sigma_of(20))
    assert C([0, 2.0, 8.0, 10], 0, 5) == pytest.approx(5.0)


def test_grad_clip_bounds_the_gradient(parts, prompts):
    B = 1
    x = torch.randn(B, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    guidance = DistillationGuidance(parts, method="sds", grad_clip=1e-4)
    guidance(x, prompts, *_cams(B), rgb_as_latents=True)["loss_sds"].backward()
    assert x.grad.abs().max() <= 1e-4 / B * (1 + 1e-3)  # float32 x - (x - g)


def test_bad_arguments(parts):
    with pytest.raises(ValueError, match="method"):
        DistillationGuidance(parts, method="dreamfusion")
    with pytest.raises(ValueError, match="components"):
        DistillationGuidance(parts[:2])


def test_import_does_not_import_threestudio():
    code = ("import sys; import diffsolve.integrations.threestudio as m; "
            "assert 'threestudio' not in sys.modules, 'threestudio imported'; print(m.DistillationGuidance)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
