"""Mean-shift distillation (paper §3, eq. 5-15): grad = x - mean(y), y ~ p(y) G(x - y).

The exact mean-shift iterate for the kernel G = exp(-|u|^2 / lambda^2) is the posterior mean at
noise level s = lambda / sqrt(2): x' = D(x; s) (Tweedie). Three ways to sample / estimate it:
  - "kernel": the paper's chain. The solver runs from x + sigma_max n to 0 with the Gaussian-kernel
    term (explicit "score" face, eq. 12, or exact "split" face, eq. 14-15) centred on x.
  - "posterior": the reverse SDE started at z = x at sigma = s, which samples the product exactly with
    the exact denoiser, using only the steps below s; any reverse-SDE solver (drift 2: DDIM / ancestral
    eta = 1, DPM++ SDE eta = 1, ...).
  - "one_call": the expected gradient x - D(x; s) itself: one model call, zero variance.
"""
import inspect
import math
import warnings

import torch

from ..denoisers import append_dims
from ..sampling import Solver, sample
from ..schedules import sigmas_karras
from ..solvers import solver_factory
from ..solvers.function import FunctionSolver
from ..transforms import FLOWS, KERNEL_FACES, SPLITTINGS, GaussianKernel, LimitedInterval
from .base import Distiller, check_sigma_range, euler_inversion

__all__ = ["CENTERS", "ExplicitKernelWarning", "MSD", "SAMPLERS", "mean_shift_oracle"]


class ExplicitKernelWarning(UserWarning):
    """The explicit (score-face) kernel term meets a step where explicit Euler grows."""

SAMPLERS = ("kernel", "posterior", "one_call")
CENTERS = ("iterate", "noised", "inverted")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _solver(solver, eta):
    """A Solver from an instance, a registry name (`eta` goes to names whose factory takes it) or a
    k-diffusion-style sampler function (run interval by interval as a deterministic `FunctionSolver`)."""
    if isinstance(solver, Solver):
        return solver
    if callable(solver):
        return FunctionSolver(solver)
    factory = solver_factory(solver)
    try:
        return factory(**({"eta": eta} if "eta" in inspect.signature(factory).parameters else {}))
    except TypeError as err:
        raise ValueError(f"solver {solver!r} needs options of its own ({err}); pass a Solver instance") from None


def is_reverse_sde(solver):
    """True when `solver` is stochastic with drift 2 (eta = 1): the reverse SDE the posterior chain needs."""
    return solver.stochastic and abs(solver.drift([2.0, 1.0, 0.0], 0) - 2.0) < 1e-12


class MSD(Distiller):
    """Mean-shift distillation as a gradient provider (a drop-in for SDS).

    bandwidth: the paper's lambda (or the kernel's std with bandwidth_is="std"); set `self.bandwidth`
    between steps, pass `bandwidth=` to grad, or give `schedule(step, mean_shift_norm) -> lambda`, which
    `on_step` applies (see diffsolve.distill.bandwidth).
    solver: a `Solver`, a registry name ("ddim", "heun", "dpmpp_2m_sde", ...; `eta` goes to names that take it:
    the kernel chain's DDIM eta; the posterior chain needs the reverse SDE and uses eta = 1) or a
    k-diffusion-style function (e.g. `k_diffusion.sampling.sample_heun`), run interval by interval
    (`diffsolve.FunctionSolver`; wrap it yourself to declare it stochastic).
    n_samples: product samples averaged per point (eq. 10); the paper uses 1 on Stable Diffusion.
    center: "iterate" (x), "noised" (x + sigma n_c, fixed n_c per chain) or "inverted" (x carried up
    the grid by deterministic DDIM inversion), the §4.3 heuristic; taken at sigma_next per step.
    kernel_interval: (sigma_lo, sigma_hi) to apply the kernel only there (§3.4).
    When s = lambda / sqrt(2) exceeds sigma_max, the posterior / one-call estimators start at
    sigma_max (the product is then close to the prior there) and `self.clipped` says so.
    """

    name = "MSD"

    def __init__(self, model, bandwidth=0.316, *, sampler="kernel", steps=32, sigma_min=0.002, sigma_max=5.0,
                 rho=7.0, solver="ddim", eta=1.0, face="split", splitting="lie", flow="matched", n_samples=1,
                 center="iterate", kernel_interval=None, skip_tol=1e-6, bandwidth_is="lambda", schedule=None,
                 transforms=(), extra_args=None):
        super().__init__(model, transforms, extra_args)
        self.sampler, self.center = _choice("sampler", sampler, SAMPLERS), _choice("center", center, CENTERS)
        self.face, self.splitting = _choice("face", face, KERNEL_FACES), _choice("splitting", splitting, SPLITTINGS)
        self.flow, self.bandwidth_is = _choice("flow", flow, FLOWS), _choice("bandwidth_is", bandwidth_is,
                                                                             ("lambda", "std"))
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        check_sigma_range(sigma_min, sigma_max)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if kernel_interval is not None and not 0 <= kernel_interval[0] < kernel_interval[1]:
            raise ValueError(f"kernel_interval must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {kernel_interval}")
        self.bandwidth = self._check_bandwidth(bandwidth)
        self.solver = _solver(solver, 1.0 if sampler == "posterior" and isinstance(solver, str) else eta)
        if sampler == "posterior" and not is_reverse_sde(self.solver):
            raise ValueError(f"the posterior sampler is the reverse SDE: it needs a stochastic solver with eta = 1 "
                             f"(drift 2), got {self.solver!r}")
        if self.solver.own_grid:
            raise ValueError(f"{self.solver!r} runs only on the grid it builds itself; MSD's chains bring their own "
                             "sigmas: choose a fixed-grid solver")
        if sampler == "kernel" and face == "split" and not self.solver.applies_flows:
            raise ValueError(f"face='split' needs a solver that applies exact flows; {self.solver!r} does not")
        self.steps, self.sigma_min, self.sigma_max, self.rho = int(steps), sigma_min, sigma_max, rho
        self.eta, self.n_samples, self.kernel_interval, self.skip_tol = eta, int(n_samples), kernel_interval, skip_tol
        self.schedule = schedule
        self.clipped = False
        self.mean_shift_norm = None  # per-point |m| = |mean(y) - x| of the last grad call

    @staticmethod
    def _check_bandwidth(bandwidth):
        if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
        return float(bandwidth)

    def on_step(self, step, x=None, generator=None):
        """Apply the bandwidth schedule (if any) for this step, fed the last mean |m|."""
        super().on_step(step, x, generator)
        if self.schedule is not None:
            norm = None if self.mean_shift_norm is None else float(self.mean_shift_norm.mean())
            self.bandwidth = self._check_bandwidth(self.schedule(self.step, norm))

    def lam(self, bandwidth=None):
        b = self.bandwidth if bandwidth is None else self._check_bandwidth(bandwidth)
        return b * math.sqrt(2) if self.bandwidth_is == "std" else b

    def _grad(self, x, call, bandwidth=None):
        y = self._sample(x, call, bandwidth)
        m = y.mean(1) - x
        self.mean_shift_norm = m.flatten(1).norm(dim=1)
        return -m

    @torch.no_grad()
    def sample_product(self, x, generator=None, bandwidth=None, *, seed=None):
        """Samples y of the product density for each point: shape [B, N, ...] (N = 1 for one_call); not
        counted into `nfe`."""
        from .base import Call, Draws
        return self._sample(x, Call(self, x, Draws(generator, seed), None, None), bandwidth)

    def _sample(self, x, call, bandwidth):
        lam = self.lam(bandwidth)
        s = lam / math.sqrt(2)
        self.clipped = s > self.sigma_max
        if self.sampler == "one_call":
            d = call.denoiser()(x, min(s, self.sigma_max) * x.new_ones(x.shape[0]), **call.extra_args)
            return d.to(x.dtype)[:, None]
        n = self.n_samples
        xs = x.repeat_interleave(n, 0)
        draws = call.draws.repeated(n)
        if self.sampler == "posterior":
            top = min(s, self.sigma_max)
            sigmas = sigmas_karras(self.steps, self.sigma_min, top, self.rho) if top > self.sigma_min \
                else torch.tensor([top, 0.0], dtype=torch.float64)
            y, run = sample(self.solver, call.checked(self.model), xs.clone(), sigmas, call.extra(n), disable=True,
                            transforms=call.transforms, noise_sampler=draws.noise_sampler(xs), return_info=True,
                            check_finite=call.check_finite)
        else:
            y, run = self._kernel_chain(xs, lam, call, draws)
        call.run.info.nfe += run.nfe * n
        return y.reshape((x.shape[0], n) + x.shape[1:])

    def _kernel_chain(self, xs, lam, call, draws):
        sigmas = sigmas_karras(self.steps, self.sigma_min, self.sigma_max, self.rho)
        center = self._center(xs, sigmas, call, draws)
        kernel = GaussianKernel(center, lam, face=self.face, splitting=self.splitting, flow=self.flow)
        start = 0
        if self.face == "split" and self.kernel_interval is None and self.skip_tol > 0:
            drift = self.solver.drift([float(v) for v in sigmas], 0)
            start = min(kernel.first_useful_step(sigmas, drift, self.skip_tol), len(sigmas) - 2)
        sigmas = sigmas[start:]  # earlier steps contract z onto the centre: start there, skip their model calls
        z = kernel.center_at(float(sigmas[0]), xs).clone()
        if start == 0 and self.center == "iterate":  # the paper's start x + sigma_max n (a moving centre is noisy)
            z += float(sigmas[0]) * draws.randn(xs)
        term = kernel if self.kernel_interval is None else LimitedInterval(kernel, *self.kernel_interval)
        if self.face == "score":
            self._warn_explicit_growth(sigmas, lam)
        y, run = sample(self.solver, call.checked(self.model), z.clone(), sigmas, call.extra(self.n_samples),
                        disable=True, transforms=[*call.transforms, term], noise_sampler=draws.noise_sampler(z),
                        return_info=True, check_finite=call.check_finite)
        if self.face == "score":
            self._check_growth(xs, z, y)
        return y, run

    def _warn_explicit_growth(self, sigmas, lam):
        """Before work: explicit Euler multiplies z - c by 1 - 2 sigma |dsigma| / lambda^2 per step, which grows
        once sigma |dsigma| / lambda^2 > 1 (ignoring steps outside kernel_interval)."""
        sig = [float(v) for v in sigmas]
        lo, hi = self.kernel_interval or (0.0, math.inf)
        ratios = [(sig[i] * (sig[i] - sig[i + 1]) / lam ** 2, i) for i in range(len(sig) - 1) if lo < sig[i] <= hi]
        worst, i = max(ratios, default=(0.0, -1))
        if worst > 1:
            warnings.warn(f"MSD face='score': step {i} (sigma {sig[i]:.4g} -> {sig[i + 1]:.4g}) has sigma |dsigma| / "
                          f"lambda^2 = {worst:.3g} > 1 at lambda {lam:.4g}, where the explicit kernel term grows; "
                          "use face='split' (exact flow) or more steps", ExplicitKernelWarning, stacklevel=4)

    def _check_growth(self, xs, z0, y):
        """After the chain: samples far beyond where the chain started mean the explicit term grew."""
        start = (z0 - xs).flatten(1).norm(dim=1).max().item()
        scale = xs.flatten(1).norm(dim=1).max().item()
        reach = (y - xs).flatten(1).norm(dim=1).max().item()
        if not reach <= 10 * (start + scale + 1):
            raise ValueError(f"MSD face='score': the explicit kernel term grew the chain (samples {reach:.3g} from "
                             f"their points, which started {start:.3g} away); use face='split' or more steps")

    def _center(self, xs, sigmas, call, draws):
        if self.center == "iterate":
            return xs
        if self.center == "noised":
            n_c = draws.randn(xs)
            return lambda sigma: xs + append_dims(torch.as_tensor(sigma, dtype=xs.dtype, device=xs.device), xs.ndim) * n_c
        return self._inversion(xs, sigmas, call)

    def _inversion(self, xs, sigmas, call):
        """Deterministic DDIM (Euler) inversion of x up the grid; centre(sigma) looks the level up."""
        den = call.denoiser(batch=xs.shape[0] // self.n_samples)
        sig = [float(v) for v in sigmas]
        up = sig[-2::-1]  # ascending from the smallest positive sigma
        trajectory = dict(zip(up, euler_inversion(den, xs, up, call.extra(self.n_samples))))
        trajectory[sig[-1]] = xs

        def center(sigma):  # the solver evaluates every row at one sigma; Strang's midpoints take the nearest level
            level = float(torch.as_tensor(sigma).flatten()[0])
            return trajectory[min(trajectory, key=lambda k: abs(k - level))]
        return center


def mean_shift_oracle(density, x, bandwidth, bandwidth_is="lambda"):
    """The exact mean-shift gradient x - x' with x' = D(x; lambda / sqrt(2)) of an analytic density
    (e.g. a GaussianMixture): the truth that every estimator's bias and variance is measured against."""
    s = bandwidth / math.sqrt(2) if bandwidth_is == "lambda" else bandwidth
    return x - density.denoise(x, s).to(x.dtype)
