"""Every guidance method at its neutral setting reproduces the plain sampler (1e-10) and differs otherwise, under
every solver of the registry and inside SDS, MSD, VSD and SDI; CFG++ runs on the solvers that split data and noise
and is refused elsewhere; the methods compose with limited_interval and the kernel term; the per-run state (APG's
momentum, CFG-Zero*'s counter) is reset at every call and per row."""
import inspect
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.distill import make_distiller

torch.set_num_threads(1)

SHAPE = (2, 2, 8, 8)  # 8 x 8: two Laplacian-pyramid levels for frequency-decoupled guidance
PATTERN = torch.linspace(-1.0, 1.0, math.prod(SHAPE[1:]), dtype=torch.float64).reshape(SHAPE[1:])
PATTERN = PATTERN * torch.cos(3 * PATTERN)
U, NEG, MID = {"c": torch.zeros(2, dtype=torch.float64)}, {"c": -torch.ones(2, dtype=torch.float64)}, \
    {"c": 0.5 * torch.ones(2, dtype=torch.float64)}
COND = {"c": torch.tensor([1.0, 0.7], dtype=torch.float64)}


def model(x, sigma, c):
    """A conditional denoiser in [-0.9, 0.9]: the tanh of a Gaussian posterior mean around c * PATTERN."""
    s = ds.append_dims(ds.sigma_rows(sigma, x), x.ndim)
    mu = ds.append_dims(c, x.ndim) * PATTERN
    return 0.9 * torch.tanh(mu + 0.5 / (0.5 + s * s) * (x - mu))


def _cases():
    """name -> make(neutral) -> (transforms, the plain run's transforms, the plain run's extra_args)."""
    g = ds.guidance
    cfg4 = ds.cfg(4.0, U)
    return {
        "cfg_rescale": lambda n: ([g.cfg_rescale(1.0 if n else 3.0, U, guidance_rescale=0.7)], [], COND),
        "apg": lambda n: ([g.apg(1.0 if n else 3.0, U, momentum=0.5, norm_threshold=2.0, eta=0.5)], [], COND),
        "cfg_zero_star": lambda n: ([g.cfg_zero_star(1.0 if n else 3.0, U, zero_init_steps=0 if n else 1)], [], COND),
        "tangential": lambda n: ([g.tangential_cfg(1.0 if n else 3.0, U)], [], COND),
        "magnitude_aware": lambda n: ([g.magnitude_aware(1.0 if n else 3.0, U, alpha=2.0)], [], COND),
        "frequency_decoupled": lambda n: ([g.frequency_decoupled([1.0, 1.0] if n else [4.0, 2.0], U,
                                                                 parallel_weights=0.5)], [], COND),
        "perp_neg": lambda n: ([g.perp_neg(1.0 if n else 3.0, NEG, U, neg_scale=0.0 if n else 1.0)], [], COND),
        "dual_cfg": lambda n: ([g.dual_cfg(1.0 if n else 3.0, 1.0 if n else 2.0, MID, U)], [], COND),
        "dual_cfg_nested": lambda n: ([g.dual_cfg(1.0 if n else 3.0, 1.0 if n else 2.0, MID, U, style="nested")],
                                      [], COND),
        "cfg_norm": lambda n: ([g.cfg_norm(1.0 if n else 3.0, U)], [], COND),
        # predictions within [-1, 1] are left alone; CFG at 4 leaves that range and is thresholded
        "dynamic_thresholding": lambda n: ([g.dynamic_thresholding(0.9)] if n else [cfg4, g.dynamic_thresholding(0.9)],
                                           [] if n else [cfg4], COND),
        # lambda = 0 is the unconditional sampler
        "cfg_pp": lambda n: ([g.cfg_pp(0.0 if n else 0.6, U)], [], U if n else COND),
    }


CASES = _cases()


SIGMAS = ds.sigmas_karras(4, 0.1, 5.0)
# the solvers that build their own grid get one of their own
OWN_GRID = {"dpm_fast": (lambda: ds.get_solver("dpm_fast", n=4), ds.dpm_fast_sigmas(0.1, 5.0, 4)),
            "dpm_adaptive": (lambda: ds.get_solver("dpm_adaptive", rtol=0.05, atol=0.01),
                             torch.tensor([5.0, 0.1], dtype=torch.float64))}


def _solvers():
    out, grids = {}, {}
    for name, factory in sorted(ds.SOLVERS.items()):
        if name in OWN_GRID:
            out[name], grids[name] = OWN_GRID[name][0](), OWN_GRID[name][1]
            continue
        solver = factory()
        assert not solver.own_grid, f"{name} builds its own grid: give it one in OWN_GRID"
        out[name], grids[name] = solver, SIGMAS
    return out, grids


SOLVERS, GRIDS = _solvers()


def _run(solver, transforms, extra_args, x):
    return ds.sample(solver, model, x, GRIDS[solver.name] if solver.name in OWN_GRID else SIGMAS,
                     extra_args=extra_args, transforms=transforms, generator=torch.Generator().manual_seed(3))


def _x():
    return 5.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_every_registered_solver_is_covered():
    assert {"euler", "ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral", "heun", "uni_pc"} <= set(SOLVERS)
    assert len(SOLVERS) >= 20 and set(SOLVERS) == set(ds.SOLVERS)


@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_neutral_setting_reproduces_the_plain_sampler_and_differs_otherwise(solver_name, case):
    solver, x = SOLVERS[solver_name], _x()
    transforms, _, _ = CASES[case](True)
    if any(t.renoises_with_uncond for t in transforms) and not solver.splits_data_noise:
        with pytest.raises(ValueError, match="CFG\\+\\+.*splits data and noise"):
            _run(solver, transforms, COND, x)
        return
    for neutral in (True, False):
        transforms, plain, extra = CASES[case](neutral)
        ref = _run(solver, plain, extra, x)
        out = _run(solver, transforms, COND, x)
        err = (out - ref).abs().max().item()
        if neutral:
            assert err < 1e-10, (solver_name, case, err)
        else:
            assert err > 1e-4, (solver_name, case, err)


def test_cfg_pp_runs_on_exactly_the_splitting_solvers():
    assert {n for n, s in SOLVERS.items() if s.splits_data_noise} >= {"euler", "ddim", "euler_ancestral",
                                                                      "dpmpp_2m", "dpmpp_2s_ancestral"}


# distillers ---------------------------------------------------------------------------------------------------
def _distillers():
    common = dict(extra_args=COND)
    return {
        "sds": make_distiller("sds", model, **common),
        "msd": make_distiller("msd", model, bandwidth=2.0, steps=4, **common),
        "vsd": make_distiller("vsd", model, variational=lambda x, sigma, **kw: model(x, sigma, c=0.3 * COND["c"]),
                              **common),
        "sdi": make_distiller("sdi", model, n_inversion=3, **common),
    }


DISTILLERS = _distillers()


@pytest.mark.parametrize("method", sorted(DISTILLERS))
@pytest.mark.parametrize("case", sorted(set(CASES) - {"cfg_pp"}))
def test_neutral_setting_inside_every_distiller(method, case):
    dist = DISTILLERS[method]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for neutral in (True, False):
        transforms, plain, _ = CASES[case](neutral)
        ref = dist.grad(x, torch.Generator().manual_seed(7), transforms=plain)
        out = dist.grad(x, torch.Generator().manual_seed(7), transforms=transforms)
        err = (out - ref).abs().max().item()
        if neutral:
            assert err < 1e-10, (method, case, err)
        else:
            assert err > 1e-6, (method, case, err)


# composition --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(set(CASES) - {"dynamic_thresholding", "cfg_pp"}))
def test_limited_interval_applies_the_method_inside_only(case):
    """Inside (lo, hi] the method acts; outside the step is the plain one. With the interval covering no
    evaluation the run is the plain sampler; with all of them it is the method's run."""
    x, solver = _x(), SOLVERS["dpmpp_2m"]
    method, _, _ = CASES[case](False)
    full = _run(solver, method, COND, x)
    plain = _run(solver, [], COND, x)
    none = _run(solver, [ds.limited_interval(method[0], 100.0, 200.0)], COND, x)
    every = _run(solver, [ds.limited_interval(method[0], 0.0, 10.0)], COND, x)
    part = _run(solver, [ds.limited_interval(method[0], 1.0, 10.0)], COND, x)
    assert (none - plain).abs().max() < 1e-12
    assert (every - full).abs().max() < 1e-12
    assert min((part - plain).abs().max(), (part - full).abs().max()) > 1e-6


def test_cfg_pp_inside_limited_interval_renoises_only_where_active():
    """Outside the interval the step has no unconditional prediction and renoises with D itself."""
    x, solver = _x(), SOLVERS["ddim"]
    inner = ds.guidance.cfg_pp(0.6, U)
    plain = _run(solver, [], COND, x)
    none = _run(solver, [ds.limited_interval(inner, 100.0, 200.0)], COND, x)
    every = _run(solver, [ds.limited_interval(inner, 0.0, 10.0)], COND, x)
    assert (none - plain).abs().max() < 1e-12
    assert (every - _run(solver, [inner], COND, x)).abs().max() < 1e-12


@pytest.mark.parametrize("case", ["apg", "tangential", "perp_neg", "cfg_zero_star"])
@pytest.mark.parametrize("face", ["score", "split"])
def test_methods_compose_with_the_kernel_term(case, face):
    """The kernel's score face adds sigma**2 * 2 (c - z) / lambda**2 to whatever the method returns; its split face
    leaves the denoiser alone. Checked against the method alone plus the kernel term written out."""
    x, lam = _x(), 1.5
    center = 0.3 * torch.ones(SHAPE, dtype=torch.float64)
    method, _, _ = CASES[case](False)
    kernel = ds.gaussian_kernel(center, lam, face=face)
    run = ds.Run(SHAPE[0])
    den, _ = ds.compose(model, [*method, kernel], run)
    ref_run = ds.Run(SHAPE[0])
    alone, _ = ds.compose(model, method, ref_run)
    sigma = torch.tensor([2.0, 0.5], dtype=torch.float64)
    got, want = den(x, sigma, **COND), alone(x, sigma, **COND)
    if face == "score":
        want = want + ds.append_dims(sigma ** 2, x.ndim) * 2 * (center - x) / lam ** 2
    assert (got - want).abs().max() < 1e-12
    # and inside a sampling run with the split face under every-step flows
    out = _run(SOLVERS["ddim"], [*method, ds.gaussian_kernel(center, lam, face="split")], COND, x)
    assert torch.isfinite(out).all()
    assert (out - _run(SOLVERS["ddim"], method, COND, x)).abs().max() > 1e-3


# per-run state ------------------------------------------------------------------------------------------------
STATEFUL = {
    "apg": lambda: ds.guidance.apg(3.0, U, momentum=0.7, norm_threshold=0.0, eta=0.5),
    "cfg_zero_star": lambda: ds.guidance.cfg_zero_star(3.0, U, zero_init_steps=2),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize("solver_name", ["ddim", "dpmpp_2m", "heun"])
def test_state_is_reset_per_call_and_kept_per_row(name, solver_name):
    solver, x = SOLVERS[solver_name], _x()
    t = STATEFUL[name]()
    first, second = _run(solver, [t], COND, x), _run(solver, [t], COND, x)  # one object, two calls
    fresh = _run(solver, [STATEFUL[name]()], COND, x)
    assert torch.equal(first, second) and torch.equal(first, fresh)
    # each row alone (its own condition and unconditional rows) gives that row of the batch
    uncond_rows = [{"c": U["c"][i:i + 1]} for i in range(2)]
    rows = torch.cat([ds.sample(solver, model, x[i:i + 1], SIGMAS, extra_args={"c": COND["c"][i:i + 1]},
                                transforms=[type(t)(3.0, uncond=uncond_rows[i], **_kw(t))],
                                generator=torch.Generator().manual_seed(3)) for i in range(2)])
    if not solver.stochastic:
        assert (rows - first).abs().max() < 1e-12
    # the state is really used: the stateless version differs
    stateless = {"apg": lambda: ds.guidance.apg(3.0, U, momentum=0.0, eta=0.5),
                 "cfg_zero_star": lambda: ds.guidance.cfg_zero_star(3.0, U, zero_init_steps=0)}[name]()
    assert (first - _run(solver, [stateless], COND, x)).abs().max() > 1e-4


def _kw(t):
    if isinstance(t, ds.guidance.AdaptiveProjectedGuidance):
        return dict(momentum=t.momentum, norm_threshold=t.norm_threshold, eta=t.eta)
    return dict(zero_init_steps=t.zero_init_steps)


def test_state_lives_in_the_run():
    t = STATEFUL["apg"]()
    run = ds.Run(2)
    den, _ = ds.compose(model, [t], run)
    assert t in run.state and run.state[t]["running"] is None
    den(_x(), 2.0, **COND)
    assert run.state[t]["running"].shape == SHAPE
    other = ds.Run(2)
    ds.compose(model, [t], other)
    assert other.state[t]["running"] is None  # a new run starts from nothing
    z = ds.guidance.cfg_zero_star(3.0, U, zero_init_steps=1)
    run = ds.Run(2)
    den, _ = ds.compose(model, [z], run)
    x = _x()
    first = den(x, 2.0, **COND)
    assert torch.allclose(first, x)  # zero eps: D = x
    assert run.state[z]["evaluations"] == 1
    assert not torch.allclose(den(x, 2.0, **COND), x)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_is_per_gradient_inside_distillers(name):
    """A distiller makes a fresh Run per gradient: the same transform gives the same gradient twice."""
    t = STATEFUL[name]()
    dist = make_distiller("msd", model, bandwidth=2.0, steps=4, extra_args=COND, transforms=[t])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = dist.grad(x, torch.Generator().manual_seed(7))
    b = dist.grad(x, torch.Generator().manual_seed(7))
    c = make_distiller("msd", model, bandwidth=2.0, steps=4, extra_args=COND,
                       transforms=[STATEFUL[name]()]).grad(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_signature_defaults_are_documented_spaces():
    g = ds.guidance
    for cls, space in [(g.RescaledCFG, "eps"), (g.AdaptiveProjectedGuidance, "eps"), (g.CFGZeroStar, "eps"),
                       (g.TangentialCFG, "eps"), (g.MagnitudeAwareGuidance, "eps"),
                       (g.FrequencyDecoupledGuidance, "eps"), (g.CFGNorm, "x0")]:
        assert cls.default_space == space
    assert inspect.signature(g.PerpNeg).parameters["space"].default == "x0"


def test_a_condition_held_by_the_model_is_not_batched_against_an_override():
    """A prompt fixed inside the denoiser (not passed per call) with an unconditional override: batching would
    give both halves the override (the guided result would be the unconditional one); `predict_under` evaluates
    the sets separately instead, for CFG and every method built on it, at the same counted cost."""
    import diffsolve as ds
    from diffsolve.transforms import predict_under

    def model(x, sigma, prompt=None):
        p = torch.ones_like(x) if prompt is None else prompt
        return x * 0.5 + p

    x = torch.randn(3, 2, dtype=torch.float64)
    neg = torch.zeros(1, 2, dtype=torch.float64)
    d_u, d_c = predict_under(model, x, 1.0, {}, [{"prompt": neg}, {}])
    assert torch.equal(d_u, model(x, 1.0, prompt=neg)) and torch.equal(d_c, model(x, 1.0))
    for t in (ds.cfg(3.0, {"prompt": neg}), ds.guidance.cfg_rescale(3.0, {"prompt": neg}),
              ds.guidance.apg(3.0, {"prompt": neg})):
        guided, _ = ds.transforms.compose(model, [t])
        unbatched = type(t).__new__(type(t))
        unbatched.__dict__.update({**t.__dict__, "batched": False})
        ref, _ = ds.transforms.compose(model, [unbatched])
        assert torch.allclose(guided(x, torch.ones(3, dtype=torch.float64)), ref(x, torch.ones(3, dtype=torch.float64)),
                              atol=1e-12), t
    # with the key given on both sides the sets still share one call of twice the batch
    calls = []
    counted = lambda x, sigma, **c: calls.append(x.shape[0]) or model(x, sigma, **c)  # noqa: E731
    predict_under(counted, x, 1.0, {"prompt": torch.ones(1, 2, dtype=torch.float64)}, [{"prompt": neg}, {}])
    assert calls == [6]
