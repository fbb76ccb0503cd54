"""The tiny Stable Diffusion UNet through k-diffusion's own CompVis wrappers (against diffsolve's
`denoiser_from_unet`, diffsolve's solvers and transforms under k-diffusion's samplers), and VSD with a
PEFT LoRA variational UNet. Offline, on diffusers' tiny random components; comparisons in float64."""
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from conftest import tiny_sd_components  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.distill.vsd import VSD  # noqa: E402
from diffsolve.integrations import kdiffusion as K  # noqa: E402
from diffsolve.integrations.diffusers import denoiser_from_unet  # noqa: E402
from diffsolve.integrations.lora import LoRAVariational  # noqa: E402

torch.set_num_threads(1)
sampling, external = K.load()
F64 = torch.float64
TOL = 1e-5


def _close(a, b, tol=TOL):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max |diff| = {err:g}"


def _randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd64(request):
    unet, scheduler, _ = tiny_sd_components(prediction_type=request.param)
    return unet.to(F64), scheduler


def _cond(b=2, seed=1):
    return _randn((b, 7, 8), seed), _randn((b, 7, 8), seed + 100)  # cond, uncond (cross_attention_dim 8)


# ------------------------------------------------------------------------------ k-diffusion wrapper
def test_compvis_denoiser_is_kdiffusions_class(sd64):
    unet, scheduler = sd64
    kmodel = K.compvis_denoiser(unet, scheduler)
    expected = external.CompVisDenoiser if scheduler.config.prediction_type == "epsilon" else external.CompVisVDenoiser
    assert type(kmodel) is expected
    assert kmodel.inner_model.unet is unet


@pytest.mark.parametrize("quantize", [False, True])
def test_denoiser_paths_agree(sd64, quantize):
    unet, scheduler = sd64
    kmodel = K.compvis_denoiser(unet, scheduler, quantize=quantize)
    dmodel = denoiser_from_unet(unet, scheduler, quantize=quantize)
    table = dmodel.sigmas
    cond, _ = _cond()
    x0 = _randn((2, 4, 16, 16), 0)
    # table sigmas, fractional (between table entries) sigmas, and a per-row pair
    sigmas = [table[0], table[10], table[500], table[-1],
              (table[10] * table[11]).sqrt(), 0.5 * (table[300] + table[301]), torch.tensor(3.7, dtype=F64)]
    with torch.no_grad():
        for sigma in sigmas:
            s = torch.as_tensor(sigma, dtype=F64).expand(2).clone()
            x = x0 + s[:, None, None, None] * _randn(x0.shape, 1)
            _close(kmodel(x, s, cond=cond), dmodel(x, s, encoder_hidden_states=cond))
        s = torch.stack([table[20], 0.5 * (table[700] + table[701])])
        x = x0 + s[:, None, None, None] * _randn(x0.shape, 2)
        out_k, out_d = kmodel(x, s, cond=cond), dmodel(x, s, encoder_hidden_states=cond)
        _close(out_k, out_d)
        # the comparison can fail: a different condition gives a different answer
        assert (kmodel(x, s, cond=-cond) - out_d).abs().max() > 1e-4


def test_diffsolve_euler_accepts_kdiffusion_model(sd64):
    unet, scheduler = sd64
    kmodel = K.compvis_denoiser(unet, scheduler)
    cond, _ = _cond()
    sigmas = sampling.get_sigmas_karras(6, kmodel.sigma_min.item(), kmodel.sigma_max.item()).to(F64)
    x = _randn((2, 4, 16, 16), 3) * sigmas[0]
    with torch.no_grad():
        expected = sampling.sample_euler(kmodel, x, sigmas, extra_args={"cond": cond}, disable=True)
        _close(ds.sample_euler(kmodel, x, sigmas, extra_args={"cond": cond}, disable=True), expected)
        # and diffsolve's own wrapper of the same UNet gives the same samples
        dmodel = denoiser_from_unet(unet, scheduler)
        _close(ds.sample_euler(dmodel, x, sigmas, extra_args={"encoder_hidden_states": cond}, disable=True),
               expected)


def test_diffsolve_cfg_under_kdiffusion_heun(sd64):
    unet, scheduler = sd64
    kmodel = K.compvis_denoiser(unet, scheduler)
    dmodel = denoiser_from_unet(unet, scheduler)
    cond, uncond = _cond()
    sigmas = sampling.get_sigmas_karras(5, kmodel.sigma_min.item(), kmodel.sigma_max.item()).to(F64)
    x = _randn((2, 4, 16, 16), 4) * sigmas[0]
    with torch.no_grad():
        guided = K.with_transforms(kmodel, [ds.cfg(7.5, uncond={"cond": uncond})])
        under_k = sampling.sample_heun(guided, x, sigmas, extra_args={"cond": cond}, disable=True)
        ours = ds.sample_heun(dmodel, x, sigmas, extra_args={"encoder_hidden_states": cond}, disable=True,
                              transforms=[ds.cfg(7.5, uncond={"encoder_hidden_states": uncond})])
        _close(under_k, ours)
        plain = sampling.sample_heun(kmodel, x, sigmas, extra_args={"cond": cond}, disable=True)
        assert (plain - ours).abs().max() > 1e-3  # guidance did something


def test_compvis_denoiser_rejects_sample_prediction():
    unet, scheduler, _ = tiny_sd_components(prediction_type="sample")
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        K.compvis_denoiser(unet, scheduler)


# ------------------------------------------------------------------------------------ VSD with LoRA
@pytest.fixture
def sd32():
    unet, scheduler, _ = tiny_sd_components()
    return unet, scheduler


def _lora_state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora_" in k}


def test_vsd_lora_updates_lora_only(sd32):
    unet, scheduler = sd32
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    ehs = _randn((1, 7, 8), 5, torch.float32)
    lora = LoRAVariational(unet, scheduler, rank=4, lr=1e-2, encoder_hidden_states=ehs)
    trainable = [n for n, p in lora.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = _lora_state(lora.unet)
    assert all((v == 0).all() for k, v in lora_before.items() if "lora_B" in k)  # zero-init B

    vsd = VSD(denoiser_from_unet(unet, scheduler), variational=lora.denoiser, variational_update=lora,
              extra_args={"encoder_hidden_states": ehs.expand(2, -1, -1)}, sigma_max=10.0)
    gen = torch.Generator().manual_seed(0)
    x = _randn((2, 4, 16, 16), 6, torch.float32)
    for _ in range(3):
        g = vsd.grad(x, gen)
        assert torch.isfinite(g).all() and g.shape == x.shape
        x = x - 0.1 * g
        assert vsd.update(x, gen) is lora.denoiser
    assert vsd.variational is lora.denoiser

    lora_after = _lora_state(lora.unet)
    assert lora_after.keys() == lora_before.keys()
    assert any(not torch.equal(lora_after[k], lora_before[k]) for k in lora_after if "lora_A" in k)
    assert all(not torch.equal(lora_after[k], lora_before[k]) for k in lora_after if "lora_B" in k)

    # the base UNet is bit-identical to before
    base_after = unet.state_dict()
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    # the copy's non-LoRA weights are bit-identical to the base's
    copy_base = {k.replace(".base_layer", ""): v for k, v in lora.unet.state_dict().items() if "lora_" not in k}
    assert copy_base.keys() == base_before.keys()
    assert all(torch.equal(copy_base[k], base_before[k]) for k in base_before)
    assert any(".base_layer" in k for k in lora.unet.state_dict())  # PEFT really wrapped the layers


def test_vsd_gradient_is_zero_at_init(sd32):
    unet, scheduler = sd32
    ehs = _randn((2, 7, 8), 7, torch.float32)
    lora = LoRAVariational(unet, scheduler, encoder_hidden_states=ehs)
    pretrained = denoiser_from_unet(unet, scheduler)
    vsd = VSD(pretrained, variational=lora.denoiser, variational_update=lora,
              extra_args={"encoder_hidden_states": ehs}, sigma_max=10.0)
    x = _randn((2, 4, 16, 16), 8, torch.float32)
    g = vsd.grad(x, torch.Generator().manual_seed(1))
    assert torch.equal(g, torch.zeros_like(g))
    # not vacuous: the denoisers themselves are nonzero and differ once LoRA has moved
    with torch.no_grad():
        s = torch.full((2,), 1.3)
        assert pretrained(x, s, encoder_hidden_states=ehs).abs().max() > 0
    for _ in range(2):
        vsd.update(x, torch.Generator().manual_seed(2))
    g = vsd.grad(x, torch.Generator().manual_seed(1))
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_lora_variational_bad_input(sd32):
    unet, scheduler = sd32
    with pytest.raises(ValueError, match="rank"):
        LoRAVariational(unet, scheduler, rank=0)
    with pytest.raises(ValueError, match="not found|match no module"):
        LoRAVariational(unet, scheduler, target_modules=("no_such_layer",))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lora_loss_matches_diffusers_scheduler(prediction_type):
    """The LoRA loss is threestudio's: scheduler.add_noise, target noise (epsilon) or get_velocity (v)."""
    unet, scheduler, _ = tiny_sd_components(prediction_type=prediction_type)
    ehs = _randn((2, 7, 8), 9, torch.float32)
    lora = LoRAVariational(unet, scheduler, encoder_hidden_states=ehs)
    x = _randn((2, 4, 16, 16), 10, torch.float32)
    loss = lora.loss(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    z = scheduler.add_noise(x, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x, noise, t)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(unet(z, t, encoder_hidden_states=ehs).sample, target)
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
