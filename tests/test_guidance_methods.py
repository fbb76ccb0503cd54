"""The guidance methods against their peers: diffusers' guiders (the public set_state / prepare_inputs /
forward(pred_cond, pred_uncond) API of 0.42) on one step to 1e-5 and over a full DDIM loop on diffusers' tiny
random Stable Diffusion UNet to 1e-4; kornia's Laplacian pyramid; and, for CFG++ and the ComfyUI-only methods,
values worked by hand from ComfyUI's or the paper's formula (docs/guidance.md: "formula-checked")."""
import logging
import math

import pytest
import torch

import diffsolve as ds
from diffsolve import guidance as G
from diffsolve import guidance_extra

torch.set_num_threads(1)
dg = pytest.importorskip("diffusers.guiders")
logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)  # "experimental" warning

B = 2


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2
    sigma = torch.rand(shape[0], generator=g, dtype=dtype) + 0.3
    eps_c, eps_u = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    return x, sigma, eps_c, eps_u


def _eps_model(eps_c, eps_u):
    """A denoiser whose noise prediction is eps_c under c = 1 and eps_u under c = 0 (any batch repetition)."""
    def model(z, sigma, c):
        k = z.shape[0] // eps_c.shape[0]
        rep = (k,) + (1,) * (z.ndim - 1)
        e = torch.where(ds.append_dims(c, z.ndim) > 0, eps_c.repeat(rep), eps_u.repeat(rep))
        return z - ds.append_dims(sigma, z.ndim) * e
    return model


def _ours(transform, x, sigma, eps_c, eps_u, steps=1):
    """The transform's eps prediction at (x, sigma) for `steps` consecutive evaluations of one run."""
    den, _ = ds.compose(_eps_model(eps_c, eps_u), [transform], ds.Run(x.shape[0]))
    s = ds.append_dims(sigma, x.ndim)
    return [(x - den(x, sigma, c=torch.ones(x.shape[0], dtype=x.dtype))) / s for _ in range(steps)]


def _theirs(guider, eps_c, eps_u, steps=1, n=10):
    out = []
    for i in range(steps):
        guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999 - 100 * i))
        guider.prepare_inputs({})  # APG builds its momentum buffer here at step 0
        out.append(guider.forward(eps_c, eps_u).pred)
    return out


UNC = {"c": torch.zeros(B, dtype=torch.float64)}

# (name, ours, theirs, shape, dtype, steps)
PEERS = [
    ("cfg_rescale", lambda: G.cfg_rescale(5.0, UNC, guidance_rescale=0.7),
     lambda: dg.ClassifierFreeGuidance(5.0, guidance_rescale=0.7), (B, 4, 8, 8), torch.float64, 1),
    ("cfg_rescale_paper", lambda: G.cfg_rescale(4.0, UNC, guidance_rescale=0.3, convention="paper"),
     lambda: dg.ClassifierFreeGuidance(4.0, guidance_rescale=0.3, use_original_formulation=True),
     (B, 4, 8, 8), torch.float64, 1),
    ("apg", lambda: G.apg(5.0, UNC, momentum=-0.5, norm_threshold=3.0, eta=0.3),
     lambda: dg.AdaptiveProjectedGuidance(5.0, adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=3.0, eta=0.3),
     (B, 4, 8, 8), torch.float64, 3),
    ("apg_paper_rescaled", lambda: G.apg(5.0, UNC, momentum=0.5, eta=0.0, convention="paper", guidance_rescale=0.5),
     lambda: dg.AdaptiveProjectedGuidance(5.0, adaptive_projected_guidance_momentum=0.5,
                                          adaptive_projected_guidance_rescale=0.0, eta=0.0,
                                          use_original_formulation=True, guidance_rescale=0.5),
     (B, 4, 8, 8), torch.float64, 3),
    ("cfg_zero_star", lambda: G.cfg_zero_star(5.0, UNC, zero_init_steps=1),
     lambda: dg.ClassifierFreeZeroStarGuidance(5.0, zero_init_steps=1), (B, 4, 8, 8), torch.float64, 3),
    ("cfg_zero_star_paper", lambda: G.cfg_zero_star(4.0, UNC, convention="paper", guidance_rescale=0.7),
     lambda: dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=0, use_original_formulation=True,
                                               guidance_rescale=0.7), (B, 4, 8, 8), torch.float64, 2),
    # the peer's SVD runs in float32
    ("tangential", lambda: G.tangential_cfg(4.0, UNC), lambda: dg.TangentialClassifierFreeGuidance(4.0),
     (B, 4, 8, 8), torch.float32, 1),
    ("tangential_paper", lambda: G.tangential_cfg(4.0, UNC, convention="paper", guidance_rescale=0.5),
     lambda: dg.TangentialClassifierFreeGuidance(4.0, use_original_formulation=True, guidance_rescale=0.5),
     (B, 4, 8, 8), torch.float32, 1),
    # the peer fails on 4-D tensors (test_magnitude_aware_peer_fails_on_4d_latents)
    ("magnitude_aware_tokens", lambda: G.magnitude_aware(6.0, UNC, alpha=2.0),
     lambda: dg.MagnitudeAwareGuidance(6.0, alpha=2.0), (B, 16, 4), torch.float64, 1),
    ("magnitude_aware_flat_paper", lambda: G.magnitude_aware(6.0, UNC, alpha=0.5, convention="paper"),
     lambda: dg.MagnitudeAwareGuidance(6.0, alpha=0.5, use_original_formulation=True), (B, 32), torch.float64, 1),
    ("frequency_decoupled", lambda: G.frequency_decoupled([7.0, 3.0], UNC),
     lambda: dg.FrequencyDecoupledGuidance([7.0, 3.0]), (B, 4, 16, 16), torch.float64, 1),
    ("frequency_decoupled_3", lambda: G.frequency_decoupled([7.0, 2.0, 3.0], UNC, parallel_weights=[0.5, 1.0, 0.2],
                                                             guidance_rescale=[0.3, 0.5, 0.7],
                                                             guidance_rescale_space="freq"),
     lambda: dg.FrequencyDecoupledGuidance([7.0, 2.0, 3.0], parallel_weights=[0.5, 1.0, 0.2],
                                           guidance_rescale=[0.3, 0.5, 0.7], guidance_rescale_space="freq"),
     (B, 4, 16, 16), torch.float64, 1),
    ("frequency_decoupled_data_rescale", lambda: G.frequency_decoupled([7.0, 3.0], UNC, guidance_rescale=0.6),
     lambda: dg.FrequencyDecoupledGuidance([7.0, 3.0], guidance_rescale=0.6), (B, 4, 8, 8), torch.float64, 1),
]


@pytest.mark.parametrize("name, ours, theirs, shape, dtype, steps", PEERS, ids=[p[0] for p in PEERS])
def test_one_step_equals_the_diffusers_guider(name, ours, theirs, shape, dtype, steps):
    x, sigma, eps_c, eps_u = _inputs(shape, dtype)
    unc = {"c": torch.zeros(B, dtype=dtype)}
    t = ours()
    t.uncond = unc
    a, b = _ours(t, x, sigma, eps_c, eps_u, steps), _theirs(theirs(), eps_c, eps_u, steps)
    for i, (p, q) in enumerate(zip(a, b)):
        assert (p - q).abs().max().item() < 1e-5, (name, i, (p - q).abs().max().item())
    # negative control: plain CFG at the same scale is another prediction
    cfg = _ours(ds.cfg(t.scale if hasattr(t, "scale") else 7.0, unc), x, sigma, eps_c, eps_u)[0]
    assert (cfg - b[0]).abs().max().item() > 1e-3


def test_spaces_round_trip_and_v_is_the_vp_velocity():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (diffusers' get_velocity) with abar = 1 / (1 + sigma**2)."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler()
    t = torch.tensor([100, 700])
    abar = sched.alphas_cumprod.double()[t]
    sigma = ((1 - abar) / abar).sqrt()
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = x0 + ds.append_dims(sigma, 4) * eps
    v = G.to_space(x0, x, sigma, "v")
    ref = sched.get_velocity(x0, eps, t)
    assert (v - ref).abs().max() < 1e-6  # diffusers' alphas in float32
    assert (G.to_space(x0, x, sigma, "eps") - eps).abs().max() < 1e-12
    for space in G.SPACES:
        assert (G.from_space(G.to_space(x0, x, sigma, space), x, sigma, space) - x0).abs().max() < 1e-12
    with pytest.raises(ValueError, match="sigma"):
        G.to_space(x0, x, torch.tensor([0.0, 1.0], dtype=torch.float64), "eps")


def test_the_space_changes_a_nonlinear_method_but_not_cfg():
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    outs = {s: _ours(G.apg(5.0, UNC, norm_threshold=1.0, eta=0.2, space=s), x, sigma, eps_c, eps_u)[0]
            for s in G.SPACES}
    assert min((outs["eps"] - outs["x0"]).abs().max(), (outs["eps"] - outs["v"]).abs().max()) > 1e-2
    lin = {s: _ours(G.cfg_rescale(5.0, UNC, guidance_rescale=0.0, space=s), x, sigma, eps_c, eps_u)[0]
           for s in G.SPACES}
    assert max((lin["eps"] - lin["x0"]).abs().max(), (lin["eps"] - lin["v"]).abs().max()) < 1e-12


def test_laplacian_pyramid_equals_kornia_and_inverts():
    kornia = pytest.importorskip("kornia")
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    ours = G.laplacian_pyramid(x, 3)
    theirs = kornia.geometry.transform.build_laplacian_pyramid(x, 3)
    assert len(ours) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12
    up = kornia.geometry.pyrup(ours[-1])
    assert (guidance_extra._up(ours[-1]) - up).abs().max() < 1e-12
    assert (G.pyramid_image(ours) - x).abs().max() < 1e-12
    with pytest.raises(ValueError, match="divisible by 4"):
        G.laplacian_pyramid(torch.randn(1, 1, 10, 12), 3)


def test_magnitude_aware_peer_fails_on_4d_latents():
    """diffusers 0.42.1's mambo_guidance takes torch.norm over three dims, which torch reads as a matrix norm
    (docs/guidance.md); ours runs on the latents' shape."""
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        _theirs(dg.MagnitudeAwareGuidance(6.0, alpha=2.0), eps_c, eps_u)
    out = _ours(G.magnitude_aware(6.0, UNC, alpha=2.0), x, sigma, eps_c, eps_u)[0]
    # by hand: the scale 1 + 5 exp(-2 r), r = |c - u| / |u| per row
    r = (eps_c - eps_u).flatten(1).norm(dim=1) / eps_u.flatten(1).norm(dim=1)
    s = ds.append_dims(1 + 5 * torch.exp(-2 * r), 4)
    assert (out - (eps_u + s * (eps_c - eps_u))).abs().max() < 1e-12


def test_frequency_decoupled_peer_misassembles_a_neutral_middle_level():
    """diffusers 0.42.1 appends the previous level's band for a level whose scale is 1 (a stale loop variable),
    so the pyramid no longer rebuilds; ours keeps that level's conditional band."""
    x, sigma, eps_c, eps_u = _inputs((B, 4, 16, 16))
    with pytest.raises(RuntimeError, match="size of tensor"):
        _theirs(dg.FrequencyDecoupledGuidance([7.0, 1.0, 3.0]), eps_c, eps_u)
    out = _ours(G.frequency_decoupled([7.0, 1.0, 3.0], UNC), x, sigma, eps_c, eps_u)[0]
    pc, pu = G.laplacian_pyramid(eps_c, 3), G.laplacian_pyramid(eps_u, 3)
    want = G.pyramid_image([pu[0] + 7 * (pc[0] - pu[0]), pc[1], pu[2] + 3 * (pc[2] - pu[2])])
    assert (out - want).abs().max() < 1e-12


def test_frequency_decoupled_with_equal_scales_is_cfg():
    x, sigma, eps_c, eps_u = _inputs((B, 4, 16, 16))
    out = _ours(G.frequency_decoupled([4.0, 4.0, 4.0], UNC), x, sigma, eps_c, eps_u)[0]
    assert (out - (eps_u + 4 * (eps_c - eps_u))).abs().max() < 1e-12


# full DDIM loops on the tiny Stable Diffusion UNet ------------------------------------------------------------
N_STEPS = 6


@pytest.fixture(scope="module")
def sd():
    from diffsolve.integrations.diffusers import tiny_sd_components
    c = tiny_sd_components()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B, 4, 8, 8, generator=g)
    pos, neg = torch.randn(B, 77, 8, generator=g), torch.randn(B, 77, 8, generator=g)
    return c.unet, c.scheduler, latents, pos, neg


@torch.no_grad()
def _diffusers_loop(unet, sched, latents, pos, neg, guider, n=N_STEPS):
    sched.set_timesteps(n)
    for i, t in enumerate(sched.timesteps):
        guider.set_state(step=i, num_inference_steps=n, timestep=t)
        guider.prepare_inputs({})
        eps_u, eps_c = unet(torch.cat([latents, latents]), t,
                            encoder_hidden_states=torch.cat([neg, pos])).sample.chunk(2)
        latents = sched.step(guider.forward(eps_c, eps_u).pred, t, latents).prev_sample
    return latents


@torch.no_grad()
def _ours_loop(unet, sched, latents, pos, transforms, n=N_STEPS):
    from diffsolve.integrations.diffusers import denoiser_from_unet, from_ve, sigmas_from_scheduler, to_ve
    sigmas = sigmas_from_scheduler(sched, n)[0]
    x = ds.sample_ddim(denoiser_from_unet(unet, sched), to_ve(latents, sigmas[0]), sigmas,
                       extra_args={"encoder_hidden_states": pos}, transforms=transforms, disable=True)
    return from_ve(x, sigmas[-1])


LOOPS = [
    ("cfg_rescale", lambda u: G.cfg_rescale(6.0, u, guidance_rescale=0.7),
     lambda: dg.ClassifierFreeGuidance(6.0, guidance_rescale=0.7)),
    ("apg", lambda u: G.apg(6.0, u, momentum=-0.5, norm_threshold=20.0, eta=0.5),
     lambda: dg.AdaptiveProjectedGuidance(6.0, adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=20.0, eta=0.5)),
    ("cfg_zero_star", lambda u: G.cfg_zero_star(6.0, u, zero_init_steps=1),
     lambda: dg.ClassifierFreeZeroStarGuidance(6.0, zero_init_steps=1)),
    ("tangential", lambda u: G.tangential_cfg(6.0, u), lambda: dg.TangentialClassifierFreeGuidance(6.0)),
    ("frequency_decoupled", lambda u: G.frequency_decoupled([8.0, 3.0], u, parallel_weights=0.5),
     lambda: dg.FrequencyDecoupledGuidance([8.0, 3.0], parallel_weights=0.5)),
]


@pytest.mark.parametrize("name, ours, theirs", LOOPS, ids=[p[0] for p in LOOPS])
def test_full_ddim_loop_equals_diffusers_on_a_tiny_unet(sd, name, ours, theirs):
    unet, sched, latents, pos, neg = sd
    u = {"encoder_hidden_states": neg}
    ref = _diffusers_loop(unet, sched, latents, pos, neg, theirs())
    out = _ours_loop(unet, sched, latents, pos, [ours(u)])
    err = (out - ref).abs().max().item()
    assert err < 1e-4, (name, err)
    plain = _ours_loop(unet, sched, latents, pos, [ds.cfg(6.0, u)])
    assert (plain - ref).abs().max().item() > 1e-3  # the method changes the chain


def test_dynamic_thresholding_loop_equals_diffusers_ddim_with_thresholding(sd):
    unet, sched, latents, pos, neg = sd
    from diffsolve.integrations.diffusers import tiny_sd_scheduler
    thr = tiny_sd_scheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    ref = _diffusers_loop(unet, thr, latents, pos, neg, dg.ClassifierFreeGuidance(5.0))
    u = {"encoder_hidden_states": neg}
    out = _ours_loop(unet, thr, latents, pos, [ds.cfg(5.0, u), G.dynamic_thresholding(0.9, 1.5, keep_noise=True)])
    assert (out - ref).abs().max().item() < 1e-4, (out - ref).abs().max().item()
    # renoising with the thresholded prediction is another chain; so is no thresholding
    other = _ours_loop(unet, thr, latents, pos, [ds.cfg(5.0, u), G.dynamic_thresholding(0.9, 1.5)])
    plain = _ours_loop(unet, thr, latents, pos, [ds.cfg(5.0, u)])
    assert min((other - ref).abs().max().item(), (plain - ref).abs().max().item()) > 1e-3


def test_dynamic_thresholding_equals_diffusers_threshold_sample():
    from diffsolve.integrations.diffusers import tiny_sd_scheduler
    sched = tiny_sd_scheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)
    d = 3 * torch.randn(3, 4, 8, 8, dtype=torch.float64)
    ours = G.dynamic_thresholding(0.8, 2.0).threshold(d)
    assert (ours - sched._threshold_sample(d.clone())).abs().max() < 1e-12
    assert (ours - d).abs().max() > 0.5


# formula checks: CFG++ ----------------------------------------------------------------------------------------
def _gauss(x, sigma, c):
    """A Gaussian posterior mean around c (per row)."""
    s = ds.append_dims(ds.sigma_rows(sigma, x), x.ndim)
    mu = ds.append_dims(c, x.ndim) * torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return mu + 0.6 / (0.6 + s * s) * (x - mu)


C1, C0 = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
CFGPP_SIGMAS = [float(s) for s in ds.sigmas_karras(5, 0.1, 6.0)]


def _cfgpp_hand(solver, x, lam, noises):
    """CFG++ written out: D_g = D_u + lam (D_c - D_u); each first-order update D_g + (sigma_to / sigma)(x - D_u).
    euler / ddim / euler_ancestral: ComfyUI's sample_euler(_ancestral)_cfg_pp (comfy/k_diffusion/sampling.py,
    commit 02159d81): x' = D_g + sigma_down (x - D_u) / sigma + sigma_up n. dpmpp_2m: the plain 2M step
    (sigma'/sigma) x - expm1(-h) D_hat plus (sigma'/sigma)(D_g - D_u). dpmpp_2s_ancestral: both sub-updates so."""
    sig = CFGPP_SIGMAS
    noises = iter(noises)

    def both(z, s):
        s = torch.full((z.shape[0],), s, dtype=torch.float64)  # a float64 tensor, as the loop passes it
        du, dc = _gauss(z, s, C0), _gauss(z, s, C1)
        return du + lam * (dc - du), du

    prev = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        eta = {"euler": 0.0, "ddim": 0.0, "euler_ancestral": 1.0, "dpmpp_2m": 0.0, "dpmpp_2s_ancestral": 1.0}[solver]
        down, up = ds.ancestral_step(s, sn, eta)
        dg_, du = both(x, s)
        if solver == "dpmpp_2m":
            if sn == 0:
                x = dg_
                continue
            h = math.log(s / sn)
            d_hat = dg_
            if prev is not None:
                r = math.log(prev[0] / s) / h
                d_hat = (1 + 1 / (2 * r)) * dg_ - prev[1] / (2 * r)
            x = (sn / s) * x - math.expm1(-h) * d_hat + (sn / s) * (dg_ - du)
            prev = (s, dg_)
            continue
        if solver == "dpmpp_2s_ancestral" and down > 0:
            mid = math.sqrt(s * down)
            d2, du2 = both(dg_ + (mid / s) * (x - du), mid)
            x = d2 + (down / s) * (x - du2)
        else:
            x = dg_ + (down / s) * (x - du)
        if up > 0:
            x = x + up * next(noises)
    return x


@pytest.mark.parametrize("solver", ["euler", "ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_cfg_pp_equals_its_formula(solver, lam):
    g = torch.Generator().manual_seed(2)
    x = 6 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(len(CFGPP_SIGMAS))]
    it = iter(noises)
    out = ds.sample(ds.get_solver(solver), _gauss, x, torch.tensor(CFGPP_SIGMAS, dtype=torch.float64),
                    extra_args={"c": C1}, transforms=[G.cfg_pp(lam, {"c": C0})],
                    noise_sampler=lambda a, b: next(it))
    want = _cfgpp_hand(solver, x, lam, noises)
    assert (out - want).abs().max() < 1e-12, (out - want).abs().max()
    it = iter(noises)
    cfg = ds.sample(ds.get_solver(solver), _gauss, x, torch.tensor(CFGPP_SIGMAS, dtype=torch.float64),
                    extra_args={"c": C1}, transforms=[ds.cfg(lam, {"c": C0})], noise_sampler=lambda a, b: next(it))
    assert (cfg - want).abs().max() > 1e-3  # CFG at the same scale renoises with D_g


def test_cfg_pp_is_refused_by_solvers_that_do_not_split():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for name in ("heun", "dpm_2", "lms", "uni_pc", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match="CFG\\+\\+"):
            ds.sample(ds.get_solver(name), _gauss, x, ds.sigmas_karras(3, 0.1, 2.0), extra_args={"c": C1},
                      transforms=[G.cfg_pp(0.5, {"c": C0})])


# formula checks: ComfyUI-only methods -------------------------------------------------------------------------
def _preds(shape=(1, 4, 4, 4), k=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]


def _table_model(table):
    """A denoiser returning table[c] (c an integer code per row) whatever x and sigma."""
    def model(x, sigma, c):
        rep = x.shape[0] // table[0].shape[0]
        rows = [table[int(v)][i % table[0].shape[0]] for i, v in enumerate(c.tolist())]
        assert rep >= 1
        return torch.stack(rows)
    return model


def _apply(transform, table, batch):
    x = torch.zeros((batch,) + table[0].shape[1:], dtype=torch.float64)
    den, _ = ds.compose(_table_model(table), [transform], ds.Run(batch))
    return den(x, torch.full((batch,), 1.5, dtype=torch.float64), c=torch.full((batch,), 2.0, dtype=torch.float64))


def test_perp_neg_equals_comfyui_formula():
    """comfy_extras/nodes_perpneg.py (commit 041b8824) perp_neg: pos = c - e, neg = n - e,
    perp = neg - (<neg, pos> / |pos|**2) pos, e + s (pos - neg_scale perp); batch 1 (ComfyUI sums over the batch)."""
    e, n, c = _preds()
    code = {"c": torch.zeros(1, dtype=torch.float64)}
    t = G.perp_neg(7.0, {"c": torch.ones(1, dtype=torch.float64)}, code, neg_scale=1.3)
    out = _apply(t, [e, n, c], 1)
    pos, neg = c - e, n - e
    perp = neg - ((neg * pos).sum() / pos.norm() ** 2) * pos
    want = e + 7.0 * (pos - 1.3 * perp)
    assert (out - want).abs().max() < 1e-12
    assert (out - (e + 7.0 * pos)).abs().max() > 1e-2  # the negative acts
    # two rows: each row is its own projection (ComfyUI's whole-batch sum would couple them)
    e2, n2, c2 = _preds((2, 4, 4, 4), seed=5)
    two = _apply(G.perp_neg(7.0, {"c": torch.ones(2, dtype=torch.float64)},
                            {"c": torch.zeros(2, dtype=torch.float64)}, neg_scale=1.3), [e2, n2, c2], 2)
    for i in range(2):
        one = _apply(t, [e2[i:i + 1], n2[i:i + 1], c2[i:i + 1]], 1)
        assert (two[i:i + 1] - one).abs().max() < 1e-12


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_dual_cfg_equals_comfyui_formula(style):
    """comfy_extras/nodes_custom_sampler.py (commit 065c1df0) Guider_DualCFG.predict_noise: regular
    n + cfg2 (m - n) + cfg1 (p - m); nested n + cfg2 (m + cfg1 (p - m) - n)."""
    n, m, p = _preds()
    t = G.dual_cfg(3.0, 5.0, {"c": torch.ones(1, dtype=torch.float64)}, {"c": torch.zeros(1, dtype=torch.float64)},
                   style=style)
    out = _apply(t, [n, m, p], 1)
    want = n + 5.0 * (m - n) + 3.0 * (p - m) if style == "regular" else n + 5.0 * (m + 3.0 * (p - m) - n)
    assert (out - want).abs().max() < 1e-12
    other = n + 5.0 * (m - n) + 3.0 * (p - m) if style == "nested" else n + 5.0 * (m + 3.0 * (p - m) - n)
    assert (out - other).abs().max() > 1e-2


def test_cfg_norm_equals_comfyui_formula():
    """comfy_extras/nodes_cfg.py (commit 95e81991) CFGNorm: g * clamp(|c|_1 / (|g|_1 + 1e-8), 0, 1) * strength,
    norms over dim 1, on the denoised (x0) predictions."""
    u, c = _preds(k=2)
    t = G.cfg_norm(6.0, {"c": torch.zeros(1, dtype=torch.float64)}, strength=0.9)
    out = _apply(t, [u, None, c], 1)
    g = u + 6.0 * (c - u)
    want = g * (c.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1) * 0.9
    assert (out - want).abs().max() < 1e-12
    assert (out - g).abs().max() > 1e-2


def test_rescale_in_v_space_equals_comfyui_rescale_cfg():
    """comfy_extras/nodes_model_advanced.py RescaleCFG: cond / uncond to v through x / (sigma**2 + 1), CFG, std
    rescale over dims (1, 2, 3), mix by multiplier, back to the denoised prediction."""
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    s = ds.append_dims(sigma, 4)
    dc, du = x - s * eps_c, x - s * eps_u
    t = G.cfg_rescale(5.0, UNC, guidance_rescale=0.7, space="v")
    den, _ = ds.compose(_eps_model(eps_c, eps_u), [t], ds.Run(B))
    out = den(x, sigma, c=torch.ones(B, dtype=torch.float64))
    xs = x / (s * s + 1.0)
    cond, uncond = x - dc, x - du  # ComfyUI's args["cond"] / ["uncond"] are x - D
    vc = (xs - (x - cond)) * (s ** 2 + 1.0) ** 0.5 / s
    vu = (xs - (x - uncond)) * (s ** 2 + 1.0) ** 0.5 / s
    v = vu + 5.0 * (vc - vu)
    ro_pos, ro_cfg = vc.std(dim=(1, 2, 3), keepdim=True), v.std(dim=(1, 2, 3), keepdim=True)
    v = 0.7 * (v * (ro_pos / ro_cfg)) + 0.3 * v
    # ComfyUI returns x_orig - (x - x_final sigma / sqrt(sigma**2 + 1)), x = x_orig / (sigma**2 + 1), as
    # x_orig - denoised: the denoised prediction is x - x_final sigma / sqrt(sigma**2 + 1)
    want = xs - v * s / (s * s + 1.0) ** 0.5
    assert (out - want).abs().max() < 1e-12
    eps_space = den  # the same method in eps space (diffusers') is another prediction
    other, _ = ds.compose(_eps_model(eps_c, eps_u), [G.cfg_rescale(5.0, UNC, guidance_rescale=0.7)], ds.Run(B))
    assert (other(x, sigma, c=torch.ones(B, dtype=torch.float64)) - eps_space(x, sigma, c=torch.ones(
        B, dtype=torch.float64))).abs().max() > 1e-3


def test_apg_in_x0_paper_convention_equals_comfyui_apg():
    """comfy_extras/nodes_apg.py (commit 0c98ae69): on the denoised predictions, running = momentum running +
    (c - u), clipped to norm_threshold, orthogonal + eta parallel (to c); the node's pre-CFG rewrite makes the
    result c + s * update, our convention="paper" with w = s."""
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    s4 = ds.append_dims(sigma, 4)
    dc, du = x - s4 * eps_c, x - s4 * eps_u
    t = G.apg(4.0, UNC, momentum=0.6, norm_threshold=5.0, eta=0.4, space="x0", convention="paper")
    den, _ = ds.compose(_eps_model(eps_c, eps_u), [t], ds.Run(B))
    running = None
    for _ in range(3):
        out = den(x, sigma, c=torch.ones(B, dtype=torch.float64))
        guidance = dc - du
        running = guidance if running is None else 0.6 * running + guidance
        guidance = running
        norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        guidance = guidance * torch.minimum(torch.ones_like(norm), 5.0 / norm)
        v1 = torch.nn.functional.normalize(dc, dim=[-1, -2, -3])
        par = (guidance * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
        mod = (guidance - par) + 0.4 * par
        modified_cond = (du + mod) + (dc - du) / 4.0
        want = du + 4.0 * (modified_cond - du)
        assert (out - want).abs().max() < 1e-10


# validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, match", [
    (lambda: G.cfg_rescale(5.0, UNC, guidance_rescale=1.5), "guidance_rescale"),
    (lambda: G.cfg_rescale(float("nan"), UNC), "guidance scale"),
    (lambda: G.cfg_rescale(5.0, UNC, space="z"), "space"),
    (lambda: G.cfg_rescale(5.0, UNC, convention="comfy"), "convention"),
    (lambda: G.cfg_rescale(5.0), "exactly one"),
    (lambda: G.cfg_rescale(5.0, [1.0]), "dict"),
    (lambda: G.apg(5.0, guide=3.0), "guide"),
    (lambda: G.apg(5.0, UNC, momentum=2.0), "momentum"),
    (lambda: G.apg(5.0, UNC, norm_threshold=-1.0), "norm_threshold"),
    (lambda: G.apg(5.0, UNC, eta=float("inf")), "eta"),
    (lambda: G.cfg_zero_star(5.0, UNC, zero_init_steps=-1), "zero_init_steps"),
    (lambda: G.cfg_zero_star(5.0, UNC, zero_init_steps=1.5), "zero_init_steps"),
    (lambda: G.magnitude_aware(5.0, UNC, alpha=-1.0), "alpha"),
    (lambda: G.frequency_decoupled([], UNC), "at least one"),
    (lambda: G.frequency_decoupled([5.0, 2.0], UNC, parallel_weights=[1.0]), "parallel_weights"),
    (lambda: G.frequency_decoupled([5.0, 2.0], UNC, guidance_rescale_space="pixel"), "guidance_rescale_space"),
    (lambda: G.frequency_decoupled([5.0, 2.0], UNC, guidance_rescale=[0.5, 2.0]), "guidance_rescale"),
    (lambda: G.perp_neg(5.0, [1.0], UNC), "dicts"),
    (lambda: G.dual_cfg(5.0, 2.0, UNC, UNC, style="stacked"), "style"),
    (lambda: G.cfg_norm(5.0, UNC, strength=-0.1), "strength"),
    (lambda: G.dynamic_thresholding(1.5), "dynamic_thresholding_ratio"),
    (lambda: G.dynamic_thresholding(0.9, 0.5), "sample_max_value"),
    (lambda: G.cfg_pp(float("nan"), UNC), "CFG\\+\\+ scale"),
])
def test_bad_parameters_are_refused_before_work(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_exported_from_the_package():
    for name in ("apg", "cfg_pp", "cfg_rescale", "cfg_zero_star", "tangential_cfg", "magnitude_aware",
                 "frequency_decoupled", "perp_neg", "dual_cfg", "cfg_norm", "dynamic_thresholding"):
        assert getattr(ds, name) is getattr(G, name)


def test_cfg_zero_star_rescale_stays_finite_where_the_peer_gives_nan():
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    peer = _theirs(dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=1, guidance_rescale=0.7), eps_c, eps_u)[0]
    assert torch.isnan(peer).all()
    ours = _ours(G.cfg_zero_star(4.0, UNC, zero_init_steps=1, guidance_rescale=0.7), x, sigma, eps_c, eps_u)[0]
    assert torch.equal(ours, torch.zeros_like(ours))


def test_guidance_doc_examples_run():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "guidance.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace = {"__name__": "__doc_example__"}
    for block in blocks:
        exec(compile(block, "docs/guidance.md", "exec"), namespace)


@pytest.mark.parametrize("build", [lambda: G.apg(5.0, UNC, eta=0.5), lambda: G.tangential_cfg(3.0, UNC),
                                   lambda: G.cfg_pp(0.5, UNC)])
def test_every_guided_evaluation_records_its_unconditional_prediction(build):
    """Run.uncond holds the latest evaluation's unconditional prediction (what renoising steps read)."""
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    run = ds.Run(B)
    den, _ = ds.compose(_eps_model(eps_c, eps_u), [build()], run)
    den(x, sigma, c=torch.ones(B, dtype=torch.float64))
    assert (run.uncond - (x - ds.append_dims(sigma, 4) * eps_u)).abs().max() < 1e-12


@pytest.mark.parametrize("build", [lambda **kw: G.apg(5.0, momentum=0.3, norm_threshold=2.0, **kw),
                                   lambda **kw: G.tangential_cfg(4.0, **kw)])
def test_batched_unbatched_and_guide_model_agree(build):
    x, sigma, eps_c, eps_u = _inputs((B, 4, 8, 8))
    base = _eps_model(eps_c, eps_u)
    outs = [_ours(build(uncond=UNC), x, sigma, eps_c, eps_u, steps=2),
            _ours(build(uncond=UNC, batched=False), x, sigma, eps_c, eps_u, steps=2),
            _ours(build(guide=lambda z, s, **c: base(z, s, **{**c, **UNC})), x, sigma, eps_c, eps_u, steps=2)]
    for other in outs[1:]:
        for p, q in zip(outs[0], other):
            assert (p - q).abs().max() < 1e-12
