"""The distillers on the latents of SD3, Flux and SDXL (tiny random components), each gradient against a
formula written in the model's native form from its raw output, with the same seed; another seed differs.

Native forms (uniform weighting): flow models (x_t = (1 - t) x + t n, raw v):
  SDS  (1 - t) (v(x_t, t) - (n - x))                VSD  (1 - t) (v_pre - v_phi)
  SDI  (1 - t) (v(z_t, t) - (kappa - x)), kappa from DDIM inversion in t (x_t += dt v)
  MSD  one_call: x - (x_s - t_s v(x_s, t_s)) at s = lambda / sqrt(2); posterior: the DDPM chain from x at s
VP eps model (SDXL, z = sqrt(abar) x + sqrt(1 - abar) n, raw eps): SDS eps - n, VSD eps_pre - eps_phi, MSD one_call.
"""
import json
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.distill import MSD, SDI, SDS, VSD, sigma_from_uniform

pytest.importorskip("diffusers")
from diffusers import FluxPipeline  # noqa: E402

from integrations import flux as F  # noqa: E402
from integrations import sd3 as S  # noqa: E402
from integrations import sdxl as X  # noqa: E402

SMIN, SMAX = 0.05, 20.0


def _g(seed):
    return torch.Generator().manual_seed(seed)


class Flow:
    """A flow family: its diffsolve denoiser and its raw velocity, called the way its pipeline calls it."""

    def __init__(self, family):
        g = _g(3)
        if family == "sd3":
            c = S.tiny_sd3_components()
            self.cond = dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                             pooled_projections=torch.randn(1, 64, generator=g))
            self.other = dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                              pooled_projections=torch.randn(1, 64, generator=g))
            self.den = S.SD3Denoiser(c)
        else:
            c = F.tiny_flux_components()
            self.cond = dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                             pooled_projections=torch.randn(1, 32, generator=g))
            self.other = dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                              pooled_projections=torch.randn(1, 32, generator=g))
            self.den = F.FluxDenoiser(c, guidance_scale=3.5)
        self.family, self.tr = family, c.transformer

    @torch.no_grad()
    def v(self, x_t, t, cond=None):
        cond = self.cond if cond is None else cond
        b = x_t.shape[0]
        emb = cond["encoder_hidden_states"].expand(b, -1, -1)
        pooled = cond["pooled_projections"].expand(b, -1)
        t = torch.as_tensor(t, dtype=torch.float32).expand(b)
        if self.family == "sd3":
            return self.tr(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=emb, pooled_projections=pooled,
                           return_dict=False)[0]
        h, w = x_t.shape[-2:]
        packed = FluxPipeline._pack_latents(x_t, b, x_t.shape[1], h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        out = self.tr(hidden_states=packed, timestep=t, guidance=torch.full([b], 3.5), encoder_hidden_states=emb,
                      pooled_projections=pooled, txt_ids=torch.zeros(emb.shape[1], 3), img_ids=ids,
                      return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8)  # the pipeline's VAE factor 8 (pixel sizes)


def _x(seed=0):
    return torch.randn(2, 4, 8, 8, generator=_g(seed)) * 0.5


def _sigma_n(x, seed):
    g = _g(seed)
    u = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    sigma = sigma_from_uniform(u, SMIN, SMAX, "karras", 7.0).to(x.dtype)
    return sigma, torch.randn(x.shape, generator=g, dtype=x.dtype)


def _t(sigma, x):
    return ds.append_dims(sigma / (1 + sigma), x.ndim)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request):
    return Flow(request.param)


TOL = dict(rtol=1e-4, atol=1e-4)


def test_sds_on_flow_latents(flow):
    x = _x()
    sds = SDS(flow.den, sigma_min=SMIN, sigma_max=SMAX, extra_args=flow.cond)
    got = sds.grad(x, _g(7))
    sigma, n = _sigma_n(x, 7)
    t = _t(sigma, x)
    x_t = (1 - t) * x + t * n
    torch.testing.assert_close(got, (1 - t) * (flow.v(x_t, t.flatten()) - (n - x)), **TOL)
    assert (sds.grad(x, _g(8)) - got).abs().max() > 1e-3


def test_vsd_on_flow_latents(flow):
    x = _x()
    phi = lambda z, sigma: flow.den(z, sigma, **flow.other)  # noqa: E731  (a stand-in for the fitted LoRA)
    vsd = VSD(flow.den, phi, sigma_min=SMIN, sigma_max=SMAX, extra_args=flow.cond)
    got = vsd.grad(x, _g(7))
    sigma, n = _sigma_n(x, 7)
    t = _t(sigma, x)
    x_t = (1 - t) * x + t * n
    torch.testing.assert_close(got, (1 - t) * (flow.v(x_t, t.flatten()) - flow.v(x_t, t.flatten(), flow.other)), **TOL)
    assert (vsd.grad(x, _g(8)) - got).abs().max() > 1e-3


def test_sdi_on_flow_latents(flow):
    x = _x()
    sdi = SDI(flow.den, sigma_min=SMIN, sigma_max=SMAX, total_steps=10, n_inversion=3, extra_args=flow.cond,
              inversion_transforms=())
    sdi.on_step(4)
    got = sdi.grad(x, _g(7))
    g = _g(7)
    tau = torch.rand(x.shape[0], generator=g, dtype=torch.float64) * sdi.tau_max
    sigma_t = sdi.sigma_t()
    u_t = float(sdi._u_of(torch.tensor(sigma_t)))
    u_end = (u_t - tau).clamp(min=0.0)
    levels = [sigma_from_uniform(1 + (u_end - 1) * j / 3, SMIN, SMAX) for j in range(4)]
    ts = [lv / (1 + lv) for lv in levels]
    x_t = x / ds.append_dims(1 + levels[0], x.ndim).float()  # DDIM inversion in the flow's own time
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x_t = x_t + ds.append_dims(t1 - t0, x.ndim).float() * flow.v(x_t, t0.float())
    s_end = ds.append_dims(levels[-1], x.ndim).float()
    kappa = (x_t * (1 + s_end) - x) / s_end + sdi.eta_noise * torch.randn(x.shape, generator=g)
    t = sigma_t / (1 + sigma_t)
    z_t = (1 - t) * x + t * kappa
    torch.testing.assert_close(got, (1 - t) * (flow.v(z_t, torch.tensor(t)) - (kappa - x)), **TOL)
    assert (sdi.grad(x, _g(8)) - got).abs().max() > 1e-3


def test_msd_one_call_and_posterior_on_flow_latents(flow):
    x, lam = _x(), 1.0
    s = lam / math.sqrt(2)
    t = s / (1 + s)
    one = MSD(flow.den, lam, sampler="one_call", sigma_max=SMAX, extra_args=flow.cond).grad(x)
    x_s = x / (1 + s)
    torch.testing.assert_close(one, x - (x_s - t * flow.v(x_s, torch.tensor(t))), **TOL)

    msd = MSD(flow.den, lam, sampler="posterior", steps=3, sigma_min=SMIN, sigma_max=SMAX, extra_args=flow.cond)
    got = msd.grad(x, _g(7))
    g, z = _g(7), x.clone()  # the DDPM (reverse-SDE) chain from z = x at sigma = s, written on x_t and v
    sig = [float(v) for v in ds.sigmas_karras(3, SMIN, s)]
    for a, b in zip(sig[:-1], sig[1:]):
        t_a = a / (1 + a)
        z_t = z / (1 + a)
        v = flow.v(z_t, torch.tensor(t_a))
        d, n_hat = z_t - t_a * v, z_t + (1 - t_a) * v
        if b == 0:
            z = d
            continue
        up = b * math.sqrt(a ** 2 - b ** 2) / a
        z = d + math.sqrt(b ** 2 - up ** 2) * n_hat + up * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(got, x - z, **TOL)
    assert (msd.grad(x, _g(8)) - got).abs().max() > 1e-3


def test_msd_kernel_runs_on_flow_latents_seeded(flow):
    """The kernel chain on flow latents: finite, deterministic per seed, another seed differs (its native-form
    reference would restate the kernel flow; the flow-denoiser identity it relies on is tested above)."""
    x = _x()
    msd = MSD(flow.den, 0.5, steps=4, sigma_min=SMIN, sigma_max=SMAX, extra_args=flow.cond)
    a, b, c = msd.grad(x, _g(7)), msd.grad(x, _g(7)), msd.grad(x, _g(8))
    assert torch.isfinite(a).all() and torch.equal(a, b) and (a - c).abs().max() > 1e-3


@pytest.fixture(scope="module")
def sdxl():
    c = X.tiny_sdxl_components()
    g = _g(3)
    cond = dict(encoder_hidden_states=torch.randn(1, 5, 64, generator=g), text_embeds=torch.randn(1, 32, generator=g),
                time_ids=X.time_ids((64, 64), (64, 64)))
    other = {**cond, "encoder_hidden_states": torch.randn(1, 5, 64, generator=g)}
    acp = c.scheduler.alphas_cumprod.double()
    log_sig = (((1 - acp) / acp) ** 0.5).log().numpy()

    @torch.no_grad()
    def eps(z_vp, sigma, cond_):
        t = torch.tensor(np.interp(np.log(sigma.double().numpy()), log_sig, np.arange(len(log_sig))),
                         dtype=torch.float32)
        b = z_vp.shape[0]
        return c.unet(z_vp, t, encoder_hidden_states=cond_["encoder_hidden_states"].expand(b, -1, -1),
                      added_cond_kwargs={"text_embeds": cond_["text_embeds"].expand(b, -1),
                                         "time_ids": cond_["time_ids"].expand(b, -1)}, return_dict=False)[0]
    return X.SDXLDenoiser(c), cond, other, eps


def test_sds_vsd_msd_on_sdxl_latents(sdxl):
    den, cond, other, eps = sdxl
    x = _x()
    sigma, n = _sigma_n(x, 7)
    s = ds.append_dims(sigma, x.ndim)
    z_vp = (x + s * n) / (1 + s ** 2).sqrt()  # = sqrt(abar) x + sqrt(1 - abar) n
    sds = SDS(den, sigma_min=SMIN, sigma_max=SMAX, extra_args=cond)
    got = sds.grad(x, _g(7))
    torch.testing.assert_close(got, eps(z_vp, sigma, cond) - n, **TOL)
    assert (sds.grad(x, _g(8)) - got).abs().max() > 1e-3
    vsd = VSD(den, lambda z, sg: den(z, sg, **other), sigma_min=SMIN, sigma_max=SMAX, extra_args=cond)
    torch.testing.assert_close(vsd.grad(x, _g(7)), eps(z_vp, sigma, cond) - eps(z_vp, sigma, other), **TOL)
    lam = 1.0
    sg = torch.full((2,), lam / math.sqrt(2))
    z = x / (1 + sg[0] ** 2).sqrt()
    x0 = (z - (sg[0] ** 2 / (1 + sg[0] ** 2)).sqrt() * eps(z, sg, cond)) * (1 + sg[0] ** 2).sqrt()
    one = MSD(den, lam, sampler="one_call", sigma_max=SMAX, extra_args=cond).grad(x)
    torch.testing.assert_close(one, x - x0, **TOL)
    sdi = SDI(den, sigma_min=SMIN, sigma_max=SMAX, total_steps=5, n_inversion=2, extra_args=cond)
    a, b = sdi.grad(x, _g(7)), sdi.grad(x, _g(8))
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------ threestudio-style guidance on each family
def _family(family):
    g = _g(5)
    if family == "sdxl":
        c = X.tiny_sdxl_components()
        ids = X.time_ids((64, 64), (64, 64))
        side = lambda: dict(encoder_hidden_states=torch.randn(1, 5, 64, generator=g),  # noqa: E731
                            text_embeds=torch.randn(1, 32, generator=g), time_ids=ids)
    else:
        c = S.tiny_sd3_components() if family == "sd3" else F.tiny_flux_components()
        pooled = 64 if family == "sd3" else 32
        side = lambda: dict(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),  # noqa: E731
                            pooled_projections=torch.randn(1, pooled, generator=g))
    return c, side(), side()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_threestudio_guidance_accepts_each_family(family):
    """DistillationGuidance over the family's denoiser (conditions packed into its one tensor condition): each
    method's gradient equals the distiller's with the family's own conditions and CFG over the negative ones
    (pooled included), same seed; the flow families' sigma range is t / (1 - t) of the step percentages."""
    from integrations.modern_guidance import family_guidance
    c, cond, uncond = _family(family)
    for method in ("sds", "msd", "vsd", "sdi"):
        extra = dict(steps=3) if method == "msd" else dict(n_inversion=2) if method == "sdi" else {}
        guidance, utils = family_guidance(family, c, cond, uncond, method=method, guidance_scale=3.0,
                                          trainer_max_steps=10, **extra)
        latents = _x(1)[:1].clone().requires_grad_(True)
        out = guidance(latents.permute(0, 2, 3, 1), utils, rgb_as_latents=True)
        (g_guid,) = torch.autograd.grad(out["loss_sds"], latents)
        d, packed = guidance.distiller, guidance.distiller.model
        d.model = packed.denoiser  # the family's denoiser with its own keyword conditions
        direct = d.grad(latents.detach(), _g(guidance.last_seed), extra_args=cond,
                        transforms=[ds.cfg(3.0, uncond=uncond, convention="paper")])
        d.model = packed
        torch.testing.assert_close(g_guid, direct, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(direct).all() and direct.abs().max() > 0
    if family != "sdxl":
        t = (guidance.min_step + 1) / 1001
        assert guidance.sigma_of(guidance.min_step) == pytest.approx(t / (1 - t))
        from integrations.modern_guidance import ShiftedVAE
        img = torch.rand(1, 3, 16, 16, generator=_g(2))
        with torch.no_grad():
            torch.testing.assert_close(ShiftedVAE(c.vae).encode(img * 2 - 1).latent_dist.sample(_g(4))
                                       * c.vae.config.scaling_factor, S.encode_images(c.vae, img, _g(4)))
        rgb = guidance(torch.rand(1, 16, 16, 3, generator=_g(3)), utils)  # the RGB path through the VAE
        assert torch.isfinite(rgb["loss_sds"])


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_text_to_2d_steps_on_each_family(family):
    """text2image's loop (CoordinateImage render -> VAE -> guidance loss -> AdamW, update_step each step) on the
    family's guidance: the loss is finite and the image moves; run_text2image itself takes SD components only."""
    from integrations.modern_guidance import family_guidance
    from integrations.text2image import CoordinateImage
    c, cond, uncond = _family(family)
    guidance, utils = family_guidance(family, c, cond, uncond, method="sds", guidance_scale=3.0, trainer_max_steps=3)
    torch.manual_seed(0)
    model = CoordinateImage(16, 10.0, 16, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.render(16, 16).detach()
    for step in range(3):
        guidance.update_step(0, step)
        out = guidance(model.render(16, 16), utils)
        assert torch.isfinite(out["loss_sds"])
        opt.zero_grad()
        out["loss_sds"].backward()
        opt.step()
    assert (model.render(16, 16).detach() - before).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_run_text2image_takes_each_family_and_resumes(family, tmp_path):
    """The text-to-2D runner itself (run folder, checkpoints, outputs) on each family's tiny components: a run
    interrupted after 1 step and resumed equals an uninterrupted one; the family is part of the run's config."""
    from integrations.text2image import T2IConfig, run_text2image
    c, cond, uncond = _family(family)
    cfg = T2IConfig(method="sds", steps=2, resolution=16, fourier_features=8, mlp_width=8, mlp_depth=1,
                    strip_every=1, checkpoint_every=1, guidance_scale=3.0)
    full = run_text2image(c, (cond, uncond), cfg, tmp_path / "full", progress=False, family=family)
    run_text2image(c, (cond, uncond), cfg, tmp_path / "resumed", progress=False, stop_after=1, family=family)
    resumed = run_text2image(c, (cond, uncond), cfg, tmp_path / "resumed", progress=False, family=family)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "full" / "image.png").is_file()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["family"] == family
    with pytest.raises(ValueError, match="family must be one of"):
        run_text2image(c, (cond, uncond), cfg, tmp_path / "bad", progress=False, family="sd4")
