"""diffsolve's UniPC, DPM++ 2M and LCM against diffusers' `UniPCMultistepScheduler`,
`DPMSolverMultistepScheduler` and `LCMScheduler` loops, step for step.

Two models drive both sides:
  - diffusers' tiny random Stable Diffusion UNet (float32) under SD's scheduler config: each scheduler is
    built with `from_config(tiny_sd_scheduler().config)`, which, as with a real SD checkpoint (whose config
    has no `timestep_spacing`), keeps each scheduler's own default spacing ("linspace" for the multistep
    ones) and SD's betas / steps_offset. Tolerance 1e-4 on final latents of size ~65; the residual (~3e-5)
    is float32 rounding, much of it diffusers computing its coefficients from float32 sigmas.
  - an analytic 2-D Gaussian mixture (float64), seen by diffusers as an epsilon network through
    `diffsolve.VPModelView`. diffusers is handed float64 copies of its own grid (`sched.sigmas`, or
    `sched.alphas_cumprod` for LCM), so that its coefficients are computed in float64 too: 1e-8 (the
    measured differences are ~1e-15).

Grids. diffusers' multistep "linspace" / "leading" spacings take n of n + 1 grid points (timestep 0
dropped), unlike DDIM's, so the sigmas are `sigmas_discrete(acp, n + 1, spacing, steps_offset)[:n]`
("trailing": n points), checked against `sched.timesteps`, then the final sigma (0, or abar_0's sigma
for final_sigmas_type="sigma_min"). Karras: `sigmas_karras(n, sigma_min, sigma_max)` checked against
`sched.sigmas`; diffusers evaluates the UNet at the rounded timestep of each Karras sigma, which is the
nearest table timestep, i.e. `VPDenoiser(..., quantize=True)`. LCM: the table sigmas of the scheduler's own
`timesteps`, then 0.
"""
import math

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from _models import SingleGaussian, log_slope  # noqa: E402
from conftest import tiny_sd_components, tiny_sd_scheduler  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.integrations.diffusers import denoiser_from_unet, from_ve, to_ve  # noqa: E402
from diffsolve_studies.toy.datasets import three_component_mixture  # noqa: E402

torch.set_num_threads(1)
N, N_LCM, TOL, TOL64 = 10, 4, 1e-4, 1e-8
UNIPC_CASES = [("bh2", p, "zero") for p in (1, 2, 3)] + [(v, p, "sigma_min") for v in ("bh1", "bh2")
                                                           for p in (1, 2, 3)]


@pytest.fixture(scope="module")
def parts():
    unet, sched, _ = tiny_sd_components()
    g = torch.Generator().manual_seed(0)
    latents, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 8, generator=g)
    return unet, sched.alphas_cumprod.double(), latents, emb


@pytest.fixture(scope="module")
def mixture():
    gm = three_component_mixture()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return gm, z


def _scheduler(name, **config):
    import diffusers
    return getattr(diffusers, name).from_config(tiny_sd_scheduler().config, **config)


def _err(a, b):
    return (a - b).abs().max().item()


def _table(acp):
    return ds.sigmas_from_alphas_cumprod(acp)


def _grid(sched, n, acp):
    """Our float64 sigma grid for a diffusers multistep scheduler after `set_timesteps(n)`."""
    spacing, offset = sched.config.timestep_spacing, sched.config.steps_offset
    if sched.config.use_karras_sigmas:
        table = _table(acp)
        sigmas = ds.sigmas_karras(n, table[0].item(), table[-1].item(), append_zero_=False)
        torch.testing.assert_close(sigmas, sched.sigmas[:-1].double(), rtol=1e-6, atol=0)
    else:
        sigmas, timesteps = ds.sigmas_discrete(acp, n if spacing == "trailing" else n + 1, spacing, offset)
        sigmas, timesteps = sigmas[:n], timesteps[:n]
        assert torch.equal(timesteps, sched.timesteps), (timesteps.tolist(), sched.timesteps.tolist())
    final = 0.0 if sched.config.final_sigmas_type == "zero" else _table(acp)[0].item()
    return torch.cat([sigmas, sigmas.new_tensor([final])])


class _NoFloat32Cast(torch.overrides.TorchFunctionMode):
    """`tensor.to(torch.float32)` of a float64 tensor returns it unchanged: neutralises the one cast in
    `DPMSolverMultistepScheduler.step` ("upcast" of the sample to float32, a downcast for float64 input,
    worth ~5e-7 here), so that the float64 comparison measures the algorithm."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor)
                and args[0].dtype == torch.float64 and torch.float32 in (*args[1:], kwargs.get("dtype"))):
            return args[0]
        return func(*args, **kwargs)


@torch.no_grad()
def _diffusers_loop(sched, net, z, keep_float64=False):
    """The hand-written diffusers loop over `sched.timesteps` (set beforehand); net(z, t) -> output."""
    for t in sched.timesteps:
        out = net(z, t)
        if keep_float64:
            with _NoFloat32Cast():
                z = sched.step(out, t, z).prev_sample
        else:
            z = sched.step(out, t, z).prev_sample
    return z


def _ours(sample_fn, model, z, sigmas, **kw):
    x = sample_fn(model, to_ve(z, sigmas[0]), sigmas, disable=True, **kw)
    return from_ve(x, sigmas[-1])


def _unet_net(unet, emb):
    return lambda z, t: unet(z, t, encoder_hidden_states=emb).sample


# ------------------------------------------------------------------------------------------ UniPC
@pytest.mark.parametrize("variant, order, final", UNIPC_CASES)
def test_unipc_matches_diffusers_on_unet(parts, variant, order, final):
    unet, acp, latents, emb = parts
    sched = _scheduler("UniPCMultistepScheduler", solver_type=variant, solver_order=order, final_sigmas_type=final)
    sched.set_timesteps(N)
    ref = _diffusers_loop(sched, _unet_net(unet, emb), latents)
    sigmas = _grid(sched, N, acp)
    D, cond = denoiser_from_unet(unet, sched), {"encoder_hidden_states": emb}
    ours = _ours(ds.sample_uni_pc, D, latents, sigmas, extra_args=cond, order=order, variant=variant)
    assert _err(ours, ref) < TOL, _err(ours, ref)
    # negative controls: the other B(h), or no corrector, is another chain
    other = "bh1" if variant == "bh2" else "bh2"
    assert _err(_ours(ds.sample_uni_pc, D, latents, sigmas, extra_args=cond, order=order, variant=other), ref) > 1e-2
    no_corr = _ours(ds.sample_uni_pc, D, latents, sigmas, extra_args=cond, order=order, variant=variant,
                    disable_corrector=range(N))
    assert _err(no_corr, ref) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_unipc_other_spacings_match_diffusers(parts, spacing):
    unet, acp, latents, emb = parts
    sched = _scheduler("UniPCMultistepScheduler", solver_order=3, timestep_spacing=spacing)
    sched.set_timesteps(N)
    ref = _diffusers_loop(sched, _unet_net(unet, emb), latents)
    ours = _ours(ds.sample_uni_pc_bh2, denoiser_from_unet(unet, sched), latents, _grid(sched, N, acp),
                 extra_args={"encoder_hidden_states": emb})
    assert _err(ours, ref) < TOL, _err(ours, ref)


def test_unipc_disable_corrector_matches_diffusers(parts):
    unet, acp, latents, emb = parts
    sched = _scheduler("UniPCMultistepScheduler", solver_order=2, disable_corrector=[0, 4])
    sched.set_timesteps(N)
    ref = _diffusers_loop(sched, _unet_net(unet, emb), latents)
    D, sigmas, cond = denoiser_from_unet(unet, sched), _grid(sched, N, acp), {"encoder_hidden_states": emb}
    ours = _ours(ds.sample_uni_pc_bh2, D, latents, sigmas, extra_args=cond, order=2, disable_corrector=[0, 4])
    assert _err(ours, ref) < TOL, _err(ours, ref)
    assert _err(_ours(ds.sample_uni_pc_bh2, D, latents, sigmas, extra_args=cond, order=2), ref) > 1e-2


def test_unipc_bh1_to_sigma_zero_is_nan_in_diffusers(mixture):
    """Not matched: diffusers' bh1 last step to sigma = 0 computes B(h) * 0 with B(h) = -h = -inf, a NaN;
    the limit (and ours, as for every variant) is x = D. If diffusers fixes it, the two must agree."""
    gm, z = mixture
    sched = _scheduler("UniPCMultistepScheduler", solver_type="bh1", solver_order=3)
    sched.set_timesteps(N)
    acp = sched.alphas_cumprod.double()
    sigmas = _grid(sched, N, acp)
    sched.sigmas = sigmas.clone()
    ref = _diffusers_loop(sched, ds.VPModelView(gm, acp), z)
    ours = _ours(ds.sample_uni_pc, gm, z, sigmas)
    assert torch.isfinite(ours).all()
    assert torch.isnan(ref).all() or _err(ours, ref) < TOL64


@pytest.mark.parametrize("variant, order, final", UNIPC_CASES)
def test_unipc_matches_diffusers_on_mixture_float64(mixture, variant, order, final):
    gm, z = mixture
    sched = _scheduler("UniPCMultistepScheduler", solver_type=variant, solver_order=order, final_sigmas_type=final)
    sched.set_timesteps(N)
    acp = sched.alphas_cumprod.double()
    sigmas = _grid(sched, N, acp)
    sched.sigmas = sigmas.clone()  # diffusers' coefficients in float64 on the same grid
    ref = _diffusers_loop(sched, ds.VPModelView(gm, acp), z)
    ours = _ours(ds.sample_uni_pc, gm, z, sigmas, order=order, variant=variant)
    assert _err(ours, ref) < TOL64, _err(ours, ref)
    other = _ours(ds.sample_uni_pc, gm, z, sigmas, order=order, variant="bh1" if variant == "bh2" else "bh2")
    assert _err(other, ref) > 1e-6


# ------------------------------------------------------------------------------------------ DPM++ 2M
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers_on_unet(parts, karras):
    unet, acp, latents, emb = parts
    sched = _scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                       use_karras_sigmas=karras)
    sched.set_timesteps(N)
    ref = _diffusers_loop(sched, _unet_net(unet, emb), latents)
    sigmas, cond = _grid(sched, N, acp), {"encoder_hidden_states": emb}
    D = denoiser_from_unet(unet, sched, quantize=karras)
    if karras:
        assert torch.equal(D.sigma_to_t(sigmas[:-1]).long(), sched.timesteps)
    ours = _ours(ds.sample_dpmpp_2m, D, latents, sigmas, extra_args=cond)
    assert _err(ours, ref) < TOL, _err(ours, ref)
    # negative control: DPM-Solver++ first order (DDIM) on the same grid is another chain
    assert _err(_ours(ds.sample_ddim, D, latents, sigmas, extra_args=cond), ref) > 1e-2


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers_on_mixture_float64(mixture, karras):
    gm, z = mixture
    sched = _scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                       use_karras_sigmas=karras)
    sched.set_timesteps(N)
    acp = sched.alphas_cumprod.double()
    sigmas = _grid(sched, N, acp)
    sched.sigmas = sigmas.clone()
    view = ds.VPModelView(gm, acp)
    # off the table (Karras) diffusers evaluates the network at the rounded timestep: the quantized VP map
    D = ds.VPDenoiser(view, acp, quantize=True) if karras else gm
    ref = _diffusers_loop(sched, view, z, keep_float64=True)
    ours = _ours(ds.sample_dpmpp_2m, D, z, sigmas)
    assert _err(ours, ref) < TOL64, _err(ours, ref)
    sched.set_timesteps(N)
    sched.sigmas = sigmas.clone()
    as_is = _diffusers_loop(sched, view, z)  # with diffusers' float32 cast of the sample left in
    assert TOL64 < _err(as_is, ref) < 1e-5, _err(as_is, ref)
    assert _err(_ours(ds.sample_ddim, D, z, sigmas), ref) > 1e-6


# ------------------------------------------------------------------------------------------ LCM
def _lcm_sigmas(sched, acp):
    return torch.cat([_table(acp)[sched.timesteps], torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def _diffusers_lcm(sched, net, z, seed):
    """The LCM loop; `step` gets the timestep as a Python int (its annotated type), with which it computes
    c_skip / c_out in double precision (from a 0-d int64 tensor they come out float32, ~4e-8 here)."""
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        z = sched.step(net(z, t), int(t), z, generator=g).prev_sample
    return z


@pytest.mark.parametrize("timestep_scaling", [10.0, 0.002])
def test_lcm_matches_diffusers_on_unet(parts, timestep_scaling):
    """The tiny UNet read as an LCM model; both runs draw the same noise from equally seeded generators.
    timestep_scaling = 0.002 makes the boundary condition large (c_skip ~ 0.06 at t = 999, ~0.5 at t = 259)."""
    unet, acp, latents, emb = parts
    sched = _scheduler("LCMScheduler", timestep_scaling=timestep_scaling)
    sched.set_timesteps(N_LCM)
    ref = _diffusers_lcm(sched, _unet_net(unet, emb), latents, seed=3)
    sigmas, cond = _lcm_sigmas(sched, acp), {"encoder_hidden_states": emb}
    bare = denoiser_from_unet(unet, sched)
    D = ds.ConsistencyBoundary.from_scheduler(bare, sched)
    ours = _ours(ds.sample_lcm, D, latents, sigmas, extra_args=cond, generator=torch.Generator().manual_seed(3))
    assert _err(ours, ref) < TOL, _err(ours, ref)
    # negative controls: other noise; and without the boundary condition where it matters
    other = _ours(ds.sample_lcm, D, latents, sigmas, extra_args=cond, generator=torch.Generator().manual_seed(4))
    assert _err(other, ref) > 1e-2
    if timestep_scaling < 1:
        no_bc = _ours(ds.sample_lcm, bare, latents, sigmas, extra_args=cond, generator=torch.Generator().manual_seed(3))
        assert _err(no_bc, ref) > 1e-2


@pytest.mark.parametrize("timestep_scaling", [10.0, 0.002])
def test_lcm_matches_diffusers_on_mixture_float64(mixture, timestep_scaling):
    gm, z = mixture
    sched = _scheduler("LCMScheduler", timestep_scaling=timestep_scaling)
    sched.set_timesteps(N_LCM)
    acp = sched.alphas_cumprod.double()
    sched.alphas_cumprod = acp.clone()
    ref = _diffusers_lcm(sched, ds.VPModelView(gm, acp), z, seed=5)
    D = ds.ConsistencyBoundary.from_scheduler(gm, sched)
    ours = _ours(ds.sample_lcm, D, z, _lcm_sigmas(sched, acp), generator=torch.Generator().manual_seed(5))
    assert _err(ours, ref) < TOL64, _err(ours, ref)
    bare = _ours(ds.sample_lcm, gm, z, _lcm_sigmas(sched, acp), generator=torch.Generator().manual_seed(5))
    assert _err(bare, ref) > 1e-9  # the boundary condition is there even at timestep_scaling = 10


# ------------------------------------------------------------------------------------------ contract
def test_registry_names_and_options():
    assert isinstance(ds.get_solver("uni_pc"), ds.UniPC) and ds.get_solver("uni_pc").variant == "bh1"
    assert ds.get_solver("sample_uni_pc_bh2", order=2).variant == "bh2"
    assert ds.get_solver("uni_pc", order=3, lower_order_final=False).order == 3
    assert ds.get_solver("uni_pc", order=1, lower_order_final=False).order == 2
    assert ds.get_solver("uni_pc", order=3).order == 2 and ds.get_solver("uni_pc", order=3).history == 3
    assert isinstance(ds.get_solver("lcm"), ds.LCM) and ds.LCM().stochastic
    for bad in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
            ds.UniPC(order=bad)
    with pytest.raises(ValueError, match="'bh3'"):
        ds.UniPC(variant="bh3")
    with pytest.raises(ValueError, match="disable_corrector"):
        ds.UniPC(disable_corrector=[-1])
    with pytest.raises(ValueError, match="timestep_scaling"):
        ds.ConsistencyBoundary(lambda x, s: x, torch.linspace(0.99, 0.01, 10), timestep_scaling=0.0)


def test_one_evaluation_per_step_and_lcm_drift(mixture):
    gm, z = mixture
    sigmas = ds.sigmas_karras(8, 0.02, 10.0)
    _, info = ds.sample(ds.UniPC(3), gm, z * 10, sigmas, disable=True, return_info=True)
    assert info.nfe == 8
    lcm = ds.LCM()
    sig = [2.0, 1.0, 0.0]
    eta2 = 1.0 / (sig[1] ** 2 * (sig[0] ** 2 - sig[1] ** 2) / sig[0] ** 2)  # DDIM eta whose noise is sigma_next
    assert math.isclose(lcm.drift(sig, 0), 1 + eta2) and lcm.drift(sig, 1) == 1.0
    # LCM is DDIM with an eta at least that large (its noise capped at sigma_next, sigma_down = 0)
    x, grid = z * 2.0, torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    a = ds.sample_lcm(gm, x, grid, disable=True, generator=torch.Generator().manual_seed(0))
    b = ds.sample_ddim(gm, x, grid, disable=True, eta=10.0, generator=torch.Generator().manual_seed(0))
    assert _err(a, b) < 1e-12


@pytest.mark.parametrize("variant, order, lower_order_final", [
    (v, p, lof) for v in ("bh1", "bh2") for p in (1, 2, 3) for lof in (False, True)
    if (v, p, lof) != ("bh1", 3, False)])  # its error changes sign near n = 300 here (slope 2.7 at 1024-2048)
def test_unipc_observed_order_is_at_least_the_declared_order(variant, order, lower_order_final):
    """Against the exact flow of a Gaussian on exponential grids ending at sigma = 0.05 (128-512 steps)."""
    m = SingleGaussian(0.5, 0.3)
    x = torch.linspace(-15.0, 15.0, 7, dtype=torch.float64)[:, None]
    solver = ds.UniPC(order, variant, lower_order_final)
    ns, errors = [128, 256, 512], []
    for n in ns:
        sigmas = ds.schedules.sigmas_exponential(n, 0.05, 5.0, append_zero_=False)
        errors.append(_err(ds.sample(solver, m, x, sigmas), m.flow(x, 5.0, float(sigmas[-1]))))
    assert log_slope(ns, errors) > solver.order - 0.3, (log_slope(ns, errors), errors)
