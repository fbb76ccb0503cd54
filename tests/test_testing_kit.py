"""diffsolve.testing: the kit catches planted bugs with the report's default thresholds and passes the originals;
every check can fail; the reference problems are exact; the exact-moment probes, the stiff bound (explicit Euler's
theory: exactly 1), the strategies, the `diffsolve check` command, the pytest plugin and the diffusers step adapter."""
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import diffsolve as ds
from diffsolve.integrations.kdiffusion import load
from diffsolve.testing import (DEFAULT, KernelProblem, MixtureProblem, Noise, PointMass, Sampler, SingleGaussian,
                               as_sampler, check_sampler, constant_stiffness_sigmas, default_mixture, from_solver,
                               kdiffusion_mutants, normal_quantiles, probe_moments, solver_mutants, stiff_bound)
from diffsolve.testing import properties as prop
from diffsolve.testing import strategies as strat
from diffsolve.testing.suite import run_check

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SAMPLING = load()[0]
MUTANTS = {**{f"diffsolve/{k}": v for k, v in solver_mutants().items()},
           **{f"k-diffusion/{k}": v for k, v in kdiffusion_mutants(SAMPLING.sample_heun,
                                                                    SAMPLING.sample_euler_ancestral).items()}}
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------ planted bugs
@pytest.mark.parametrize("name", [k for k, v in MUTANTS.items() if v[2] is None])
def test_originals_pass_every_check_with_the_default_thresholds(name):
    obj, meta, _ = MUTANTS[name]
    report = check_sampler(obj, config=DEFAULT, **meta)
    assert report.passed, report.table(details=True)


@pytest.mark.parametrize("name", [k for k, v in MUTANTS.items() if v[2] is not None])
def test_every_mutant_is_flagged_by_its_check_with_the_default_thresholds(name):
    obj, meta, check = MUTANTS[name]
    report = run_check(check, as_sampler(obj, **meta), DEFAULT)
    assert report.passed is False, (name, report)
    assert check in report.name


def test_each_remaining_check_can_fail():
    """The checks no mutant is designated for fail on a matching defect too."""
    kd = MUTANTS["k-diffusion/flow_sign"]
    flipped = as_sampler(kd[0], **kd[1])
    for check in ("exactness", "agreement", "stiff_score"):
        assert run_check(check, flipped, DEFAULT).passed is False, check
    bare = as_sampler(SAMPLING.sample_heun)  # k-diffusion draws torch.randn_like(x) every step, even with s_churn = 0
    assert run_check("global_rng", bare, DEFAULT).passed is False
    assert run_check("determinism", bare, DEFAULT).passed is True

    euler = from_solver("euler")

    def one_step_nan(model, x, sigmas, noise, transforms):
        y = euler.run(model, x, sigmas, noise).x
        return y * math.nan if len(sigmas) == 2 else y

    def threads_leak(model, x, sigmas, noise, transforms):
        return euler.run(model, x, sigmas, noise).x * (1 + 1e-9 * torch.get_num_threads())
    cases = {"finiteness": Sampler("nan_on_one_step", one_step_nan, kind="diffsolve", order=1, stochastic=False),
             "thread_invariance": Sampler("threads", threads_leak, kind="diffsolve", order=1, stochastic=False),
             "declared_noise": as_sampler(ds.Euler(), stochastic=True)}
    for check, sampler in cases.items():
        assert run_check(check, sampler, DEFAULT).passed is False, check
    batch_noise = as_sampler(MUTANTS["diffsolve/batch_noise"][0])
    assert run_check("batch_invariance_float32", batch_noise, DEFAULT).passed is False


# ------------------------------------------------------------------------------------------ reference problems
def _rk4(model, x, s0, s1, steps=1000):
    """Classical RK4 on dx/dsigma = (x - D(x, sigma)) / sigma, uniform in sigma: an independent reference."""
    def f(z, s):
        return (z - model(z, torch.full((z.shape[0],), s, dtype=z.dtype))) / s
    h = (s1 - s0) / steps
    for i in range(steps):
        s = s0 + i * h
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_reference_flows_are_exact():
    g = SingleGaussian(torch.tensor([0.2, -0.3]), torch.tensor([0.3, 0.6]))
    x = g.start(8, 2, 5.0)
    assert (_rk4(g, x, 5.0, 0.1) - g.flow(x, 5.0, 0.1)).abs().max() < 1e-9
    assert (_rk4(g, x, 5.0, 0.1) - g.flow(x, 5.0, 0.2)).abs().max() > 1e-3  # the comparison can fail
    for prob in (KernelProblem(2.0, center=0.5), KernelProblem(2.0, center=0.5, data_std=0.3)):
        assert (_rk4(prob, x, 3.0, 0.5) - prob.flow(x, 3.0, 0.5)).abs().max() < 1e-9
    pm = PointMass(torch.tensor([0.25, -0.5]))
    assert (_rk4(pm, x, 5.0, 0.1) - pm.flow(x, 5.0, 0.1)).abs().max() < 1e-9
    sig, c = constant_stiffness_sigmas(10.0, 64, 1.0)
    steps = sig[:-1] * (sig[:-1] - sig[1:])
    assert (steps - c).abs().max() < 1e-12 and abs(float(sig[-1]) - 1.0) < 1e-9
    q = normal_quantiles(64, 3)
    assert q.abs().max() < 2.7 and (q.sort(0).values[:, 0] == q.sort(0).values[:, 2]).all()


def test_mixture_marginal_and_product_moments_match_samples():
    prob = MixtureProblem(default_mixture(2))
    gen = torch.Generator().manual_seed(0)
    y = prob.sample(200_000, 0.5, gen)
    mean, cov = prob.marginal(0.5)
    assert (y.mean(0) - mean).abs().max() < 0.01 and (torch.cov(y.T) - cov).abs().max() < 0.01
    product = prob.product(torch.tensor([0.4, 0.3]), 0.6)
    z = product.sample(200_000, 0.0, gen)
    pm, pc = prob.product_moments(torch.tensor([0.4, 0.3]), 0.6)
    assert (z.mean(0) - pm).abs().max() < 0.01 and (torch.cov(z.T) - pc).abs().max() < 0.01
    assert (pm - prob.mixture.mean()).abs().max() > 0.05  # the product really moves the mean


# ------------------------------------------------------------------------------------------ measurements
def test_probe_moments_are_the_exact_ddim_eta_recursion_and_agree_with_monte_carlo():
    """DDIM eta = 1 on N(mu, s^2): e' = e (a + (sd / sigma)(1 - a)), V' = V (...)^2 + su^2,
    a = s^2 / (s^2 + sigma^2)."""
    model, sig = SingleGaussian(0.3, 0.4), ds.sigmas_karras(9, 0.02, 80.0)[:-1]
    v = 0.16 + 80.0 ** 2
    for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        sd, su = ds.ancestral_step(s, s_next, 1.0)
        a = 0.16 / (0.16 + s * s)
        v = v * (a + sd / s * (1 - a)) ** 2 + su ** 2
    mean, var, _ = probe_moments(from_solver(ds.DDIM(1.0)), model, sig, 0.16 + 80.0 ** 2)
    assert abs(var - v) < 1e-12 * v and abs(mean - 0.3) < 1e-12
    x = 0.3 + 80.0 * torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = from_solver(ds.DDIM(1.0)).run(model, x, sig, Noise(3, per_row=False)).x
    assert abs(y.var().item() - var) < 5 * var * math.sqrt(2 / 100_000)


@pytest.mark.parametrize("kind", ["diffsolve", "k-diffusion", "diffusers"])
def test_explicit_euler_stiff_bound_is_one_within_five_percent(kind):
    """x - c is multiplied by 1 - 2 sigma |dsigma| / lambda^2 per Euler step: bounded iff the ratio <= 1."""
    if kind == "diffusers":
        pytest.importorskip("diffusers")
        from diffusers import EulerDiscreteScheduler
        from diffsolve.integrations.scheduler_step import scheduler_sampler
        sampler = scheduler_sampler(EulerDiscreteScheduler)
    else:
        sampler = from_solver("euler") if kind == "diffsolve" else as_sampler(SAMPLING.sample_euler)
    bound, detail = stiff_bound(sampler, DEFAULT, "score")
    assert abs(bound - 1.0) < 0.05, (bound, detail)
    assert stiff_bound(from_solver("euler"), DEFAULT, "flow")[0] == math.inf  # the split face is not bounded by it


# ------------------------------------------------------------------------------------------ property tests
@PROPERTY
@given(sigmas=strat.schedules(max_steps=25))
def test_deterministic_samplers_are_exact_on_a_point_mass_for_every_schedule(sigmas):
    for sampler in ("heun", "dpmpp_2m", "uni_pc", SAMPLING.sample_lms):
        prop.assert_point_mass_exact(sampler, sigmas)
    prop.assert_finite("dpmpp_2m_sde", MixtureProblem(default_mixture(2)), 3 * normal_quantiles(4, 2), sigmas)


@PROPERTY
@given(mixture=strat.anisotropic_mixtures(), sizes=strat.batch_splits(), dtype=strat.dtypes(),
       sigmas=strat.schedules(families=["karras", "exponential"], max_steps=12))
def test_seeded_noise_makes_stochastic_samplers_batch_invariant(mixture, sizes, dtype, sigmas):
    for sampler in ("dpmpp_2m_sde", SAMPLING.sample_euler_ancestral):
        prop.assert_batch_split_invariant(sampler, mixture, sigmas, sizes, dtype)


@PROPERTY
@given(bandwidth=strat.bandwidths(), sigmas=strat.schedules(max_steps=20, zero=False))
def test_split_kernel_flow_is_exact_under_the_identity_denoiser(bandwidth, sigmas):
    for sampler in ("heun", "dpmpp_2m", "lms"):
        prop.assert_kernel_flow_exact(sampler, sigmas, bandwidth)


@PROPERTY
@given(scale=strat.guidance_scales())
def test_guidance_of_two_gaussians_is_the_guided_gaussian(scale):
    sigmas = ds.sigmas_karras(10, 0.02, 20.0)
    for sampler in ("dpmpp_2m", "euler_ancestral", SAMPLING.sample_heun):
        prop.assert_guidance_exact(sampler, scale, sigmas)


# ------------------------------------------------------------------------------------------ command and plugin
def _doc_block(tmp_path, mutate=False):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/samplers.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "class MyDPMpp2M" in b)
    if mutate:  # the second-order extrapolation to the quarter point instead of the midpoint: first order
        block = block.replace("/ (2 * r)", "/ (4 * r)")
        assert "(4 * r)" in block
    path = tmp_path / ("mutant_dpmpp.py" if mutate else "doc_dpmpp.py")
    path.write_text(block)
    return path


def test_diffsolve_check_on_the_docs_dpmpp_2m_and_on_a_mutant(tmp_path, capsys):
    from diffsolve_studies.cli import main
    out_json = tmp_path / "report.json"
    assert main(["check", f"{_doc_block(tmp_path)}:MyDPMpp2M", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    order = float(re.search(r"^order\s+pass\s+(\S+)\s+2\s*$", printed, flags=re.M).group(1))
    assert abs(order - 2) <= 0.2 and "all checks passed" in printed
    assert '"passed": true' in out_json.read_text()
    assert main(["check", f"{_doc_block(tmp_path, mutate=True)}:MyDPMpp2M"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: order" in captured.out and "failed check order" in captured.err
    with pytest.raises(SystemExit) as err:
        main(["check", f"{tmp_path / 'nowhere.py'}:X"])
    assert err.value.code == 2


def test_pytest_plugin_fixture_passes_and_fails_a_users_test(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import diffsolve as ds
        from diffsolve.testing import solver_mutants

        def test_heun(sampler_checks):
            report = sampler_checks(ds.Heun(), checks=["order", "nfe", "exactness"])
            assert report["order"].measured > 1.8

        def test_mutant(sampler_checks):
            sampler_checks(solver_mutants()["coefficient"][0], checks=["order"])
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "diffsolve.testing.pytest_plugin",
                          "-p", "no:cacheprovider", str(tmp_path / "test_user.py")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 failed, 1 passed" in run.stdout and "FAILED: order" in run.stdout, run.stdout[-2000:]


def test_hypothesis_is_imported_only_by_the_strategies():
    code = ("import sys, diffsolve, diffsolve.testing, diffsolve.testing.pytest_plugin; "
            "assert 'hypothesis' not in sys.modules, 'kit imported hypothesis'; "
            "import diffsolve.testing.strategies; assert 'hypothesis' in sys.modules; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


# ------------------------------------------------------------------------------------------ diffusers adapter
@pytest.mark.parametrize("name, twin, tol", [("DDIMScheduler", "ddim", 1e-5), ("EulerDiscreteScheduler", "euler", 1e-5),
                                             ("HeunDiscreteScheduler", "heun", 1e-5),
                                             ("DPMSolverMultistepScheduler", "dpmpp_2m", 1e-5)])
def test_scheduler_step_adapter_equals_the_diffsolve_twin(name, twin, tol):
    diffusers = pytest.importorskip("diffusers")
    from diffsolve.integrations.scheduler_step import scheduler_sampler
    sampler = scheduler_sampler(getattr(diffusers, name))
    model, x = MixtureProblem(default_mixture(2)), 10 * normal_quantiles(6, 2)
    for sig in (ds.sigmas_karras(12, 0.05, 10.0), ds.sigmas_karras(12, 0.05, 10.0)[:-1]):
        res = sampler.run(model, x, sig, Noise())
        grid = res.sigmas
        assert (grid.float() - sig.float()).abs().max() < 1e-5 * float(sig[0])  # the scheduler took the kit's grid
        ref = ds.sample(ds.get_solver(twin), model, x, grid, disable=True)
        assert (res.x - ref).abs().max() < tol, (name, (res.x - ref).abs().max())
        assert res.nfe == ds.sample(ds.get_solver(twin), model, x, grid, disable=True, return_info=True)[1].nfe


def test_the_docs_example_tests_a_sampler_in_ten_lines():
    block = re.findall(r"```python\n(.*?)```", (ROOT / "docs/testing.md").read_text(), flags=re.S)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) <= 10 and "assert_sampler" in block and "@given" in block, lines
