"""The one sampling loop and the step contract every solver implements.

A solver is a small `Solver` subclass, torchdiffeq's shape: what it declares (order, stochastic or not,
the history it keeps, how its drift scales the score) and a `step(s)` that takes a `Step` and returns x at
`s.sigma_next`. `sample(solver, model, x, sigmas, ...)` gives every solver the rest:

  - validated inputs and k-diffusion's calling convention (`extra_args`, `callback`, `disable`);
  - the transforms, composed once per call, and model evaluations counted (NFE);
  - the exact flows of split terms (`diffsolve.transforms.Flow`): Lie after the step, Strang in two halves
    around it, each told the drift the step really applied (`Solver.drift`). A multistep solver's stored
    points (`Step.history`) are carried through the same affine flows, so its history keeps describing
    the trajectory. For a solver whose model evaluations all sit at its steps' start points
    (`evaluates_at_start`: Euler, DDIM, the multistep methods) every flow is applied after the step: with the
    history carried this is the integrating-factor (Lawson) form of the method, which keeps the method's
    own order with no splitting error, whereas Strang's first half-flow would move the evaluation point off
    the frame of its sigma and make a multistep method first order (measured in docs/samplers.md).
    Multi-stage steps (Heun, DPM-2, Runge-Kutta) get Strang's halves;
  - `step_hook(i, sigma, sigma_next, x)` that may return a new x, a finiteness check naming the step;
  - explicit noise: a `noise_sampler(sigma, sigma_next)` or draws from one `generator`.

Per-run state (counts, history, the transforms' state) lives in the call; solvers keep none.

sigma = inf as the first grid value (rectified-flow grids that start at t = 1, diffsolve/flow_matching.py): the
state x then holds the unit noise n = lim x / sigma and the denoiser is called with sigma = inf. Unless the solver
declares `infinite_start` (its step takes that point itself, e.g. `FlowTime`), the loop takes the first step as
the exact limit of every solver's step, x' = D(x, inf) + sigma' x (the ODE's, deterministic; one model call; not
stored in the history), and hands the solver the rest of the grid, sigmas[1:] (callback / step_hook keep the full
grid's step numbers). Transforms with exact flows are refused on such a grid.
"""
import math

import torch
from tqdm.auto import trange

from ._checks import check_finite_step, check_like, check_sigmas
from .noise import gaussian_noise
from .transforms import Run, SampleInfo, compose

__all__ = ["Past", "Run", "SampleInfo", "Solver", "Step", "run_denoiser", "sample", "strang_midpoint"]


class Past:
    """An earlier step as a multistep solver sees it: the sigma of its first model evaluation, the point
    and the denoised prediction there, both carried through every flow applied since."""

    __slots__ = ("sigma", "x", "denoised")

    def __init__(self, sigma, x, denoised):
        self.sigma, self.x, self.denoised = sigma, x, denoised


class Solver:
    """What a solver declares, and its step.

    order: nominal global order on smooth problems. stochastic: the step draws noise (`Step.noise`).
    history: how many earlier steps (`Past` records) the step reads. applies_flows: False makes the loop
    refuse transforms with exact flows (e.g. an adaptive solver whose sub-steps the loop cannot see).
    absorbs_flows: True hands the flows to the step (`Step.flows`) instead of applying them (a
    kernel-exact integrator). splits_data_noise: the step separates the data and noise parts of its update,
    so it can renoise with `Step.noise_direction` (what CFG++ needs).
    """

    name = "solver"
    order = 1
    stochastic = False
    history = 0
    applies_flows = True
    absorbs_flows = False
    splits_data_noise = False
    evaluates_at_start = False
    own_grid = False
    infinite_start = False  # True: step() takes a grid starting at sigma = inf itself (see the module docstring)

    def drift(self, sigmas, i):
        """Factor by which step i's drift on the score exceeds the probability-flow ODE's over
        [sigmas[i], sigmas[i + 1]] (1 for an ODE step); split flows with a matched drift use it."""
        return 1.0

    def step(self, s):
        """Return x at s.sigma_next from s.x at s.sigma."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Step:
    """What a solver's step sees: `i`, `sigma`, `sigma_next`, `sigmas` (the whole grid, floats), `x`,
    `history` (earlier `Past` records, oldest first), `denoise(x, sigma)`, `noise(sigma, sigma_next)`,
    `noise_direction(denoised)` and, for solvers that absorb them, `flows` and `drift`."""

    __slots__ = ("i", "sigma", "sigma_next", "sigmas", "x", "history", "flows", "drift", "first",
                 "_den", "_noise", "_run", "_renoise")

    def __init__(self, i, sigmas, x, history, den, noise, run, renoise, flows=(), drift=1.0):
        self.i, self.sigmas, self.x, self.history = i, sigmas, x, history
        self.sigma, self.sigma_next = sigmas[i], sigmas[i + 1]
        self.flows, self.drift, self.first = flows, drift, None
        self._den, self._noise, self._run, self._renoise = den, noise, run, renoise

    def denoise(self, x, sigma):
        """D(x, sigma) with the run's transforms, counted, in x's dtype; sigma a number or a [B] tensor.
        The first call of a step is what the callback and the history record."""
        self._run.uncond = None
        d = self._den(x, sigma)
        if d.shape != x.shape:
            raise ValueError(f"the denoiser returned shape {tuple(d.shape)} for x of shape {tuple(x.shape)} "
                             f"(step {self.i}, sigma {float(torch.as_tensor(sigma).flatten()[0]):.6g})")
        d = d if d.dtype == x.dtype else d.to(x.dtype)
        if self.first is None:
            self.first = Past(float(sigma) if not isinstance(sigma, torch.Tensor) else float(sigma.flatten()[0]),
                              x, d)
        return d

    def noise(self, sigma=None, sigma_next=None):
        """Standard normal noise like x from the run's noise sampler (for the step's interval by default)."""
        return self._noise(self.sigma if sigma is None else sigma, self.sigma_next if sigma_next is None else sigma_next)

    def noise_direction(self, denoised):
        """The denoised prediction whose noise (x - D) / sigma a step that splits data and noise renoises
        with: the unconditional one of the latest evaluation when a transform asks for it (CFG++), else
        `denoised` itself."""
        u = self._run.uncond
        return u.to(denoised.dtype) if self._renoise and u is not None else denoised


def run_denoiser(model, transforms, run):
    """`model` with `transforms` composed on it for one `run`, every evaluation (the guidance models'
    included) counted into `run.info.nfe`; returns (denoiser, flows)."""
    return compose(run.count(model), transforms, run)


def strang_midpoint(sigma, sigma_next):
    """Midpoint in time t = sigma**2, where Strang splitting applies its first half-flow."""
    return math.sqrt(0.5 * (sigma ** 2 + sigma_next ** 2))


def _check_inputs(solver, x, extra_args):
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be a diffsolve Solver, got {solver!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not torch.isfinite(x.sum()):
        raise ValueError("x contains NaN or inf before the first step")
    extra_args = {} if extra_args is None else extra_args
    for key, value in extra_args.items():
        check_like(x, value, f"extra_args[{key!r}]")
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"extra_args[{key!r}] has batch {value.shape[0]} but x has batch {x.shape[0]}")
    return extra_args


def _flow(flows, x, sigma, sigma_next, drift):
    for f in flows:
        x = f.apply(x, sigma, sigma_next, drift)
    return x


def _carry(flows, x, history, sigma, sigma_next, drift):
    """x and every stored point through the same flows."""
    if not flows:
        return x, history
    history = tuple(Past(p.sigma, _flow(flows, p.x, sigma, sigma_next, drift),
                         _flow(flows, p.denoised, sigma, sigma_next, drift)) for p in history)
    return _flow(flows, x, sigma, sigma_next, drift), history


class _LimitStep(Solver):
    """The exact first step from sigma = inf, where x holds n: x' = D(x, inf) + sigma' x."""

    name = "limit_from_infinity"

    def step(self, s):
        return s.denoise(s.x, s.sigma) + s.sigma_next * s.x


_LIMIT = _LimitStep()


@torch.no_grad()
def sample(solver, model, x, sigmas, extra_args=None, callback=None, disable=None, *, transforms=(),
           generator=None, noise_sampler=None, step_hook=None, check_finite=True, return_info=False):
    """Run `solver` over `sigmas` (descending) from x; see the module docstring for what the loop adds.

    callback: k-diffusion's, called after each step with {"x", "i", "sigma", "sigma_hat", "denoised",
    "nfe"} (x and sigma_hat where the step first evaluated the model). Returns x, or (x, SampleInfo)."""
    extra_args = _check_inputs(solver, x, extra_args)
    sig = [float(s) for s in check_sigmas(sigmas, infinite_start=True)]
    run = Run(x.shape[0])
    denoiser, flows = run_denoiser(model, transforms, run)
    if flows and not solver.applies_flows:
        raise ValueError(f"{solver!r} cannot apply exact flows (split faces); use face='score' or another solver")
    if flows and math.isinf(sig[0]):
        raise ValueError("a grid starting at sigma = inf cannot carry exact flows (split faces); use face='score'")
    renoise = any(t.renoises_with_uncond for t in transforms)
    if renoise and not solver.splits_data_noise:
        raise ValueError(f"a transform renoises with the unconditional prediction (CFG++), which needs a step "
                         f"that splits data and noise; {solver!r} does not")
    noise = noise_sampler if noise_sampler is not None else gaussian_noise(x, generator)
    absorbed = flows if solver.absorbs_flows else ()
    applied = () if solver.absorbs_flows else flows
    lie = [f for f in applied if f.splitting == "lie" or solver.evaluates_at_start]
    strang = [f for f in applied if f.splitting == "strang" and not solver.evaluates_at_start]
    rows = x.new_ones([x.shape[0]])

    def den(z, sigma):
        return denoiser(z, sigma * rows if not isinstance(sigma, torch.Tensor) else sigma, **extra_args)

    history, keep = (), solver.history
    limit = math.isinf(sig[0]) and not solver.infinite_start
    full, sig = sig, sig[1:] if limit else sig
    for i in trange(len(full) - 1, disable=disable):
        sigma, sigma_next = full[i], full[i + 1]
        if limit and i == 0:
            s = Step(0, full, x, (), den, noise, run, False)
            x = _LIMIT.step(s)
        else:
            j = i - 1 if limit else i  # the step's index in the grid the solver sees
            drift = solver.drift(sig, j) if applied or absorbed else 1.0
            if strang:
                mid = strang_midpoint(sigma, sigma_next)
                x, history = _carry(strang, x, history, sigma, mid, drift)
            s = Step(j, sig, x, history, den, noise, run, renoise, absorbed, drift)
            x = solver.step(s)
        first = s.first
        if callback is not None:
            callback({"x": first.x if first else s.x, "i": i, "sigma": sigma,
                      "sigma_hat": first.sigma if first else sigma, "denoised": first.denoised if first else None,
                      "nfe": run.info.nfe})
        if limit and i == 0:
            first = None  # the limit step is not part of the solver's history
        if keep:
            history = (history + ((first,) if first is not None else ()))[-keep:]
        x, history = _carry(lie, x, history, sigma, sigma_next, 1.0 if limit and i == 0 else drift)
        if strang:
            x, history = _carry(strang, x, history, mid, sigma_next, drift)
        if step_hook is not None:
            new = step_hook(i, sigma, sigma_next, x)
            x = x if new is None else new
        if check_finite and not math.isfinite(x.sum().item()):  # one reduction + one host read per step
            check_finite_step(x, i, sigma, sigma_next)  # raises, naming the step
        run.info.steps += 1
    return (x, run.info) if return_info else x
