"""The public step contract: a solver written outside the package, flows first-class under every solver
(multistep included, Lie and Strang, bare and inside limited_interval), the drift a step reports, and the
errors before work."""
import functools
import math
import re
from pathlib import Path

import pytest
import torch

import diffsolve as ds
from diffsolve.analytic import GaussianMixture
from diffsolve.distill import MSD
from diffsolve.integrations.kdiffusion import load
from _models import identity_model, log_slope
from diffsolve_studies.toy.datasets import three_component_mixture

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def doc_solver():
    """The `MyDPMpp2M` block of docs/samplers.md, executed as written."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/samplers.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "class MyDPMpp2M" in b)
    namespace = {}
    exec(compile(block, "docs/samplers.md", "exec"), namespace)
    return block, namespace["MyDPMpp2M"]


def test_out_of_package_solver_is_short_public_and_equals_the_peers():
    block, cls = doc_solver()
    body = [line for line in block.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    assert len(body) <= 15, len(body)
    assert not re.search(r"\b_[a-z]", block.replace("__", "")), "the example must use public names only"
    gmm = three_component_mixture()
    x = 5.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = ds.sigmas_karras(24, 0.002, 5.0)
    ours, info = ds.sample(cls(), gmm, x, sigmas, return_info=True)
    sampling, _ = load()
    theirs = sampling.sample_dpmpp_2m(gmm, x, sigmas, disable=True)
    assert (ours - theirs).abs().max() < 1e-10
    assert (ours - ds.sample_dpmpp_2m(gmm, x, sigmas)).abs().max() < 1e-12
    assert info.nfe == 24
    first_order = ds.sample_euler(gmm, x, sigmas)
    assert (first_order - theirs).abs().max() > 1e-4  # the comparison can fail


def deterministic_solvers():
    """Every registered solver with its deterministic settings (eta = 0 where it has eta)."""
    import inspect
    out = {}
    for name, factory in sorted(ds.SOLVERS.items()):
        params = inspect.signature(factory).parameters
        try:
            solver = factory(**({"eta": 0.0} if "eta" in params else {}))
        except TypeError:  # a solver that needs arguments of its own (e.g. a fixed step count)
            continue
        # a solver that absorbs the flows (kernel_exp) integrates kernel + z / sigma exactly and D as forcing, so
        # D = x is not exact there but converges at its order (tests/test_kernel_exp.py)
        if solver.applies_flows and not solver.stochastic and not solver.absorbs_flows:
            out[name] = solver
    return out


DETERMINISTIC = deterministic_solvers()


def exact_kernel_flow(z0, c, lam, s0, s1, lo=0.0, hi=math.inf):
    a, b = min(s0, hi), max(s1, lo)
    return c + (z0 - c) * (math.exp(-(a ** 2 - b ** 2) / lam ** 2) if a > b else 1.0)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("splitting", ["lie", "strang"])
@pytest.mark.parametrize("interval", [None, (0.3, 2.0)])
def test_identity_denoiser_reproduces_the_exact_kernel_flow(name, splitting, interval):
    """D(x) = x: the model term vanishes, so every solver (multistep ones through their carried history)
    must give exactly the kernel flow; inside limited_interval over the part of each step in (lo, hi]."""
    g = torch.Generator().manual_seed(1)
    z0, c = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    lam = 1.0
    kernel = ds.gaussian_kernel(c, lam, face="split", splitting=splitting)
    term = kernel if interval is None else ds.limited_interval(kernel, *interval)
    sigmas = ds.sigmas_karras(12, 0.05, 4.0, append_zero_=False)
    out = ds.sample(DETERMINISTIC[name], identity_model, z0.clone(), sigmas, transforms=[term])
    lo, hi = interval or (0.0, math.inf)
    exact = exact_kernel_flow(z0, c, lam, float(sigmas[0]), float(sigmas[-1]), lo, hi)
    assert (out - exact).abs().max() < 1e-10


class UncarriedDPMpp2M(ds.DPMpp2M):
    """DPM++ 2M whose history is the raw denoised values as evaluated, never carried through the flows
    (`last` is set per run by the caller: a deliberately broken solver that keeps state)."""

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        d_hat = d
        if self.last is not None:
            r = math.log(self.last[0] / s.sigma) / h
            d_hat = (1 + 1 / (2 * r)) * d - self.last[1] / (2 * r)
        self.last = (s.sigma, d)
        return (s.sigma_next / s.sigma) * s.x - math.expm1(-h) * d_hat


def test_multistep_history_is_carried_through_flows():
    """Without the carry (history as it was before the flow) DPM++ 2M misses the exact flow: the check
    above can fail."""
    solver = UncarriedDPMpp2M()
    solver.last = None
    z0, c = torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    sigmas = ds.sigmas_karras(12, 0.05, 1.5, append_zero_=False)
    kernel = ds.gaussian_kernel(c, 1.0, face="split")
    out = ds.sample(solver, identity_model, z0, sigmas, transforms=[kernel])
    exact = exact_kernel_flow(z0, c, 1.0, 1.5, 0.05)
    assert (out - exact).abs().max() > 0.01  # the carried history gives 1e-10 (the test above)


def _product_ode(solver, n, splitting, interval, lam):
    """The kernel product ODE (split face) on a Gaussian mixture, Karras grid of n steps on [0.02, 5]."""
    gmm = three_component_mixture()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64)
    z0 = x + 5.0 * torch.randn(32, 2, generator=g, dtype=torch.float64)
    kernel = ds.gaussian_kernel(x, lam, face="split", splitting=splitting)
    term = kernel if interval is None else ds.limited_interval(kernel, *interval)
    return ds.sample(solver, gmm, z0, ds.sigmas_karras(n, 0.02, 5.0, append_zero_=False), transforms=[term])


@functools.lru_cache(maxsize=None)
def _reference(interval, lam):
    return _product_ode(ds.Heun(), 4096, "strang", interval, lam)


def product_ode_errors(solver, splitting, interval, ns, lam=1.0):
    """Error at the last sigma against a 4096-step Heun + Strang reference, for each n of `ns`."""
    ref = _reference(interval, lam)
    return [float((_product_ode(solver, n, splitting, interval, lam) - ref).norm(dim=1).mean()) for n in ns]


class StrangHalvesDPMpp2M(ds.DPMpp2M):
    """DPM++ 2M made to take Strang's half-flows around its step (what the loop avoids for it)."""
    evaluates_at_start = False


@pytest.mark.parametrize("interval", [None, (0.2222, 1.7777)])
def test_strang_with_a_second_order_solver_is_second_order(interval):
    """Heun + Strang, also inside limited_interval (grids contain neither lo nor hi); Lie splitting (the old
    silent downgrade inside limited_interval) is first order, so the check can fail."""
    ns = [32, 64, 128]
    strang = log_slope(ns, product_ode_errors(ds.Heun(), "strang", interval, ns))
    lie = log_slope(ns, product_ode_errors(ds.Heun(), "lie", interval, ns))
    assert strang > 1.8, strang
    assert lie < 1.3, lie


@pytest.mark.parametrize("interval", [None, (0.2222, 1.7777)])
def test_multistep_solver_keeps_its_order_under_flows(interval):
    """DPM++ 2M with its history carried and every flow after the step (integrating-factor form) is second
    order whichever splitting is asked for; Strang's half-flows around it would make it first order."""
    ns = [32, 64, 128]
    for splitting in ("lie", "strang"):
        slope = log_slope(ns, product_ode_errors(ds.DPMpp2M(), splitting, interval, ns))
        assert slope > 1.8, (splitting, slope)
    halves = log_slope(ns, product_ode_errors(StrangHalvesDPMpp2M(), "strang", interval, ns))
    assert halves < 1.6, halves


def test_limited_interval_keeps_the_inner_splitting():
    kernel = ds.gaussian_kernel(torch.zeros(2, 1), 1.0, face="split", splitting="strang")
    flows = ds.limited_interval(kernel, 0.1, 1.0).flows()
    assert [f.splitting for f in flows] == ["strang"]


@pytest.mark.parametrize("flow", ["matched", "literal"])
def test_churn_reports_its_drift_to_the_flow(flow):
    """Euler with churn: the matched flow covers [sigma_hat, sigma_next] (the noise churn adds is drift the
    step applies), the literal flow the nominal [sigma, sigma_next]. Zero noise isolates the factors."""
    z0, c = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    sigmas = [float(s) for s in ds.sigmas_karras(8, 0.1, 3.0, append_zero_=False)]
    solver = ds.Euler(s_churn=2.0)
    kernel = ds.gaussian_kernel(c, 1.5, face="split", flow=flow)
    out = ds.sample(solver, identity_model, z0, torch.tensor(sigmas, dtype=torch.float64), transforms=[kernel],
                    noise_sampler=lambda a, b: torch.zeros_like(z0))
    factor = 1.0
    for i in range(len(sigmas) - 1):
        top = ds.churn_sigma(sigmas[i], len(sigmas) - 1, 2.0) if flow == "matched" else sigmas[i]
        factor *= math.exp(-(top ** 2 - sigmas[i + 1] ** 2) / 1.5 ** 2)
    assert top != sigmas[-2] or flow == "literal"
    assert ((out - factor).abs() / factor).max() < 1e-9


def stochastic_solvers():
    """Every registered solver that takes eta, at eta = 0.5 and 1, and applies flows."""
    import inspect
    out = {}
    for name, factory in sorted(ds.SOLVERS.items()):
        if "eta" not in inspect.signature(factory).parameters:
            continue
        for eta in (0.5, 1.0):
            try:
                solver = factory(eta=eta)
            except TypeError:
                continue
            if solver.stochastic and solver.applies_flows:
                out[f"{name}-eta{eta}"] = solver
    return out


STOCHASTIC = stochastic_solvers()


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_sde_flow_samples_match_the_exact_ornstein_uhlenbeck_transition(name):
    """Identity denoiser + kernel flow at eta > 0: every SDE step adds noise of variance (k - 1) d(sigma^2) and
    scales the drift by k = solver.drift (DDIM / ancestral: 1 + eta^2; DPM++ SDE steps, which scale h by eta:
    1 + eta). The exact transition: mean c + (z0 - c) exp(-k D / lambda^2), variance (k - 1) lambda^2 / (2k)
    (1 - exp(-2k D / lambda^2)), D = s0^2 - s1^2. 2e4 samples within 5 standard errors; the literal flow
    (drift 1) is told apart."""
    solver = STOCHASTIC[name]
    lam, s0, s1, n = 1.0, 2.0, 0.05, 20_000
    c = torch.zeros(n, 1, dtype=torch.float64)
    z0 = torch.ones(n, 1, dtype=torch.float64)
    sigmas = ds.sigmas_karras(400, s1, s0, append_zero_=False)
    k = solver.drift([float(v) for v in sigmas], 0)
    run = lambda flow: ds.sample(solver, identity_model, z0, sigmas,  # noqa: E731
                                 transforms=[ds.gaussian_kernel(c, lam, face="split", flow=flow)],
                                 generator=torch.Generator().manual_seed(0))
    out = run("matched")
    d = s0 ** 2 - s1 ** 2
    mean = math.exp(-k * d / lam ** 2)
    var = (k - 1) * lam ** 2 / (2 * k) * (1 - math.exp(-2 * k * d / lam ** 2))
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
    assert abs(out.mean().item() - mean) < 5 * se_mean, (out.mean().item(), mean)
    assert abs(out.var().item() - var) < 5 * se_var, (out.var().item(), var)
    assert abs(run("literal").mean().item() - mean) > 5 * se_mean


def test_posterior_sampler_needs_a_reverse_sde_solver():
    gmm = three_component_mixture()
    for solver in ("heun", "dpmpp_2m", ds.DDIM(0.5), ds.Euler()):
        with pytest.raises(ValueError, match="reverse SDE"):
            MSD(gmm, 0.5, sampler="posterior", solver=solver)
    MSD(gmm, 0.5, sampler="posterior", solver="ddim")  # eta = 1: the reverse SDE
    MSD(gmm, 0.5, sampler="posterior", solver="euler_ancestral")
    with pytest.raises(ValueError, match="unknown solver 'nope'.*dpmpp_2m"):
        MSD(gmm, 0.5, solver="nope")


def test_flows_are_refused_by_a_solver_that_cannot_apply_them():
    class NoFlows(ds.Euler):
        applies_flows = False
    kernel = ds.gaussian_kernel(torch.zeros(2, 1), 1.0, face="split")
    with pytest.raises(ValueError, match="cannot apply exact flows"):
        ds.sample(NoFlows(), identity_model, torch.ones(2, 1), ds.sigmas_karras(4, 0.1, 1.0), transforms=[kernel])
    with pytest.raises(ValueError, match="split"):
        MSD(three_component_mixture(), 0.5, solver=NoFlows(), face="split")


def test_batched_cfg_expands_batch_one_conditions():
    """[uncond, cond] batched CFG with batch-1 condition tensors (a prompt embedding shared by the batch)."""
    def model(x, sigma, y):
        return x / (1 + ds.append_dims(sigma, x.ndim) ** 2) + y
    x = torch.randn(16, 2, dtype=torch.float64)
    cond, uncond = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    guided = ds.cfg(3.0, uncond={"y": uncond})
    sigmas = ds.sigmas_karras(4, 0.1, 2.0)
    out = ds.sample_euler(model, x, sigmas, extra_args={"y": cond}, transforms=[guided])
    ref = ds.sample_euler(model, x, sigmas, extra_args={"y": cond.expand(16, 2)},
                          transforms=[ds.cfg(3.0, uncond={"y": uncond.expand(16, 2)})])
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="uncond condition 'y' has batch 3 but x has batch 16"):
        ds.sample_euler(model, x, sigmas, extra_args={"y": cond}, transforms=[ds.cfg(3.0, uncond={"y": torch.zeros(3, 2, dtype=torch.float64)})])


def test_shape_mismatch_and_empty_batch_are_errors_before_or_at_the_first_call():
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for x of shape \(4, 2\)"):
        ds.sample_euler(lambda x, s: x[:, :1], torch.ones(4, 2), ds.sigmas_karras(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="non-empty batch"):
        ds.sample_euler(identity_model, torch.ones(0, 2), ds.sigmas_karras(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="diffsolve Solver"):
        ds.sample("euler", identity_model, torch.ones(2, 2), ds.sigmas_karras(3, 0.1, 1.0))


def test_any_sampler_function_runs_as_a_solver_with_flows_and_in_msd():
    """A k-diffusion function as a Solver: interval by interval it is k-diffusion's own chain for single-step
    samplers, takes split flows between intervals, and serves as MSD's solver."""
    sampling, _ = load()
    gmm = three_component_mixture()
    x = 3.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigmas = ds.sigmas_karras(10, 0.01, 3.0)
    ours, info = ds.sample(ds.FunctionSolver(sampling.sample_heun, order=2), gmm, x, sigmas, return_info=True)
    assert (ours - sampling.sample_heun(gmm, x, sigmas, disable=True)).abs().max() < 1e-12
    assert info.nfe == 19
    c = torch.zeros_like(x)
    flow = ds.sample(ds.FunctionSolver(sampling.sample_euler), identity_model, x, sigmas[:-1],
                     transforms=[ds.gaussian_kernel(c, 1.0, face="split")])
    assert (flow - exact_kernel_flow(x, c, 1.0, float(sigmas[0]), float(sigmas[-2]))).abs().max() < 1e-10
    by_function = MSD(gmm, 0.5, solver=sampling.sample_euler, steps=8).grad(x, seed=3)
    by_name = MSD(gmm, 0.5, solver="euler", steps=8).grad(x, seed=3)
    assert (by_function - by_name).abs().max() < 1e-12
    with pytest.raises(ValueError, match="reverse SDE"):
        MSD(gmm, 0.5, sampler="posterior", solver=sampling.sample_euler_ancestral)
    ancestral = ds.FunctionSolver(sampling.sample_euler_ancestral, stochastic=True, drift_factor=2.0)
    MSD(gmm, 0.5, sampler="posterior", solver=ancestral)


def test_msd_refuses_solvers_that_build_their_own_grid():
    gmm = three_component_mixture()
    with pytest.raises(ValueError, match="dpm_fast.*options of its own"):
        MSD(gmm, 0.5, sampler="posterior", solver="dpm_fast")
    with pytest.raises(ValueError, match="grid it builds itself"):
        MSD(gmm, 0.5, sampler="posterior", solver="dpm_adaptive")
    with pytest.raises(ValueError, match="grid it builds itself"):
        MSD(gmm, 0.5, face="score", solver=ds.DPMFast(5))
