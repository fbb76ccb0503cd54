"""Accuracy checks: observed order (exact flow, or exact moments of the chain for stochastic samplers), exactness on
a point mass, agreement with a reference solution on a Gaussian mixture, and the stiff-kernel stability bounds of the
explicit score face and of the flow face. Each `check_<name>(sampler, config=None, **meta)` returns a `CheckReport`;
`assert_<name>` is its assertion form."""
import math

import torch

from .problems import (KernelProblem, MixtureProblem, PointMass, SingleGaussian, constant_stiffness_sigmas,
                       default_mixture, log_slope, normal_quantiles)
from .report import DEFAULT, CheckReport, asserting, karras, noise, realized
from .samplers import Noise, NotApplicable, as_sampler

__all__ = ["assert_agreement", "assert_exactness", "assert_order", "assert_stiff_flow", "assert_stiff_score",
           "check_agreement", "check_exactness", "check_order", "check_stiff_flow", "check_stiff_score",
           "check_weak_order", "is_stochastic", "probe_moments", "reference_solution", "stiff_bound"]

ORDER_MODEL = SingleGaussian(torch.tensor([0.2, -0.3, 0.5]), torch.tensor([0.3, 0.15, 0.6]))
WEAK_MODEL = SingleGaussian(0.3, 0.4)


def _setup(sampler, config, meta):
    return as_sampler(sampler, **meta), config or DEFAULT


def is_stochastic(sampler, cfg=DEFAULT):
    """Declared, else detected: the output changes with the noise seed (cached on the sampler)."""
    if sampler.stochastic is not None:
        return sampler.stochastic
    if getattr(sampler, "detected_stochastic", None) is None:
        x = ORDER_MODEL.start(2, 3, 10.0)
        sig = karras(8, 0.1, 10.0, zero=False)
        a = sampler.run(ORDER_MODEL, x, sig, Noise(1)).x
        b = sampler.run(ORDER_MODEL, x, sig, Noise(2)).x
        sampler.detected_stochastic = not torch.equal(a, b)
    return sampler.detected_stochastic


def _not_applicable(name, sampler, why, expected=None):
    return CheckReport(name, None, None, expected, why)


# ------------------------------------------------------------------------------------------------------- order
def check_order(sampler, config=None, **meta):
    """Observed global order. Deterministic: max error against the exact flow of the anisotropic single Gaussian
    (`SingleGaussian.flow`) over Karras grids of `order_ns` steps; least-squares slope of log error against log(1/N)
    over the last `order_fit` points above the sampler's rounding floor. Stochastic: the weak order of the chain's
    variance (`check_weak_order`). Passes at >= nominal order - tol (nominal unknown: >= 0.75, i.e. convergent)."""
    sampler, cfg = _setup(sampler, config, meta)
    if sampler.adaptive:
        return _not_applicable("order", sampler, "adaptive step size: its error follows its tolerance, not a grid",
                               sampler.order)
    if is_stochastic(sampler, cfg):
        return _weak_order(sampler, cfg)
    x0 = ORDER_MODEL.start(cfg.order_rows, 3, cfg.order_sigma_max)
    errors = []
    for n in cfg.order_ns:
        sig = karras(n, cfg.order_sigma_min, cfg.order_sigma_max, cfg.rho)
        res = sampler.run(ORDER_MODEL, x0, sig, noise(cfg))
        grid = realized(res, sig)
        exact = ORDER_MODEL.flow(x0, grid[0], grid[-1])
        errors.append((res.x - exact).abs().max().item())
    floor = 10 * sampler.precision * exact.abs().max().item()  # rounding of the sampler's arithmetic at the end
    return _fit("order", sampler, cfg.order_ns, errors, floor, cfg.order_fit, cfg.order_tol, 0.75,
                "deterministic: max |x - exact flow|, anisotropic Gaussian, Karras rho 7 on "
                f"[{cfg.order_sigma_min}, {cfg.order_sigma_max}] without a final 0")


def _fit(name, sampler, ns, errors, floor, fit, tol, unknown_min, how, se=None):
    text = ", ".join(f"N={n}: {e:.2e}" for n, e in zip(ns, errors))
    if not all(math.isfinite(e) for e in errors):
        return CheckReport(name, False, float("nan"), sampler.order, f"{how}; non-finite errors ({text})")
    keep = [(n, e) for i, (n, e) in enumerate(zip(ns, errors)) if e > floor and (se is None or e > se[i])]
    if len(keep) < 2:
        return CheckReport(name, True, "exact", sampler.order,
                           f"{how}; errors at or below the noise / rounding floor {floor:.1e} at every N ({text})")
    keep = keep[-fit:]
    slope = log_slope([n for n, _ in keep], [e for _, e in keep])
    expected = sampler.order
    passed = slope >= (expected - tol if expected is not None else unknown_min)
    note = "" if expected is None or slope <= expected + tol else f"; higher than the nominal {expected}"
    return CheckReport(name, bool(passed), round(slope, 3), expected,
                       f"{how}; slope over N = {[n for n, _ in keep]}{note}; errors {text}")


def probe_moments(sampler, model, sigmas, v0):
    """Exact (mean, variance, grid) of the sampler's output from x0 ~ N(mu, v0) on 1-D Gaussian data, by linear
    probes: with an affine denoiser every step is affine in x and in the noise, so y = b + A x0 + sum_k c_k xi_k.
    One run on 2 + K rows (K = the noise calls) gives b + A mu (row 0: x0 = mu, no noise), A (row 1: x0 = mu + 1) and
    each c_k (row 2 + k: unit noise at call k only); then E y = b + A mu, Var y = A^2 v0 + sum_k c_k^2. A third run
    with random x0 and noise verifies the affine form. None when the noise cannot be injected or the check fails."""
    mu = float(model.mu)
    calls = {"n": 0, "record": []}

    def factory(kind, rows_hit=None, gen=None):
        def make(x):
            def ns(sigma=None, sigma_next=None):
                k = calls["n"]
                calls["n"] += 1
                if kind == "unit":
                    z = torch.zeros_like(x)
                    if k < rows_hit:
                        z[2 + k] = 1.0
                    return z
                if kind == "random":
                    z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                    calls["record"].append(z)
                    return z
                return torch.zeros_like(x)
            return ns
        return make

    try:
        sampler.run(model, torch.full((2, 1), mu, dtype=torch.float64), sigmas, Noise(factory=factory("zero")))
        K = calls["n"]
        calls["n"] = 0
        x = torch.full((K + 2, 1), mu, dtype=torch.float64)
        x[1] += 1.0
        res = sampler.run(model, x, sigmas, Noise(factory=factory("unit", K)))
        if calls["n"] != K:
            return None
        y = res.x[:, 0].to(torch.float64)
        base, a, c = y[0], y[1] - y[0], y[2:] - y[0]
        calls["n"] = 0
        gen = torch.Generator().manual_seed(11)
        xr = mu + torch.randn(4, 1, generator=gen, dtype=torch.float64) * math.sqrt(v0)
        yr = sampler.run(model, xr, sigmas, Noise(factory=factory("random", gen=gen))).x[:, 0]
    except NotApplicable:
        return None
    xi = torch.stack([z[:, 0] for z in calls["record"]], 1) if calls["record"] else torch.zeros(4, 0)
    if xi.shape[1] != K:
        return None
    predicted = base + a * (xr[:, 0] - mu) + (xi * c).sum(1)
    if (predicted - yr).abs().max().item() > 1e-7 * (1 + yr.abs().max().item()):
        return None
    return base.item(), (a ** 2 * v0 + (c ** 2).sum()).item(), realized(res, sigmas)


def _mc_moments(sampler, model, sigmas, v0, samples, seed):
    """Sample (mean, variance, grid, se_mean, se_var) from `samples` Monte Carlo draws (one generator)."""
    g = torch.Generator().manual_seed(seed)
    x = float(model.mu) + math.sqrt(v0) * torch.randn(samples, 1, generator=g, dtype=torch.float64)
    res = sampler.run(model, x, sigmas, Noise(seed + 1, per_row=False))
    y = res.x[:, 0].to(torch.float64)
    m, v = y.mean().item(), y.var().item()
    return m, v, realized(res, sigmas), math.sqrt(v / samples), ((y - m) ** 2).std().item() / math.sqrt(samples)


def _weak_order(sampler, cfg):
    """Weak order of the variance of the chain against the exact marginal N(mu, s^2 + sigma_end^2) (1-D single
    Gaussian started from its marginal at sigma_max): exact moments by `probe_moments` where the kit can inject the
    noise, else Monte Carlo with `weak_samples` draws (points within weak_z standard errors of 0 are not fitted)."""
    model = WEAK_MODEL
    v0 = model.marginal(cfg.order_sigma_max)[1]
    errors, ses, how = [], [], "exact moments by linear probes"
    for n in cfg.weak_ns:
        sig = karras(n, cfg.order_sigma_min, cfg.order_sigma_max, cfg.rho)
        got = probe_moments(sampler, model, sig, v0)
        if got is None:
            m, v, grid, se_m, se_v = _mc_moments(sampler, model, sig, v0, cfg.weak_samples, cfg.seed + n)
            how = f"Monte Carlo, {cfg.weak_samples} draws"
            ses.append(cfg.weak_z * se_v)
        else:
            m, v, grid = got
            ses.append(0.0)
        errors.append(abs(v - model.marginal(grid[-1])[1]))
    return _fit("order", sampler, cfg.weak_ns, errors, 1e-12, cfg.order_fit, cfg.weak_tol, 0.5,
                f"stochastic: |variance - (s^2 + sigma^2)| of the chain, 1-D Gaussian, {how}", se=ses)


def check_weak_order(sampler, config=None, **meta):
    """The stochastic branch of `check_order`, for any sampler (deterministic ones measure the flow's order)."""
    sampler, cfg = _setup(sampler, config, meta)
    return _weak_order(sampler, cfg)


# --------------------------------------------------------------------------------------------------- exactness
def check_exactness(sampler, config=None, **meta):
    """Point-mass data (D = c): the flow c + (x0 - c) sigma / sigma0 is linear in sigma, and every consistent
    deterministic step reproduces it exactly (Euler / DDIM, Heun, DPM-Solver, Adams and UniPC combinations have
    weights summing to 1 on a constant D). Karras 12 steps with and without the final 0, and one step sigma_max -> 0;
    relative error <= max(exact_tol, 100 * precision)."""
    sampler, cfg = _setup(sampler, config, meta)
    if is_stochastic(sampler, cfg):
        return _not_applicable("exactness", sampler, "stochastic: no single-path exact answer (see order)")
    c = torch.tensor([0.25, -0.5], dtype=torch.float64)
    model = PointMass(c)
    x0 = c + cfg.order_sigma_max * normal_quantiles(4, 2)
    tol = max(cfg.exact_tol, 100 * sampler.precision)
    grids = {"Karras 12 + 0": karras(12, cfg.order_sigma_min, cfg.order_sigma_max, zero=True),
             "Karras 12, no 0": karras(12, cfg.order_sigma_min, cfg.order_sigma_max),
             "one step to 0": torch.tensor([cfg.order_sigma_max, 0.0], dtype=torch.float64)}
    worst, notes = 0.0, []
    for label, sig in grids.items():
        try:
            res = sampler.run(model, x0, sig, noise(cfg))
        except NotApplicable as e:
            notes.append(f"{label}: n/a ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - a crash on a valid grid is a finding, the other grids still run
            worst = float("inf")
            notes.append(f"{label}: raised {type(e).__name__}: {str(e)[:100]}")
            continue
        grid = realized(res, sig)
        err = (res.x - model.flow(x0, grid[0], grid[-1])).abs().max().item() / (x0 - c).abs().max().item()
        worst = max(worst, err) if math.isfinite(err) else float("inf")
        notes.append(f"{label}: {err:.1e}")
    return CheckReport("exactness", worst <= tol, worst, tol, "point mass, relative error; " + "; ".join(notes))


# --------------------------------------------------------------------------------------------------- agreement
_REFERENCES = {}


def reference_solution(model, x0, sigma_from, sigma_to, steps):
    """diffsolve's RK4 (`Odeint("rk4")`) over a Karras grid of `steps` steps: the reference for problems without a
    closed-form flow (cached per model, start and end)."""
    from ..odeint import Odeint
    from ..sampling import sample
    key = (id(model), float(sigma_from), float(sigma_to), steps, x0.shape, float(x0.sum()))
    if key not in _REFERENCES:
        sig = karras(steps, float(sigma_to), float(sigma_from), zero=False) if sigma_to > 0 else \
            karras(steps, 1e-3, float(sigma_from), zero=True)
        _REFERENCES[key] = sample(Odeint("rk4"), model, x0, sig, disable=True)
    return _REFERENCES[key]


_MIXTURES = {}


def _mixture(dim):
    if dim not in _MIXTURES:
        _MIXTURES[dim] = MixtureProblem(default_mixture(dim))
    return _MIXTURES[dim]


def check_agreement(sampler, config=None, **meta):
    """Agreement on a problem without a closed-form flow, the anisotropic 2-D Gaussian mixture. Deterministic: max
    |x - reference| at N = agree_steps / 4 and agree_steps Karras steps (reference: RK4 with `reference_steps`
    steps); passes when the error at agree_steps is <= agree_tol and still shrinking (observed order >= 0.25 between
    the two N, or already at the reference's accuracy). Stochastic: the sample mean and variance of `agree_samples`
    chains of `agree_stochastic_steps` steps (1-D mixture) against the exact marginal's, within
    agree_stochastic_tol (relative) plus weak_z standard errors."""
    sampler, cfg = _setup(sampler, config, meta)
    if is_stochastic(sampler, cfg):
        return _stochastic_agreement(sampler, cfg)
    prob = _mixture(2)
    x0 = prob.sample(32, cfg.order_sigma_max, torch.Generator().manual_seed(cfg.seed + 3))
    errors = []
    for n in (max(cfg.agree_steps // 4, 1), cfg.agree_steps):
        sig = karras(n, cfg.order_sigma_min, cfg.order_sigma_max, cfg.rho)
        res = sampler.run(prob, x0, sig, noise(cfg))
        grid = realized(res, sig)
        ref = reference_solution(prob, x0, grid[0], grid[-1], cfg.reference_steps)
        errors.append((res.x - ref).abs().max().item())
    coarse, fine = errors
    floor = max(1e-6, 1e4 * sampler.precision)
    slope = math.log(coarse / fine) / math.log(4) if fine > 0 and coarse > 0 else math.inf
    converging = slope >= 0.25 or fine <= floor or sampler.adaptive  # an adaptive error follows its tolerance
    ok = math.isfinite(fine) and fine <= cfg.agree_tol and converging
    return CheckReport("agreement", bool(ok), fine, cfg.agree_tol,
                       f"2-D mixture against RK4 at {cfg.reference_steps} steps: max error {coarse:.2e} at "
                       f"N={cfg.agree_steps // 4}, {fine:.2e} at N={cfg.agree_steps} (observed order {slope:.2f})")


def _stochastic_agreement(sampler, cfg):
    prob = _mixture(1)
    n = cfg.agree_samples
    x0 = prob.sample(n, cfg.order_sigma_max, torch.Generator().manual_seed(cfg.seed + 4))
    sig = karras(cfg.agree_stochastic_steps, cfg.order_sigma_min, cfg.order_sigma_max, cfg.rho)
    res = sampler.run(prob, x0, sig, Noise(cfg.seed + 5, per_row=False))
    grid = realized(res, sig)
    mean, cov = prob.marginal(grid[-1])
    y = res.x[:, 0].to(torch.float64)
    m, v = y.mean().item(), y.var().item()
    se_m, se_v = math.sqrt(v / n), ((y - m) ** 2).std().item() / math.sqrt(n)
    var = cov[0, 0].item()
    dm, dv = abs(m - mean[0].item()), abs(v - var)
    ok = (dm <= cfg.weak_z * se_m + cfg.agree_stochastic_tol * math.sqrt(var)
          and dv <= cfg.weak_z * se_v + cfg.agree_stochastic_tol * var)
    rel = max(dm / math.sqrt(var), dv / var)
    return CheckReport("agreement", bool(ok) and math.isfinite(rel), rel, cfg.agree_stochastic_tol,
                       f"1-D mixture, {n} chains of {cfg.agree_stochastic_steps} steps: mean {m:.4f} vs {mean[0]:.4f} "
                       f"(SE {se_m:.1e}), variance {v:.4f} vs {var:.4f} (SE {se_v:.1e}); measured = max relative error")


# ------------------------------------------------------------------------------------------------------- stiffness
def stiff_bound(sampler, cfg=DEFAULT, face="score"):
    """(bound, detail) of the largest per-step q = sigma |dsigma| / lambda^2 at which the kernel problem's error stays
    bounded (final |x - exact| <= stiff_growth * |x0 - c|), by bisection in log q on a constant-stiffness grid
    (`constant_stiffness_sigmas`); q is read off the grid the sampler really ran. face "score": the explicit kernel
    term in the denoiser (`KernelProblem`), any sampler; face "flow": the split face, the loop integrating the kernel
    exactly, with Gaussian data N(c, 0.3^2) for the model to integrate. Returns bound = None when even q_min is
    unbounded, inf when q_max is still bounded."""
    sig, c_step = constant_stiffness_sigmas(cfg.stiff_sigma_max, cfg.stiff_steps, cfg.stiff_sigma_end)
    x0 = cfg.stiff_scale * normal_quantiles(4, 2)

    def bounded(q):
        lam = math.sqrt(c_step / q)
        prob = KernelProblem(lam) if face == "score" else KernelProblem(lam, data_std=0.3)
        try:
            if face == "score":
                res = sampler.run(prob, x0, sig, noise(cfg))
            else:
                res = sampler.run(prob.model, x0, sig, noise(cfg), transforms=prob.transforms(x0))
        except (ValueError, FloatingPointError, RuntimeError) as e:
            if "finite" in str(e) or "nan" in str(e).lower():
                return False, q, float("inf")
            raise
        grid = realized(res, sig)
        err = (res.x - prob.flow(x0, grid[0], grid[-1])).abs().max().item() / x0.abs().max().item()
        steps = grid[:-1] * (grid[:-1] - grid[1:]).abs()
        q_real = steps.max().item() / lam ** 2
        return math.isfinite(err) and err <= cfg.stiff_growth, q_real, err

    ok, q_lo_real, err = bounded(cfg.stiff_q_min)
    if not ok:
        return None, f"unbounded already at q = {q_lo_real:.3g} (error {err:.2e})"
    ok, q_hi_real, err = bounded(cfg.stiff_q_max)
    if ok:
        return math.inf, f"bounded at every q up to {q_hi_real:.3g} (error {err:.2e} there)"
    lo, hi, best = math.log(cfg.stiff_q_min), math.log(cfg.stiff_q_max), q_lo_real
    for _ in range(cfg.stiff_iters):
        mid = 0.5 * (lo + hi)
        ok, q_real, _ = bounded(math.exp(mid))
        lo, hi = (mid, hi) if ok else (lo, mid)
        best = q_real if ok else best
    return best, f"bisection in log q, {cfg.stiff_iters} steps; constant sigma|dsigma| = {c_step:.4g} over " \
                 f"{cfg.stiff_steps} steps, sigma {cfg.stiff_sigma_max} -> {cfg.stiff_sigma_end}"


def _stiff_report(name, sampler, cfg, face):
    if sampler.adaptive or sampler.grid != "any":
        return _not_applicable(name, sampler, "runs its own grid: the per-step stiffness is not the kit's")
    bound, detail = stiff_bound(sampler, cfg, face)
    if face == "score":
        return CheckReport(name, bound is not None, bound if bound is not None else 0.0, f">= {cfg.stiff_q_min}",
                           f"explicit kernel term; {detail}")
    return CheckReport(name, bound == math.inf, bound if bound is not None else 0.0, math.inf,
                       f"split face (exact kernel flow); {detail}")


def check_stiff_score(sampler, config=None, **meta):
    """Stability bound of the explicit score face (the kernel term inside the denoiser); explicit Euler's theory is
    exactly 1. Passes when the sampler is stable for small enough stiffness (bound >= stiff_q_min)."""
    sampler, cfg = _setup(sampler, config, meta)
    return _stiff_report("stiff_score", sampler, cfg, "score")


def check_stiff_flow(sampler, config=None, **meta):
    """Stability of the flow face (split kernel, integrated exactly by the loop): bounded at every stiffness up to
    stiff_q_max; n/a for samplers that cannot apply split flows (k-diffusion, diffusers)."""
    sampler, cfg = _setup(sampler, config, meta)
    if not sampler.flows:
        return _not_applicable("stiff_flow", sampler, "cannot apply split-face flows", math.inf)
    return _stiff_report("stiff_flow", sampler, cfg, "flow")


assert_order = asserting(check_order)
assert_exactness = asserting(check_exactness)
assert_agreement = asserting(check_agreement)
assert_stiff_score = asserting(check_stiff_score)
assert_stiff_flow = asserting(check_stiff_flow)
