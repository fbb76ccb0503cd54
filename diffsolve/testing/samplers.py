"""One interface over every kind of sampler the kit checks: `Sampler.run(model, x, sigmas, noise, transforms)`.

Kinds: "diffsolve" (a `diffsolve.Solver` class, instance or registry name), "k-diffusion" (a function
`f(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`, k-diffusion's calling convention, or its
`sample_dpm_fast` / `sample_dpm_adaptive` forms over [sigma_min, sigma_max]) and "diffusers-scheduler" (built by
`diffsolve.integrations.scheduler_step.scheduler_sampler`, which drives `set_timesteps` / `step`; the core cannot
import diffusers). A run returns `RunResult(x, nfe, sigmas)`: the sampler's own NFE report (None when it reports
none) and the grid it really ran on (None: the one asked for), so exact answers are taken on that grid.
"""
import dataclasses
import inspect
from typing import Callable, Optional

import torch

from ..noise import gaussian_noise, seeded_noise
from ..sampling import Solver, sample
from ..solvers.registry import SOLVERS, solver_factory

__all__ = ["KINDS", "Noise", "NotApplicable", "RunResult", "Sampler", "as_sampler", "from_kdiffusion", "from_solver",
           "nominal_order", "twin_nfe"]

KINDS = ("diffsolve", "k-diffusion", "diffusers-scheduler")


class NotApplicable(Exception):
    """Raised by an adapter for a grid or an option the sampler cannot run (a check reports n/a, not a failure)."""
_MIX = 0x9E3779B97F4A7C15


@dataclasses.dataclass
class RunResult:
    x: torch.Tensor
    nfe: Optional[float] = None
    sigmas: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Noise:
    """The noise of one run, fixed by a seed. per_row=True: row i's noise depends on (seed, row_offset + i) only
    (`diffsolve.seeded_noise`; per-row torch generators for diffusers), so splitting a batch changes nothing;
    per_row=False: one generator for the whole batch (fast, for large Monte Carlo batches)."""

    seed: int = 0
    row_offset: int = 0
    per_row: bool = True
    factory: Optional[Callable] = None  # factory(x) -> noise sampler: noise the kit injects (probes)

    def sampler(self, x):
        """A k-diffusion noise sampler `(sigma, sigma_next) -> tensor like x`."""
        if self.factory is not None:
            return self.factory(x)
        if self.per_row:
            return seeded_noise(x, self.seed, self.row_offset)
        return gaussian_noise(x, torch.Generator(device=x.device).manual_seed(self.seed))

    def generators(self, rows, device="cpu"):
        """Torch generators for diffusers' `step(generator=...)`: one per row when per_row, else one."""
        if not self.per_row:
            return torch.Generator(device=device).manual_seed(self.seed)
        return [torch.Generator(device=device).manual_seed((self.seed * _MIX + self.row_offset + i) % (1 << 63))
                for i in range(rows)]


class Sampler:
    """A sampler as the kit sees it.

    run(model, x, sigmas, noise=None, transforms=()) -> RunResult. order: the nominal global order (None: unknown).
    stochastic: declared (None: the kit detects it by rerunning with another noise seed). flows: the sampler can
    apply split-face transforms (`transforms=`). grid: "any" (runs the grid it is given) or "endpoints" (only
    sigma_max and the last sigma > 0 matter: dpm_fast, dpm_adaptive). adaptive: its step sizes depend on x (order and
    stiffness bounds do not apply). nfe: None, or `f(sigmas) -> count` the sampler stands for when it reports none.
    precision: the relative rounding of its arithmetic (float64: 1e-15; diffusers' float32 tables: 1e-7)."""

    def __init__(self, name, run, *, kind, order=None, stochastic=None, flows=False, grid="any", adaptive=False,
                 nfe=None, precision=1e-15):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if grid not in ("any", "endpoints"):
            raise ValueError(f"grid must be 'any' or 'endpoints', got {grid!r}")
        self.name, self._run, self.kind, self.order = name, run, kind, order
        self.stochastic, self.flows, self.grid, self.adaptive = stochastic, flows, grid, adaptive
        self.nfe, self.precision = nfe, precision

    def run(self, model, x, sigmas, noise=None, transforms=()):
        if transforms and not self.flows:
            raise ValueError(f"{self.name} cannot apply split-face transforms")
        out = self._run(model, x, torch.as_tensor(sigmas, dtype=torch.float64), noise or Noise(), tuple(transforms))
        return out if isinstance(out, RunResult) else RunResult(out)

    def __repr__(self):
        return f"Sampler({self.name!r}, kind={self.kind!r}, order={self.order})"


def nominal_order(name, steps=16):
    """The order diffsolve declares for the registered solver `name` ("heun", "sample_heun"), at its defaults (the
    order its name stands for); None when not registered."""
    try:
        factory = solver_factory(name)
    except ValueError:
        return None
    solver = _default_solver(factory, steps)
    return None if solver is None else solver.order


def _default_solver(factory, steps):
    params = inspect.signature(factory).parameters
    try:
        return factory(n=3 * steps - 1) if "n" in params else factory()
    except (TypeError, ValueError):
        return None


def twin_nfe(name):
    """`f(sigmas) -> count`: the model evaluations diffsolve's registered solver of the same name makes on that grid
    (its `return_info` count on a point mass), the count a k-diffusion function of that name stands for."""
    factory = solver_factory(name)

    def count(sigmas):
        from .problems import PointMass
        steps = len(sigmas) - 1
        solver = _default_solver(factory, steps)
        grid = _endpoint_grid(sigmas) if _needs_endpoints(solver) else sigmas
        if type(solver).__name__ == "DPMFast":
            grid = _dpm_fast_grid(grid, solver.n)
        x = torch.zeros(1, 1, dtype=torch.float64)
        noise = Noise().sampler(x)
        return sample(solver, PointMass(), x, grid, disable=True, noise_sampler=noise, return_info=True)[1].nfe
    return count


def _needs_endpoints(solver):
    """The solver runs its own grid between sigma_max and sigma_min (`Solver.own_grid`: dpm_fast, dpm_adaptive)."""
    return bool(getattr(solver, "own_grid", False)) or type(solver).__name__ in ("DPMAdaptive", "DPMFast")


def _endpoint_grid(sigmas):
    """[sigma_max, last sigma > 0]."""
    pos = sigmas[sigmas > 0]
    if len(pos) < 2:
        raise NotApplicable(f"runs over [sigma_min, sigma_max] with sigma_min > 0; the grid {sigmas.tolist()} has none")
    return torch.stack([sigmas[0], pos[-1]])


def _dpm_fast_grid(sigmas, n):
    from ..solvers.adaptive import dpm_fast_sigmas
    return dpm_fast_sigmas(float(sigmas[-1]), float(sigmas[0]), n)


def from_solver(solver, name=None):
    """A diffsolve Solver (instance, class, or registry name) on `diffsolve.sample`: its own NFE report
    (`return_info`), its declared order and noise, split flows when it applies them. dpm_fast (a step-count
    solver on its own t-uniform grid) is built per run with n = 3 * steps - 1 evaluations; dpm_adaptive runs over
    [sigma_max, sigma_min]."""
    if isinstance(solver, str):
        factory = solver_factory(solver)
        key = solver[len("sample_"):] if solver.startswith("sample_") else solver
        probe = _default_solver(factory, 16)
        if probe is None:
            raise ValueError(f"cannot build {solver!r} with its defaults")
        if type(probe).__name__ == "DPMFast":
            return _fast_sampler(factory, name or key)
        solver, name = probe, name or key
    elif isinstance(solver, type) and issubclass(solver, Solver):
        solver = solver()
    if not isinstance(solver, Solver):
        raise ValueError(f"not a diffsolve Solver: {solver!r}")
    endpoints = _needs_endpoints(solver)

    def run(model, x, sigmas, noise, transforms):
        grid = _endpoint_grid(sigmas) if endpoints else sigmas
        if endpoints and hasattr(solver, "n") and type(solver).__name__ == "DPMFast":
            grid = _dpm_fast_grid(grid, solver.n)  # a DPMFast instance keeps its own n
        y, info = sample(solver, model, x, grid, disable=True, noise_sampler=noise.sampler(x), transforms=transforms,
                         return_info=True)
        return RunResult(y, info.nfe, grid if endpoints else None)

    label = name or (solver.name if solver.name != Solver.name else type(solver).__name__)
    return Sampler(label, run, kind="diffsolve", order=solver.order,
                   stochastic=bool(solver.stochastic), flows=bool(solver.applies_flows),
                   grid="endpoints" if endpoints else "any", adaptive=type(solver).__name__ == "DPMAdaptive")


def _fast_sampler(factory, name):
    def run(model, x, sigmas, noise, transforms):
        steps = len(sigmas) - 1
        solver = factory(n=3 * steps - 1)
        grid = _dpm_fast_grid(_endpoint_grid(sigmas), solver.n)
        y, info = sample(solver, model, x, grid, disable=True, noise_sampler=noise.sampler(x), transforms=transforms,
                         return_info=True)
        return RunResult(y, info.nfe, grid)
    probe = factory(n=3 * 16 - 1)
    return Sampler(name, run, kind="diffsolve", order=probe.order, stochastic=bool(probe.stochastic),
                   flows=bool(probe.applies_flows), grid="endpoints")


def from_kdiffusion(fn, name=None, order=None, stochastic=None, nfe=None):
    """A k-diffusion-style sampler function. `f(model, x, sigmas, ...)` gets `disable=True` and the run's noise as
    `noise_sampler=` when it takes one; `f(model, x, sigma_min, sigma_max, n, ...)` (dpm_fast) gets n = 3 * steps - 1
    evaluations; `f(model, x, sigma_min, sigma_max, ...)` (dpm_adaptive) runs with `return_info=True` and reports
    its info["nfe"]. order / nfe default to those of diffsolve's registered twin of the same name, if any."""
    if not callable(fn):
        raise ValueError(f"a k-diffusion sampler must be callable, got {fn!r}")
    params = inspect.signature(fn).parameters
    name = name or getattr(fn, "__name__", "sampler")
    key = name[len("sample_"):] if name.startswith("sample_") else name
    has_twin = key in SOLVERS
    order = order if order is not None else (nominal_order(key) if has_twin else None)
    nfe = nfe if nfe is not None else (twin_nfe(key) if has_twin else None)
    takes_noise = "noise_sampler" in params
    form = "grid" if "sigmas" in params else ("fast" if "n" in params else "adaptive")

    def run(model, x, sigmas, noise, transforms):
        kw = {"disable": True}
        if takes_noise:
            kw["noise_sampler"] = noise.sampler(x)
        if form == "grid":
            return RunResult(fn(model, x, sigmas, **kw))
        grid = _endpoint_grid(sigmas)
        sigma_min, sigma_max = float(grid[1]), float(grid[0])
        if form == "fast":
            return RunResult(fn(model, x, sigma_min, sigma_max, 3 * (len(sigmas) - 1) - 1, **kw), None, grid)
        y, info = fn(model, x, sigma_min, sigma_max, return_info=True, **kw)
        return RunResult(y, float(info["nfe"]), grid)

    return Sampler(name, run, kind="k-diffusion", order=order, stochastic=stochastic,
                   grid="any" if form == "grid" else "endpoints", adaptive=form == "adaptive",
                   nfe=None if form == "adaptive" else nfe)


def as_sampler(obj, kind=None, **meta):
    """The kit's `Sampler` for obj: a Sampler (returned as is), a diffsolve Solver class / instance / registry name, or
    a k-diffusion-style function; `kind` forces one of KINDS, `meta` (name, order, stochastic, nfe) overrides what
    the kit infers. A diffusers scheduler needs `diffsolve.integrations.scheduler_step.scheduler_sampler`."""
    if isinstance(obj, Sampler):
        return obj
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    is_solver = isinstance(obj, Solver) or (isinstance(obj, type) and issubclass(obj, Solver))
    looks_scheduler = hasattr(obj, "set_timesteps") and hasattr(obj, "step")
    if kind == "diffusers-scheduler" or (kind is None and looks_scheduler):
        raise ValueError("a diffusers scheduler is checked through diffsolve.integrations.scheduler_step."
                         "scheduler_sampler(scheduler) (the core does not import diffusers)")
    if kind == "diffsolve" or (kind is None and (is_solver or isinstance(obj, str))):
        sampler = from_solver(obj, name=meta.pop("name", None))
        for key, value in meta.items():
            setattr(sampler, key, value)
        return sampler
    if kind is None and not callable(obj):
        raise ValueError(f"cannot check {obj!r}: give a diffsolve Solver, a registry name, a k-diffusion-style "
                         f"function or a Sampler")
    return from_kdiffusion(obj, **meta)

