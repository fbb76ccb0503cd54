"""DiffsolveScheduler: any diffsolve solver inside a stock diffusers StableDiffusionPipeline (tiny random
components, offline), against diffsolve's own loop on the same UNet.

Tolerances. float32: the pipeline guides the noise prediction (eps_u + g (eps_c - eps_u)) where diffsolve's
`cfg` guides the denoised, and the pipeline's first UNet call sees its latents where diffsolve's VPDenoiser sees
x / sqrt(1 + sigma**2); both are float32 rounding, measured up to 4.6e-5 (Heun; DDIM 1.9e-5) on latents up to
|33|, i.e. 1.4e-6 relative, so the bound is 1e-5 relative to max |latents|. float64: the same runs agree to 1e-7
(DPM++ 2M; 3e-8 for the others: the timesteps are float32 on both sides
but rounded from float32 vs float64 sigmas), bound 1e-5 absolute. Against a diffsolve run that does the
pipeline's arithmetic the adapter is bit for bit the same.
"""
import copy

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.denoisers import DiscreteTimesteps, append_dims, sigma_rows  # noqa: E402
from diffsolve.integrations.diffusers import (  # noqa: E402
    SDDenoiser, from_ve, sigmas_from_scheduler, tiny_sd_components, tiny_sd_scheduler, to_ve)
from diffsolve.integrations.scheduler import DiffsolveScheduler, dry_run_sigmas  # noqa: E402

torch.set_num_threads(1)
N, G = 8, 5.0
SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m"]


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


def _pipe(c, unet=None, scheduler=None):
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=None, tokenizer=None, unet=unet or c.unet,
                                   scheduler=scheduler or c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(dtype=torch.float32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for shape in
                 ((batch, 4, 16, 16), (batch, 77, 8), (batch, 77, 8)))


def _run_pipe(pipe, latents, pos, neg, n=N, **kw):
    return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=G, num_inference_steps=n,
                output_type="latent", latents=None if latents is None else latents.clone(), height=32, width=32,
                **kw).images


def _direct(solver, unet, sched, latents, pos, neg, n=N, sigmas=None, transforms=(), **loop):
    """diffsolve's sampler called directly on the wrapped UNet with diffsolve's CFG."""
    sigmas = sigmas_from_scheduler(sched, n)[0] if sigmas is None else sigmas
    x = ds.sample(ds.get_solver(solver) if isinstance(solver, str) else solver, SDDenoiser(unet=unet, scheduler=sched),
                  to_ve(latents, sigmas[0]), sigmas, extra_args={"encoder_hidden_states": pos},
                  transforms=[ds.cfg(G, uncond={"encoder_hidden_states": neg}), *transforms], disable=True, **loop)
    return from_ve(x, sigmas[-1])


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_with_adapter_is_diffsolves_run(parts, solver):
    """The acceptance test: float32 and float64, and a second pipeline call equals a fresh adapter's."""
    latents, pos, neg = _inputs()
    pipe = _pipe(parts)
    pipe.scheduler = DiffsolveScheduler(solver, parts.scheduler)
    got = _run_pipe(pipe, latents, pos, neg)
    want = _direct(solver, parts.unet, parts.scheduler, latents, pos, neg)
    assert _err(got, want) < 1e-5 * want.abs().max().item(), (_err(got, want), want.abs().max().item())
    again = _run_pipe(pipe, latents, pos, neg)
    pipe.scheduler = DiffsolveScheduler(solver, parts.scheduler)
    assert torch.equal(again, got) and torch.equal(_run_pipe(pipe, latents, pos, neg), got)
    # float64: everything but the float32 timesteps is exact
    unet64 = copy.deepcopy(parts.unet).double()
    l64, p64, n64 = (t.double() for t in (latents, pos, neg))
    pipe64 = _pipe(parts, unet=unet64, scheduler=DiffsolveScheduler(solver, parts.scheduler))
    got64 = _run_pipe(pipe64, l64, p64, n64)
    want64 = _direct(solver, unet64, parts.scheduler, l64, p64, n64)
    assert got64.dtype == torch.float64 and _err(got64, want64) < 1e-5, _err(got64, want64)
    assert _err(got64, got.double()) > 1e-7  # the float64 run really ran in float64


def _pipeline_arithmetic(unet, sched, latents, pos, neg):
    """A VE denoiser doing exactly what the pipeline does around the UNet: CFG on its output, and the first
    evaluation at the pipeline's own latents."""
    times = DiscreteTimesteps(sched.alphas_cumprod)
    first = [True]

    def denoiser(x, sigma):
        sigma = sigma_rows(sigma, x)
        s = append_dims(sigma, x.ndim)
        z = latents if first[0] else x * (1 + s ** 2).rsqrt()
        first[0] = False
        out = unet(torch.cat([z, z]), times.sigma_to_t(sigma).float()[0], encoder_hidden_states=torch.cat([neg, pos]),
                   return_dict=False)[0]
        u, c = out.chunk(2)
        return x - s * (u + G * (c - u))
    return denoiser


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "dpmpp_2s_ancestral"])
def test_adapter_is_bit_for_bit_the_loop_with_the_pipelines_arithmetic(parts, solver):
    latents, pos, neg = _inputs()
    pipe = _pipe(parts)
    pipe.scheduler = DiffsolveScheduler(solver, parts.scheduler, generator=7)
    got = _run_pipe(pipe, latents, pos, neg)
    sigmas = sigmas_from_scheduler(parts.scheduler, N)[0]
    x = ds.sample(ds.get_solver(solver), _pipeline_arithmetic(parts.unet, parts.scheduler, latents, pos, neg),
                  to_ve(latents, sigmas[0]), sigmas, disable=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, from_ve(x, sigmas[-1]))


def test_timesteps_one_per_model_evaluation(parts):
    sched = DiffsolveScheduler("heun", parts.scheduler)
    sched.set_timesteps(N)
    sigmas = sigmas_from_scheduler(parts.scheduler, N)[0]  # ends at abar_0's sigma, not 0: Heun's 2 per step
    assert len(sched.timesteps) == 2 * N and sched.order == 2 and sched.num_inference_steps == N
    want = DiscreteTimesteps(parts.scheduler.alphas_cumprod).sigma_to_t(torch.tensor(
        dry_run_sigmas(ds.Heun(), sigmas)).float()).float()
    assert torch.equal(sched.timesteps, want) and sched.timesteps.dtype == torch.float32
    zero_end = DiffsolveScheduler("heun", parts.scheduler, sigmas_fn=lambda n: ds.sigmas_karras(n, 0.03, 14.6))
    zero_end.set_timesteps(N)
    assert len(zero_end.timesteps) == 2 * N - 1  # the last step to sigma = 0 is Euler
    ddim = DiffsolveScheduler("ddim", parts.scheduler)
    ddim.set_timesteps(N)
    assert torch.allclose(ddim.timesteps, sigmas_from_scheduler(parts.scheduler, N)[1].float(), atol=1e-3)  # its t


def test_v_prediction_and_custom_grid(parts):
    latents, pos, neg = _inputs()
    vsched = tiny_sd_scheduler(prediction_type="v_prediction")
    pipe = _pipe(parts, scheduler=DiffsolveScheduler("dpmpp_2m", vsched))
    got = _run_pipe(pipe, latents, pos, neg)
    want = _direct("dpmpp_2m", parts.unet, vsched, latents, pos, neg)
    assert _err(got, want) < 1e-5 * want.abs().max().item(), _err(got, want)
    eps_read = _direct("dpmpp_2m", parts.unet, parts.scheduler, latents, pos, neg)
    assert _err(got, eps_read) > 1e-2  # negative control: read as epsilon it is another chain
    karras = DiffsolveScheduler("heun", parts.scheduler.config, sigmas_fn=lambda n: ds.sigmas_karras(n, 0.0292, 14.6))
    got = _run_pipe(_pipe(parts, scheduler=karras), latents, pos, neg)
    want = _direct("heun", parts.unet, parts.scheduler, latents, pos, neg, sigmas=ds.sigmas_karras(N, 0.0292, 14.6))
    assert _err(got, want) < 1e-5 * want.abs().max().item(), _err(got, want)


def test_stochastic_solver_noise_per_call(parts):
    """The pipeline's generator draws the latents and then the solver's noise, as diffusers' own DDIM does;
    an int seed gives every call the same noise (per-call state), a torch.Generator is drawn on."""
    _, pos, neg = _inputs()
    pipe = _pipe(parts, scheduler=DiffsolveScheduler("euler_ancestral", parts.scheduler))
    got = _run_pipe(pipe, None, pos, neg, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    want = _direct("euler_ancestral", parts.unet, parts.scheduler, latents, pos, neg, generator=g)
    assert _err(got, want) < 1e-5 * want.abs().max().item(), _err(got, want)
    seeded = _pipe(parts, scheduler=DiffsolveScheduler("dpmpp_2m_sde", parts.scheduler, generator=11))
    first, second = _run_pipe(seeded, latents, pos, neg), _run_pipe(seeded, latents, pos, neg)
    assert torch.equal(first, second)
    drawn = _pipe(parts, scheduler=DiffsolveScheduler("dpmpp_2m_sde", parts.scheduler,
                                                      generator=torch.Generator().manual_seed(11)))
    assert torch.equal(_run_pipe(drawn, latents, pos, neg), first)
    assert _err(_run_pipe(drawn, latents, pos, neg), first) > 1e-2  # the generator moved on
    sampler = _pipe(parts, scheduler=DiffsolveScheduler("dpmpp_2m_sde", parts.scheduler,
                                                        noise_sampler=lambda x: ds.seeded_noise(x, 5)))
    assert torch.equal(_run_pipe(sampler, latents, pos, neg), _run_pipe(sampler, latents, pos, neg))


def test_transforms_run_inside_the_pipeline(parts):
    latents, pos, neg = _inputs()
    center = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    kernels = [ds.gaussian_kernel(center, 3.0, face="split"),
               ds.limited_interval(ds.gaussian_kernel(center, 5.0), 0.1, 2.0)]
    pipe = _pipe(parts, scheduler=DiffsolveScheduler("heun", parts.scheduler, transforms=kernels))
    got = _run_pipe(pipe, latents, pos, neg)
    want = _direct("heun", parts.unet, parts.scheduler, latents, pos, neg, transforms=kernels)
    assert _err(got, want) < 1e-5 * want.abs().max().item(), _err(got, want)
    assert _err(got, _direct("heun", parts.unet, parts.scheduler, latents, pos, neg)) > 1e-2  # they do act


def test_limits_raise(parts):
    latents, pos, neg = _inputs()
    adaptive = _pipe(parts, scheduler=DiffsolveScheduler(ds.Odeint("dopri5", rtol=1e-3, atol=1e-3), parts.scheduler))
    with pytest.raises(RuntimeError, match="depend on x"):
        _run_pipe(adaptive, latents, pos, neg, n=4)
    guided = _pipe(parts, scheduler=DiffsolveScheduler("euler", parts.scheduler,
                                                       transforms=[ds.cfg(2.0, uncond={"encoder_hidden_states": neg})]))
    with pytest.raises(ValueError, match="own conditions"):
        _run_pipe(guided, latents, pos, neg, n=4)

    def edit(pipe, i, t, kw):
        return {"latents": kw["latents"] + 0.1}
    pipe = _pipe(parts, scheduler=DiffsolveScheduler("euler", parts.scheduler))
    with pytest.raises(ValueError, match="not the ones"):
        _run_pipe(pipe, latents, pos, neg, n=4, callback_on_step_end=edit)
    assert _run_pipe(pipe, latents, pos, neg, n=4).shape == latents.shape  # the next call starts afresh
    sched = DiffsolveScheduler("euler", parts.scheduler)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(latents, 999, latents)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="got timestep"):
        sched.step(latents, sched.timesteps[1], latents)
    for bad in ({"solver": "no_such_solver"}, {"generator": 1.5}, {"transforms": [object()]}):
        with pytest.raises(ValueError):
            DiffsolveScheduler(**{"solver": "euler", "base_scheduler_or_config": parts.scheduler, **bad})
