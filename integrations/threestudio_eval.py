"""threestudio's `guidance_eval` outputs (stable_diffusion_guidance.py `guidance_eval`, stored version) for the
guidance in integrations/threestudio.py, for the methods with one noisy sample at an integer timestep (SDS, SJC,
VSD, CSD, NFSD):

- the 50-step DDIM grid of the scheduler (timesteps (T // 50) k + steps_offset, descending); for each of the first
  `max_items_eval` rows the first grid timestep t_e <= t (threestudio's `torch.min(timesteps > t)` index);
- noise_levels = t_e / T; imgs_noisy = the decoded noisy latents (at t); imgs_1step / imgs_1orig = one DDIM eta = 1
  step from t_e with the guided noise prediction (the step's x0 estimate uses abar(t_e), as scheduler.step does);
- imgs_final = DDIM eta = 1 over the remaining grid timesteps with the guided prediction (guidance_scale);
- texts "n{noise level}\\ne{elevation}\\na{azimuth}\\nc{camera distance}".
The noise and t are the gradient call's own (redrawn from the recorded seed in the documented order), so the
images show what that call's gradient saw. Every UNet call here is outside the distiller's model-call count.
"""
import torch

from .diffusers import vae_decode

__all__ = ["EVAL_METHODS", "guidance_eval"]

EVAL_METHODS = ("sds", "sjc", "vsd", "csd", "nfsd")


def _grid(guidance, n=50):
    T = guidance.num_train_timesteps
    offset = int(guidance.scheduler.config.steps_offset) if hasattr(guidance.scheduler, "config") else 0
    return (torch.arange(n) * (T // n) + offset).flip(0)


def _eps(guidance, x_vp, t, cond, uncond, abar):
    """The guided epsilon at VP point x_vp and integer timestep t (the guidance's CFG convention)."""
    a = abar[t].reshape(-1, *([1] * (x_vp.ndim - 1)))
    sigma = ((1 - a) / a).sqrt()
    z = x_vp / a.sqrt()
    conds = guidance.call_conditions(cond, uncond)
    den = guidance.denoiser
    d_c = den(z.float(), sigma.flatten().float(), **conds["extra_args"])
    d_u = den(z.float(), sigma.flatten().float(), encoder_hidden_states=uncond.float())
    g = conds["transforms"][0]
    d = d_u + g.s * (d_c - d_u)
    return ((z - d) / sigma).to(x_vp.dtype)


def _ddim_eta1(x, eps, t, t_prev, abar, generator):
    """One DDIM step with eta = 1 (DDIM paper eq. 12, sigma_eta^2 = (1 - a') / (1 - a) (1 - a / a'))."""
    a = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else abar.new_tensor(1.0)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return a_prev.sqrt() * x0 + (1 - a_prev - var).clamp(min=0).sqrt() * eps + var.sqrt() * noise, x0


@torch.no_grad()
def guidance_eval(guidance, latents, cond, uncond, elevation, azimuth, camera_distances, max_items_eval=4):
    if guidance.method not in EVAL_METHODS or guidance.last_t is None:
        raise ValueError(f"guidance_eval needs one of {EVAL_METHODS} with integer timesteps, got {guidance.method!r}")
    if guidance.vae is None:
        raise ValueError("guidance_eval decodes latents: the guidance needs a VAE")
    abar = guidance.sigmas.new_tensor(1.0) / (1 + guidance.sigmas ** 2)
    gen = torch.Generator().manual_seed(guidance.last_seed)
    B = latents.shape[0]
    torch.rand(B, generator=gen, dtype=torch.float64)  # the timestep uniforms
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
    bs = min(max_items_eval, B) if max_items_eval > 0 else B
    t = guidance.last_t[:bs].cpu()
    a = abar[t].reshape(-1, 1, 1, 1).float()
    noisy = a.sqrt() * latents[:bs].float() + (1 - a).sqrt() * noise[:bs]
    grid = _grid(guidance)
    idx = [int((grid > int(ti)).long().argmin()) for ti in t]  # first grid timestep <= t
    t_e = grid[idx]
    decode = lambda x: vae_decode(guidance.vae, x.to(next(guidance.vae.parameters()).dtype)).permute(0, 2, 3, 1)
    one, orig, final = [], [], []
    step_gen = torch.Generator().manual_seed(guidance.last_seed + 2)
    for b in range(bs):
        x, c, u = noisy[b:b + 1], cond[b:b + 1], uncond[b:b + 1]
        eps = _eps(guidance, x, t[b:b + 1], c, u, abar)  # the prediction at the sampled t (threestudio's noise_pred)
        prev = int(grid[idx[b] + 1]) if idx[b] + 1 < len(grid) else -1
        x1, x0 = _ddim_eta1(x, eps, int(t_e[b]), prev, abar.float(), step_gen)
        one.append(x1)
        orig.append(x0)
        xf = x1
        for k in range(idx[b] + 1, len(grid)):
            tk = int(grid[k])
            nxt = int(grid[k + 1]) if k + 1 < len(grid) else -1
            xf, _ = _ddim_eta1(xf, _eps(guidance, xf, torch.tensor([tk]), c, u, abar), tk, nxt, abar.float(), step_gen)
        final.append(xf)
    fracs = [float(v) / guidance.num_train_timesteps for v in t_e]
    out = {"bs": bs, "noise_levels": fracs, "imgs_noisy": decode(noisy), "imgs_1step": decode(torch.cat(one)),
           "imgs_1orig": decode(torch.cat(orig)), "imgs_final": decode(torch.cat(final))}
    out["texts"] = [f"n{n:.02f}\ne{float(e):.01f}\na{float(a_):.01f}\nc{float(c_):.02f}"
                    for n, e, a_, c_ in zip(fracs, elevation, azimuth, camera_distances)]
    return out
