"""`DistillationGuidance(parity="threestudio")`: returned keys and loss values against values worked by hand on an
analytic epsilon model, with the same timestep and noise (redrawn from the guidance's recorded seed in the documented
order: one float64 uniform per row for t, then the float32 normal noise).

The model: latents of prompt y are N(m_y, s^2 I) with channel c of m_y = the embedding's [c, 0] entry, so in VP coordinates
(x_t = sqrt(abar) x0 + sqrt(1 - abar) n) channel-wise, the ideal epsilon prediction is
eps(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar). Each hand value follows the threestudio file
and lines named in its test (threestudio-project/threestudio, stored versions)."""
from types import SimpleNamespace

import pytest
import torch

from diffsolve.distill import ISM, MSD
from diffsolve.integrations.threestudio import DistillationGuidance

torch.set_num_threads(1)
S2 = 0.25
B = 2


def sd_abar(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


SCHED = SimpleNamespace(alphas_cumprod=sd_abar().float())


class GaussianText(torch.nn.Module):
    """The VE denoiser of the Gaussian: D(z; sigma) = m + s^2 / (s^2 + sigma^2) (z - m), m from the embedding
    (channel c's mean is the embedding's [c, 0] entry)."""

    def forward(self, z, sigma, encoder_hidden_states=None):
        m = encoder_hidden_states[:, :4, 0].reshape(-1, 4, 1, 1).to(z.dtype)  # one mean per latent channel
        sig = torch.as_tensor(sigma, dtype=z.dtype).reshape(-1, 1, 1, 1)
        return m + S2 / (S2 + sig ** 2) * (z - m)


def eps_vp(x_t, abar, m):
    """The ideal epsilon of N(m, s^2) data at VP point x_t (independent of the VE denoiser above)."""
    a = abar.reshape(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x_t - a.sqrt() * m) / (a * S2 + 1 - a)


class Prompts:
    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond


COND, UNCOND = torch.full((1, 4, 3), 0.7), torch.full((1, 4, 3), -0.2)
NEGS = ((0.3, -0.1, 0.5, 0.0), (-0.9, 0.4, 0.2, -0.3))  # the two negatives' per-channel means


class PerpPrompts(Prompts):
    """threestudio's perp-neg prompt output: [text B, uncond B, negatives 2B interleaved], weights [B, 2]."""

    use_perp_neg = True

    def get_text_embeddings_perp_neg(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
        B = elevation.shape[0]
        negs = torch.tensor(NEGS)[:, :, None].expand(2, 4, 3)  # [2, 4, 3]
        inter = negs.repeat(B, 1, 1)  # row b's negatives at 2b, 2b + 1
        self.weights = torch.tensor([[-2.0, -0.5], [-1.0, -3.0]])[:B]
        return torch.cat([self.cond.expand(B, -1, -1), self.uncond.expand(B, -1, -1), inter]), self.weights
M_C, M_U = 0.7, -0.2


def guidance(method, **kw):
    g = DistillationGuidance(denoiser=GaussianText(), scheduler=SCHED, method=method, parity="threestudio",
                             seed=9, latent_size=8, trainer_max_steps=100, **kw)
    g.update_step(0, 10)
    return g


def latents():
    return torch.randn(B, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)


def redraw(g, shape):
    gen = torch.Generator().manual_seed(g.last_seed)
    u = torch.rand(shape[0], generator=gen, dtype=torch.float64)
    t = (g.min_step + torch.floor(u * (g.max_step - g.min_step + 1))).long()
    return t, torch.randn(shape, generator=gen)


def _check_sum_loss(out, key, x, grad, atol=1e-7):
    """threestudio: loss = 0.5 * mse(latents, (latents - grad).detach(), "sum") / B; d loss / d latents = grad / B."""
    torch.testing.assert_close(out[key], 0.5 * (grad ** 2).sum() / B, rtol=1e-5, atol=atol)
    out[key].backward()
    torch.testing.assert_close(x.grad, grad.permute(0, 2, 3, 1) / B, rtol=1e-5, atol=atol)
    torch.testing.assert_close(out["grad_norm"], grad.norm(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_sds_keys_and_loss(weighting):
    """stable_diffusion_guidance.py: t = randint(min_step, max_step + 1); noise_pred = text + w (text - uncond);
    w(t) per weighting_strategy (`compute_grad_sds`); grad = w (noise_pred - noise); loss_sds (`__call__`)."""
    g, x = guidance("sds", guidance_scale=7.5, weighting=weighting), latents()
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {"loss_sds", "grad_norm", "min_step", "max_step"}
    t, n = redraw(g, (B, 4, 8, 8))
    assert torch.equal(g.last_t.cpu(), t)
    a = sd_abar()[t].float()
    x0 = x.detach().permute(0, 3, 1, 2)
    x_t = a.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - a).sqrt().reshape(-1, 1, 1, 1) * n
    e_c, e_u = eps_vp(x_t, a, M_C), eps_vp(x_t, a, M_U)
    w = {"sds": 1 - a, "uniform": torch.ones_like(a), "fantasia3d": a.sqrt() * (1 - a)}[weighting].reshape(-1, 1, 1, 1)
    _check_sum_loss(out, "loss_sds", x, w * (e_c + 7.5 * (e_c - e_u) - n))


def test_sjc_keys_and_loss():
    """stable_diffusion_guidance.py `compute_grad_sjc`: sigma = us[t]; zs = y + sigma n; the UNet sees
    zs / sqrt(1 + sigma^2); Ds = zs - sigma noise_pred; var_red: grad = -(Ds - y) / sigma; key loss_sds."""
    g, x = guidance("sjc", guidance_scale=7.5), latents()
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {"loss_sds", "grad_norm", "min_step", "max_step"}
    t, n = redraw(g, (B, 4, 8, 8))
    a = sd_abar()[t].float()
    sigma = ((1 - a) / a).sqrt().reshape(-1, 1, 1, 1)
    y = x.detach().permute(0, 3, 1, 2)
    zs = y + sigma * n
    scaled = zs / (1 + sigma ** 2).sqrt()
    e_c, e_u = eps_vp(scaled, a, M_C), eps_vp(scaled, a, M_U)
    ds = zs - sigma * (e_c + 7.5 * (e_c - e_u))
    _check_sum_loss(out, "loss_sds", x, -(ds - y) / sigma)


def test_csd_keys_and_loss():
    """Classifier score distillation, paper eq. 7 with threestudio's sampling: grad = (1 - abar) s (eps_c - eps_u)."""
    g, x = guidance("csd", guidance_scale=7.5), latents()
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {"loss_csd", "grad_norm", "min_step", "max_step"}
    t, n = redraw(g, (B, 4, 8, 8))
    a = sd_abar()[t].float()
    x0 = x.detach().permute(0, 3, 1, 2)
    x_t = a.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - a).sqrt().reshape(-1, 1, 1, 1) * n
    grad = (1 - a).reshape(-1, 1, 1, 1) * 7.5 * (eps_vp(x_t, a, M_C) - eps_vp(x_t, a, M_U))
    _check_sum_loss(out, "loss_csd", x, grad)


def test_vsd_keys_and_loss_without_lora():
    """stable_diffusion_vsd_guidance.py `compute_grad_vsd`: pretrained CFG in the diffusers form
    uncond + s (text - uncond); grad = (1 - abar) (noise_pred_pretrain - noise_pred_est); with no UNet to
    adapt, the variational model is the frozen text-conditioned one and loss_lora is 0."""
    g, x = guidance("vsd", guidance_scale=7.5), latents()
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {"loss_vsd", "loss_lora", "grad_norm", "min_step", "max_step"}
    assert float(out["loss_lora"]) == 0.0
    t, n = redraw(g, (B, 4, 8, 8))
    a = sd_abar()[t].float()
    x0 = x.detach().permute(0, 3, 1, 2)
    x_t = a.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - a).sqrt().reshape(-1, 1, 1, 1) * n
    e_c, e_u = eps_vp(x_t, a, M_C), eps_vp(x_t, a, M_U)
    _check_sum_loss(out, "loss_vsd", x, (1 - a).reshape(-1, 1, 1, 1) * (e_u + 7.5 * (e_c - e_u) - e_c))


def test_sdi_loss_form_and_annealed_timestep():
    """stable_diffusion_sdi_guidance.py: t annealed (`update_step`, t_anneal): percent = (max - min) (1 - k / K) + min,
    min_step = max_step = int(T percent); loss_sdi = 0.5 mse(latents, x0_target, "mean") / B, grad_norm =
    |latents - target|, where the target is the x0 estimate of the noisy latents (`get_x0`). The noisy latents
    come from diffsolve's SDI inversion (not threestudio's DDIM inverse scheduler), so the target is checked as
    the VP x0 estimate at the distiller's own noisy point."""
    g, x = guidance("sdi", guidance_scale=7.5, n_inversion=2), latents()
    frac = (0.98 - 0.02) * (1 - 10 / 100) + 0.02
    assert g.min_step == g.max_step == int(1000 * frac)
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {"loss_sdi", "grad_norm", "min_step", "max_step"}
    core = g.distiller.grad(x.detach().permute(0, 3, 1, 2), torch.Generator().manual_seed(g.last_seed),
                            **g.call_conditions(COND.expand(B, -1, -1), UNCOND.expand(B, -1, -1)))
    x0 = x.detach().permute(0, 3, 1, 2)
    target = x0 - core
    torch.testing.assert_close(out["loss_sdi"], 0.5 * ((x0 - target) ** 2).mean() / B, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out["grad_norm"], (x0 - target).norm(), rtol=1e-5, atol=1e-7)
    out["loss_sdi"].backward()
    torch.testing.assert_close(x.grad, (x0 - target).permute(0, 2, 3, 1) / (x0.numel() * B), rtol=1e-5, atol=1e-9)
    # the target is threestudio's x0 estimate (x_t - sqrt(1 - abar) eps_guided) / sqrt(abar) at the noisy point z:
    # the guided Gaussian denoiser is m_g + c (z - m_g), m_g = (1 + w) m_c - w m_u, c = s^2 / (s^2 + sigma^2),
    # so z follows from the target, and the VP formula at z must give the target back
    t = g.min_step
    assert g.last_t.tolist() == [t]
    a = sd_abar()[t].float()
    sigma2 = (1 - a) / a
    c, m_g = S2 / (S2 + sigma2), (1 + 7.5) * M_C - 7.5 * M_U
    z = m_g + (target - m_g) / c
    x_t = a.sqrt() * z
    e_c, e_u = eps_vp(x_t, a.reshape(1), M_C), eps_vp(x_t, a.reshape(1), M_U)
    x0_hat = (x_t - (1 - a).sqrt() * (e_c + 7.5 * (e_c - e_u))) / a.sqrt()
    torch.testing.assert_close(x0_hat, target, rtol=1e-4, atol=1e-4)
    assert (z - x0).abs().mean() > 0.1 * sigma2.sqrt()  # a noisy point at sigma_t, not x itself


@pytest.mark.parametrize("method, key", [("ism", "loss_ism"), ("msd", "loss_msd"), ("nfsd", "loss_nfsd")])
def test_other_methods_keys_and_sum_loss(method, key):
    """ISM / MSD / NFSD: the core distiller's gradient (checked against closed forms in test_new_distillers.py)
    under threestudio's sum reduction and its own key."""
    kw = {"msd": dict(steps=4)}.get(method, {})
    g, x = guidance(method, guidance_scale=7.5, **kw), latents()
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert set(out) == {key, "grad_norm", "min_step", "max_step"}
    assert isinstance(g.distiller, ISM if method == "ism" else MSD) or method == "nfsd"
    core = g.distiller.grad(x.detach().permute(0, 3, 1, 2), torch.Generator().manual_seed(g.last_seed),
                            **g.call_conditions(COND.expand(B, -1, -1), UNCOND.expand(B, -1, -1)))
    assert core.abs().max() > 0
    _check_sum_loss(out, key, x, core)


def test_latents_resized_and_perp_neg_refused():
    g = guidance("sds")
    x = torch.randn(1, 16, 16, 4)
    out = g(x, Prompts(COND, UNCOND), rgb_as_latents=True)
    assert torch.isfinite(out["loss_sds"])  # 16x16 latents interpolated to latent_size 8 (threestudio: 64)
    p = PerpPrompts(COND, UNCOND)
    with pytest.raises(ValueError, match="parity"):
        DistillationGuidance(denoiser=GaussianText(), scheduler=SCHED, method="sds")(x, p, rgb_as_latents=True)
    with pytest.raises(ValueError, match="parity"):
        DistillationGuidance(denoiser=GaussianText(), scheduler=SCHED, parity="other")
    with pytest.raises(ValueError, match="method"):
        DistillationGuidance(denoiser=GaussianText(), scheduler=SCHED, method="ism")  # parity diffsolve: 4 methods


def test_prolificdreamer_weighting_weights_vsd_losses_separately():
    """threestudio/systems/prolificdreamer.py: loss += value * C(lambda_<suffix>) for every loss_* key. On the tiny
    UNet with its LoRA, lambda_vsd scales only the latents' gradient and lambda_lora only the LoRA's."""
    pytest.importorskip("peft")
    from diffsolve.integrations.diffusers import tiny_sd_components
    c = tiny_sd_components()
    cond, uncond = torch.randn(1, 77, 8), torch.randn(1, 77, 8)

    def run(lambdas):
        g = DistillationGuidance(c, method="vsd", parity="threestudio", seed=3, latent_size=8)
        g.update_step(0, 0)
        x = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = g(x, Prompts(cond, uncond), rgb_as_latents=True, c2w=torch.eye(4)[None])
        loss = sum(v * lambdas[k.replace("loss_", "lambda_")] for k, v in out.items() if k.startswith("loss_"))
        loss.backward()
        lora = torch.cat([p.grad.flatten() for p in g.lora.lora_parameters() if p.grad is not None])
        assert all(p.grad is not None for p in g.lora.camera_embedding.parameters())
        return x.grad, lora, out
    gx1, gl1, out = run({"lambda_vsd": 1.0, "lambda_lora": 1.0})
    assert set(out) == {"loss_vsd", "loss_lora", "grad_norm", "min_step", "max_step"} and out["loss_lora"] > 0
    gx2, gl2, _ = run({"lambda_vsd": 2.0, "lambda_lora": 0.5})
    torch.testing.assert_close(gx2, 2.0 * gx1)
    torch.testing.assert_close(gl2, 0.5 * gl1)
    assert gl1.abs().max() > 0


def test_vsd_camera_lora_gradient_by_hand():
    """stable_diffusion_vsd_guidance.py `compute_grad_vsd` on the tiny UNet: noise_pred_pretrain = uncond +
    s (text - uncond) from the frozen UNet; noise_pred_est = CFG over the camera of the LoRA UNet (class_labels =
    camera vs zeros, both with the text condition) with guidance_scale_lora; grad = (1 - abar) (pretrain - est)."""
    pytest.importorskip("peft")
    from diffsolve.integrations.diffusers import tiny_sd_components
    c = tiny_sd_components()
    gen = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(1, 77, 8, generator=gen), torch.randn(1, 77, 8, generator=gen)
    cam = torch.randn(1, 4, 4, generator=gen)
    g = DistillationGuidance(c, method="vsd", parity="threestudio", seed=3, latent_size=8, guidance_scale=7.5,
                             guidance_scale_lora=2.0)
    g.update_step(0, 0)
    x = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = g(x, Prompts(cond, uncond), rgb_as_latents=True, c2w=cam)
    out["loss_vsd"].backward()
    t, n = redraw(g, (1, 4, 8, 8))
    a = c.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x.detach().permute(0, 3, 1, 2) + (1 - a).sqrt() * n
    with torch.no_grad():
        tt = t.float()
        e_c, e_u = (c.unet(x_t, tt, encoder_hidden_states=e).sample for e in (cond, uncond))
        lora = g.lora.unet
        l_c, l_u = (lora(x_t, tt, encoder_hidden_states=cond, class_labels=k).sample
                    for k in (cam.reshape(1, 16), torch.zeros(1, 16)))
    grad = (1 - a) * ((e_u + 7.5 * (e_c - e_u)) - (l_u + 2.0 * (l_c - l_u)))
    assert (l_c - l_u).abs().max() > 1e-6  # the camera changes the LoRA UNet's prediction
    torch.testing.assert_close(x.grad.permute(0, 3, 1, 2), grad, rtol=1e-3, atol=1e-5)


def test_guidance_eval_outputs():
    """stable_diffusion_guidance.py `guidance_eval`: keys, the noise level of the first 50-step DDIM timestep <= t,
    the decoded noisy latents of the call's own t and noise, and the one-step x0 estimate at that grid timestep."""
    from diffsolve.integrations.diffusers import tiny_sd_components, vae_decode
    c = tiny_sd_components()
    gen = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(1, 77, 8, generator=gen), torch.randn(1, 77, 8, generator=gen)
    g = DistillationGuidance(c, method="sds", parity="threestudio", seed=3, latent_size=8, guidance_scale=7.5,
                             min_step_percent=0.9, max_step_percent=0.98)
    g.update_step(0, 0)
    x = torch.randn(2, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    cams = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 40.0]), torch.tensor([1.5, 2.0])
    out = g(x, Prompts(cond, uncond), *cams, rgb_as_latents=True, guidance_eval=True)["eval"]
    assert set(out) == {"bs", "noise_levels", "imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final", "texts"}
    t, n = redraw(g, (2, 4, 8, 8))
    grid = torch.arange(50) * 20 + 1  # SD's DDIM: steps_offset 1, "leading" spacing
    t_e = torch.stack([grid[grid <= ti].max() for ti in t])
    assert out["noise_levels"] == pytest.approx((t_e / 1000).tolist())
    a = c.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * x.permute(0, 3, 1, 2) + (1 - a).sqrt() * n
    with torch.no_grad():
        torch.testing.assert_close(out["imgs_noisy"], vae_decode(c.vae, noisy).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
        e_c, e_u = (c.unet(noisy, t.float(), encoder_hidden_states=e.expand(2, -1, -1)).sample for e in (cond, uncond))
        eps = e_c + 7.5 * (e_c - e_u)
        a_e = c.scheduler.alphas_cumprod[t_e].float().reshape(-1, 1, 1, 1)
        x0 = (noisy - (1 - a_e).sqrt() * eps) / a_e.sqrt()
        torch.testing.assert_close(out["imgs_1orig"], vae_decode(c.vae, x0).permute(0, 2, 3, 1), rtol=1e-3, atol=1e-4)
    assert out["texts"][1] == f"n{t_e[1].item() / 1000:.02f}\ne20.0\na40.0\nc2.00"
    assert out["imgs_final"].shape == out["imgs_noisy"].shape == (2, 16, 16, 3)  # the tiny VAE upsamples x2


def test_perp_neg_by_hand():
    """stable_diffusion_guidance.py `compute_grad_sds` with use_perp_neg: e_pos = text - uncond, e_i = neg_i - uncond
    (noise_pred_neg[i::k]), noise_pred = uncond + s (e_pos + sum_i w_i perpendicular_component(e_i, e_pos)) (utils/ops.py:
    x - <x, y> / max(<y, y>, 1e-6) y per row), grad = (1 - abar) (noise_pred - noise)."""
    g, x = guidance("sds", guidance_scale=7.5), latents()
    p = PerpPrompts(COND, UNCOND)
    cams = torch.zeros(B), torch.zeros(B), torch.ones(B)
    out = g(x, p, *cams, rgb_as_latents=True)
    t, n = redraw(g, (B, 4, 8, 8))
    a = sd_abar()[t].float()
    x_t = a.sqrt().reshape(-1, 1, 1, 1) * x.detach().permute(0, 3, 1, 2) + (1 - a).sqrt().reshape(-1, 1, 1, 1) * n
    e_u = eps_vp(x_t, a, M_U)
    pos = eps_vp(x_t, a, M_C) - e_u
    acc = torch.zeros_like(pos)
    for i, m in enumerate(NEGS):
        e = eps_vp(x_t, a, torch.tensor(m).reshape(1, 4, 1, 1)) - e_u
        coef = (e * pos).sum((1, 2, 3)) / (pos * pos).sum((1, 2, 3)).clamp(min=1e-6)
        acc = acc + p.weights[:, i].reshape(-1, 1, 1, 1) * (e - coef.reshape(-1, 1, 1, 1) * pos)
    grad = (1 - a).reshape(-1, 1, 1, 1) * (e_u + 7.5 * (pos + acc) - n)
    assert acc.abs().max() > 1e-3
    _check_sum_loss(out, "loss_sds", x, grad, atol=1e-5)  # eps space in float32 inside the transform
    assert g.distiller.last_nfe == 4  # uncond, two negatives, text
