"""Any diffsolve solver as a diffusers scheduler: `pipe.scheduler = DiffsolveScheduler(solver, pipe.scheduler)`.

A stock diffusers pipeline (StableDiffusionPipeline; diffusers 0.42.1 checked) drives its scheduler like this:
`set_timesteps(n, device=...)`, reads `timesteps`, `order` and `init_noise_sigma`, then for every t in
`timesteps`: `scale_model_input(latents, t)`, the UNet at t (with its own CFG), and
`latents = step(noise_pred, t, latents, **extra)[0]`, where `extra` holds `eta` / `generator` only if
`step`'s signature names them (`prepare_extra_step_kwargs`). The latents are variance-preserving (VP):
z = x / sqrt(1 + sigma**2) for diffsolve's VE state x = x0 + sigma n.

Design. A diffsolve solver is a loop that calls its denoiser; a pipeline is a loop that calls the scheduler.
The adapter turns one into the other:
  - `set_timesteps` builds the VE sigma grid (`sigmas_fn(n)`, by default the base scheduler's own grid,
    `integrations.diffusers.sigmas_from_scheduler`) and finds the sigma of every model evaluation the
    solver will make by a dry run of the solver on that grid with a recording identity denoiser (D = x,
    zero noise). `timesteps` has one entry per evaluation (Heun: 2n - 1 for n steps), the fractional
    timestep of its sigma, interpolated in log sigma exactly as `diffsolve.VPDenoiser` does (float32; the
    UNet accepts float timesteps).
  - the first `step` starts `diffsolve.sample` in a worker thread from x = latents sqrt(1 + sigma_0**2),
    with the solver's transforms and noise. Its denoiser hands each evaluation point to the pipeline as
    `prev_sample` (z = x / sqrt(1 + sigma**2), VPDenoiser's arithmetic) and blocks until the next `step`
    brings the UNet's (guided) output there, which it reads as epsilon, v or the sample per the base
    scheduler's `prediction_type` (D = x - sigma eps, ...). The two threads strictly alternate (one runs
    while the other waits), so nothing is computed concurrently and generators are drawn in order.
    The last `step` returns the solver's final x in VP coordinates at the grid's last sigma.
  - every real evaluation is checked against the dry run: the same count and the same sigma (to the
    latents' dtype's rounding); a solver whose evaluation points depend on x (adaptive step size) fails
    this check with a RuntimeError instead of running on wrong timesteps.
Per-call state (grid, worker, counters, generator) lives in a `_Call` made by `set_timesteps`; a new call
cancels the previous call's worker.

Limits: adaptive solvers (dpm_adaptive, odeint with an adaptive method) and any solver whose evaluation
sigmas depend on x raise; transforms that call the model with their own conditions (cfg, guidance with
`uncond=`) raise (give the guidance to the pipeline; a guide *model*, as in autoguidance, works); the latents
the pipeline hands back must be the ones `step` returned (a `callback_on_step_end` that edits latents
raises); pipelines that start part-way into `timesteps` (img2img's strength, `set_begin_index`) are not
supported (the timestep check raises): use diffsolve.partial for those runs.
"""
import contextlib
import functools
import math
import numbers
import queue
import threading
import weakref
from typing import NamedTuple, Optional

import torch

from diffsolve._checks import check_sigmas
from diffsolve.denoisers import DiscreteTimesteps, append_dims, denoised_from_eps, denoised_from_v, sigma_rows
from diffsolve.noise import gaussian_noise
from diffsolve.sampling import Solver, sample
from diffsolve.solvers.registry import get_solver
from diffsolve.transforms import Transform

from .diffusers import from_ve, sigmas_from_scheduler, to_ve

__all__ = ["DiffsolveScheduler", "DiffsolveSchedulerOutput", "dry_run_sigmas"]

_FROM_OUTPUT = {"epsilon": denoised_from_eps, "v_prediction": denoised_from_v, "sample": lambda x, sigma, out: out}
_CANCEL = object()


class DiffsolveSchedulerOutput(NamedTuple):
    """What `step` returns (a tuple, so `step(...)[0]` works too): the next latents and the model's x0
    prediction at the evaluation just answered."""
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor]


class _Cancelled(Exception):
    """Raised inside a worker whose call was abandoned (a new `set_timesteps`, the scheduler collected)."""


def dry_run_sigmas(solver, sigmas):
    """The sigma of every model evaluation `solver` makes over `sigmas`, in order, found by running it with
    the identity denoiser D(x) = x and zero noise on a 1 x 1 float64 state. Valid for solvers whose
    evaluation points do not depend on x (every fixed-grid solver); `DiffsolveScheduler` checks it."""
    seen = []

    def identity(x, sigma, **cond):
        seen.append(float(sigma_rows(sigma, x).flatten()[0]))
        return x

    x = torch.ones(1, 1, dtype=torch.float64)
    sample(solver, identity, x, sigmas, disable=True, noise_sampler=lambda *a: torch.zeros_like(x),
           check_finite=False)
    if not seen:
        raise ValueError(f"{solver!r} made no model evaluation over {len(sigmas) - 1} steps")
    return seen


class _Call:
    """One pipeline call: its grid, the dry run's evaluations, the worker thread and the two queues."""

    def __init__(self, spec, grid, eval_sigmas, timesteps):
        # spec: (solver, transforms, prediction_type, noise) -- never the scheduler, which a finaliser watches
        (self.solver, self.transforms, self.prediction_type, self.noise), self.grid = spec, grid
        self.eval_sigmas, self.timesteps = eval_sigmas, timesteps
        self.k, self.last, self.finished = 0, None, False
        self.to_worker, self.to_main = queue.Queue(), queue.Queue()
        self.requested, self.denoised, self.batch, self.thread = 0, None, None, None

    # ---- worker side
    def model(self, x, sigma, **cond):
        """The VE denoiser the worker's `diffsolve.sample` calls: one pipeline UNet evaluation per call."""
        if cond:
            raise ValueError(f"a transform called the model with its own conditions {sorted(cond)}; inside a "
                             "pipeline the UNet is conditioned (and CFG-guided) by the pipeline itself: give "
                             "guidance to the pipeline (guidance_scale), not as a diffsolve transform")
        if x.shape[0] != self.batch:
            raise ValueError(f"a transform called the model with batch {x.shape[0]}, the pipeline's latents "
                             f"have batch {self.batch}")
        k = self.requested
        self.requested += 1
        if k >= len(self.eval_sigmas):
            raise RuntimeError(f"{self.solver!r} asked for model evaluation {k + 1} but its dry run made "
                               f"{len(self.eval_sigmas)}: its evaluation points depend on x (adaptive solver?), "
                               "which a fixed list of pipeline timesteps cannot follow")
        sigma = sigma_rows(sigma, x)
        want = self.eval_sigmas[k]
        tol = 4 * torch.finfo(sigma.dtype).eps * want
        if ((sigma.double() - want).abs() > tol).any():
            raise RuntimeError(f"{self.solver!r} evaluates at sigma {sigma.flatten()[0].item():.9g} at "
                               f"evaluation {k}, its dry run at {want:.9g}: its evaluation points depend on x "
                               "(adaptive solver?), which a fixed list of pipeline timesteps cannot follow")
        s = append_dims(sigma, x.ndim)
        z = x * (1 + s ** 2).rsqrt()  # VPDenoiser's arithmetic
        self.to_main.put(("eval", z.to(x.dtype), self.denoised))
        out = self.to_worker.get()
        if out is _CANCEL:
            raise _Cancelled()
        d = _FROM_OUTPUT[self.prediction_type](x, s, out).to(x.dtype)
        self.denoised = d
        return d

    def run(self, x, generator, noise_sampler):
        try:
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                out = sample(self.solver, self.model, x, self.grid, disable=True, generator=generator,
                             noise_sampler=noise_sampler, transforms=self.transforms)
            self.to_main.put(("done", out, self.denoised))
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 -- handed to the pipeline's thread and re-raised there
            self.to_main.put(("error", err, None))

    # ---- pipeline side
    def start(self, latents, generator):
        self.batch = latents.shape[0]
        x = to_ve(latents, float(self.grid[0]))
        gen, sampler = self.noise(x, generator)
        self.thread = threading.Thread(target=self.run, args=(x, gen, sampler), daemon=True,
                                       name="diffsolve-scheduler")
        self.thread.start()
        return self.receive()

    def receive(self):
        kind, value, denoised = self.to_main.get()
        if kind == "error":
            self.finished = True
            raise value
        return kind, value, denoised

    def step(self, model_output, timestep, latents, generator):
        n = len(self.timesteps)
        if self.finished or self.k >= n:
            raise ValueError(f"step called after the last of the {n} timesteps; call set_timesteps first")
        expect = self.timesteps[self.k]
        if not math.isclose(float(timestep), float(expect), rel_tol=1e-6, abs_tol=1e-4):
            raise ValueError(f"step {self.k} got timestep {float(timestep):.6g}, expected {float(expect):.6g}: "
                             "the pipeline must walk `timesteps` from the start, one step per entry")
        if self.k == 0:
            self.start(latents, generator)
        elif latents is not self.last and not torch.equal(latents, self.last):
            raise ValueError(f"the latents given to step {self.k} are not the ones step {self.k - 1} returned "
                             "(a callback_on_step_end that edits latents?); the solver keeps its own state")
        self.to_worker.put(model_output)
        kind, value, denoised = self.receive()
        self.k += 1
        if kind == "eval":
            self.last = value
            return value, denoised
        self.finished = True
        if self.k != n:
            raise RuntimeError(f"{self.solver!r} finished after {self.k} of the {n} evaluations of its dry "
                               "run: its evaluation points depend on x")
        self.last = from_ve(value, float(self.grid[-1]))
        return self.last, denoised

    def cancel(self):
        if self.thread is not None and self.thread.is_alive():
            self.to_worker.put(_CANCEL)


def _base_scheduler(base):
    if hasattr(base, "alphas_cumprod") and hasattr(base, "config"):
        return base
    if isinstance(base, dict):  # a scheduler config (FrozenDict is a dict)
        from diffusers import DDIMScheduler
        return DDIMScheduler.from_config(base)
    raise ValueError(f"base_scheduler_or_config must be a diffusers scheduler with alphas_cumprod (DDPM-style) "
                     f"or its config dict, got {type(base).__name__}")


class DiffsolveScheduler:
    """A diffusers scheduler that runs `solver` (a diffsolve Solver or a registry name) with `transforms`.

    base_scheduler_or_config: the pipeline's scheduler (or its config), read for `alphas_cumprod`,
    `prediction_type` and, unless `sigmas_fn` is given, the sigma grid of `set_timesteps(n)`.
    sigmas_fn: n -> descending VE sigmas (n + 1 entries, the final one included), e.g. a Karras grid.
    noise (stochastic solvers): `noise_sampler`, a factory x -> noise_sampler(sigma, sigma_next) called once
    per pipeline call with the initial VE state; else `generator`: an int seeds a fresh torch.Generator per
    call (reproducible calls), a torch.Generator is drawn from as is; else the pipeline's `generator`
    (passed to `step`); else torch's global generator.
    """

    order = 1  # recomputed by set_timesteps: model evaluations per step, rounded up (the progress bar's unit)
    init_noise_sigma = 1.0  # VP latents at sigma_max are the N(0, I) draw itself (x = n sqrt(1 + sigma_max**2))

    def __init__(self, solver, base_scheduler_or_config, sigmas_fn=None, transforms=(), *, noise_sampler=None,
                 generator=None):
        self.solver = get_solver(solver)
        if not isinstance(self.solver, Solver):
            raise ValueError(f"solver must be a diffsolve Solver or a registered name, got {solver!r}")
        base = _base_scheduler(base_scheduler_or_config)
        self.base, self.config = base, base.config
        self.prediction_type = getattr(base.config, "prediction_type", "epsilon")
        if self.prediction_type not in _FROM_OUTPUT:
            raise ValueError(f"prediction_type must be one of {sorted(_FROM_OUTPUT)}, got {self.prediction_type!r}")
        self.timesteps_map = DiscreteTimesteps(base.alphas_cumprod)
        if sigmas_fn is not None and not callable(sigmas_fn):
            raise ValueError(f"sigmas_fn must be a callable n -> sigmas, got {sigmas_fn!r}")
        self.sigmas_fn = sigmas_fn
        self.transforms = tuple(transforms)
        for t in self.transforms:
            if not isinstance(t, Transform):
                raise ValueError(f"transforms must be diffsolve Transform objects, got {t!r}")
        if noise_sampler is not None and not callable(noise_sampler):
            raise ValueError(f"noise_sampler must be a factory x -> noise_sampler, got {noise_sampler!r}")
        if generator is not None and (isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator))):
            raise ValueError(f"generator must be an int seed or a torch.Generator, got {generator!r}")
        self.noise_sampler, self.generator = noise_sampler, generator
        self._call, self.timesteps, self.sigmas, self.eval_sigmas, self.num_inference_steps = (None,) * 5
        weakref.finalize(self, DiffsolveScheduler._cancel_box, self.__dict__.setdefault("_box", [None]))

    @staticmethod
    def _cancel_box(box):
        if box[0] is not None:
            box[0].cancel()

    def __repr__(self):
        return f"DiffsolveScheduler({self.solver!r}, transforms={len(self.transforms)})"

    def grid(self, n):
        """The VE sigma grid of n steps (float64)."""
        if self.sigmas_fn is None:
            return sigmas_from_scheduler(self.base, n)[0]
        return check_sigmas(torch.as_tensor(self.sigmas_fn(n), dtype=torch.float64).cpu()).to(torch.float64)

    def timestep_of(self, sigmas):
        """The fractional timesteps of VE sigmas, as VPDenoiser computes them for float32 latents."""
        sig32 = torch.as_tensor(sigmas, dtype=torch.float64).to(torch.float32)
        return self.timesteps_map.sigma_to_t(sig32).to(torch.float32)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        """Start a new call: the grid of `num_inference_steps` steps (or the VE grid `sigmas`, its final sigma
        included), the dry run, and `timesteps`, one per model evaluation."""
        if self._call is not None:
            self._call.cancel()
        if sigmas is not None:
            grid = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64).cpu())
        elif (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
              or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        else:
            grid = self.grid(int(num_inference_steps))
        evals = dry_run_sigmas(self.solver, grid)
        self.sigmas, self.num_inference_steps = grid, len(grid) - 1
        self.eval_sigmas = torch.tensor(evals, dtype=torch.float64)
        self.timesteps = self.timestep_of(self.eval_sigmas).to(device)
        self.order = max(1, math.ceil(len(evals) / (len(grid) - 1)))
        noise = functools.partial(_call_noise, self.noise_sampler, self.generator, self.solver.stochastic)
        spec = (self.solver, self.transforms, self.prediction_type, noise)
        self._call = _Call(spec, grid, evals, self.timesteps.cpu())
        self._box[0] = self._call

    def scale_model_input(self, sample, timestep=None):
        """The identity: the latents already are the UNet's VP input."""
        return sample

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """Feed the UNet's output at `timestep` to the solver; return the next evaluation point (VP latents)
        or, after the last evaluation, the final sample (`DiffsolveSchedulerOutput`, a tuple either way)."""
        if self._call is None:
            raise ValueError("call set_timesteps before step")
        prev, denoised = self._call.step(model_output, timestep, sample, generator)
        return DiffsolveSchedulerOutput(prev, denoised)


def _call_noise(noise_sampler, generator, stochastic, x, pipeline_generator):
    """(generator, noise_sampler) of one call (see DiffsolveScheduler)."""
    if noise_sampler is not None:
        sampler = noise_sampler(x)
        if not callable(sampler):
            raise ValueError(f"noise_sampler(x) must return a callable (sigma, sigma_next) -> noise, got {sampler!r}")
        return None, sampler
    gen = torch.Generator(x.device).manual_seed(generator) if isinstance(generator, int) else generator
    if gen is None and isinstance(pipeline_generator, torch.Generator):
        gen = pipeline_generator
    elif gen is None and pipeline_generator is not None and stochastic:
        raise ValueError("a list of generators cannot drive one stochastic solver; give DiffsolveScheduler "
                         "generator= or noise_sampler=")
    if gen is None:
        return None, None
    if gen.device == x.device:
        return gen, gaussian_noise(x, gen)
    # a CPU generator (diffusers' randn_tensor draws on it and moves) with latents elsewhere
    return gen, lambda *a: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=gen.device).to(x.device)
