"""A diffusers scheduler as a `diffsolve.testing.Sampler`: drive its own `set_timesteps` / `step` on a diffsolve
denoiser through `diffsolve.VPModelView` (the opposite direction of `integrations.scheduler`, which puts diffsolve
solvers inside diffusers pipelines).

How a run maps the kit's grid (descending VE sigmas) onto a scheduler. A scheduler picks its timesteps from its own
training table (`num_train_timesteps` betas), so the adapter builds a table on which the scheduler's own choice IS
the kit's grid: for the n positive sigmas of the grid, 2n entries whose odd entries 2j + 1 hold the grid's sigmas in
ascending order (abar = 1 / (1 + sigma^2), given as `trained_betas`) and whose even entries hold the log-midpoints
(the half-steps PNDM's Runge-Kutta warm-up evaluates; entry 0 is half the smallest sigma). With
`timestep_spacing="trailing"`, `steps_offset=0` and `set_timesteps(n)`, every scheduler of diffusers 0.42 then steps
from timestep 2n - 1 down through the odd entries, and its last step goes to sigma = 0 (`set_alpha_to_one=True`,
`final_sigmas_type="zero"`, the defaults where they exist). A grid that ends above 0 runs every timestep but the last
(that final step is one model call for all nine schedulers of the report), so the result sits at the grid's last
sigma. The grid a run reports is the one the scheduler really took: DEIS's last step ends at the table's smallest
entry (diffusers' DEIS has no final sigma of 0), which the exact answers then use. After `set_timesteps` the
adapter checks that the scheduler's timesteps are those odd entries and raises otherwise (options such as
`use_karras_sigmas` move them). `clip_sample` is turned off (DDIM's class default clips x0 to [-1, 1], which no
ODE solver does; Stable Diffusion's configs turn it off too); keep_config=True keeps it.

Each model call: `scale_model_input`, then `VPModelView(counted denoiser, table)(z, t)` (epsilon prediction), then
`step(eps, t, latents, generator=...)`. Schedulers whose `scale_model_input` divides by sqrt(1 + sigma^2) (Euler,
Heun, LMS, Euler ancestral) keep VE samples; the others (DDIM, PNDM, DPM-Solver, UniPC, DEIS) keep VP latents
z = x / sqrt(1 + sigma^2). Noise comes from torch generators, one per row seeded from (seed, row), so a batch split
changes nothing; noise the kit wants to inject (exact-moment probes) raises NotApplicable. The adapter counts the
model calls itself (its NFE report), and diffusers' tables are float32, so `precision` is 1e-7.
"""
import inspect

import torch

from diffsolve.denoisers import VPModelView
from diffsolve.testing.samplers import NotApplicable, RunResult, Sampler

__all__ = ["NOMINAL_ORDERS", "REPORT_SCHEDULERS", "grid_table", "scheduler_sampler"]

# diffusers 0.42 schedulers of the stability report -> the nominal global order of their default config.
NOMINAL_ORDERS = {"DDIMScheduler": 1, "EulerDiscreteScheduler": 1, "EulerAncestralDiscreteScheduler": 1,
                  "HeunDiscreteScheduler": 2, "DPMSolverMultistepScheduler": 2, "UniPCMultistepScheduler": 3,
                  "LMSDiscreteScheduler": 4, "PNDMScheduler": 4, "DEISMultistepScheduler": 2}
REPORT_SCHEDULERS = tuple(NOMINAL_ORDERS)


def grid_table(sigmas):
    """(betas float64 [2n], n) of the training table whose odd entries are the grid's n positive sigmas, ascending."""
    pos = torch.as_tensor(sigmas, dtype=torch.float64)
    pos = pos[pos > 0].flip(0)
    n = len(pos)
    table = torch.empty(2 * n, dtype=torch.float64)
    table[1::2] = pos
    table[2::2] = (pos[:-1] * pos[1:]).sqrt()
    table[0] = pos[0] / 2
    abar = 1 / (1 + table ** 2)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1 - abar / prev, n


def _config(scheduler):
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    base = dict((scheduler() if isinstance(scheduler, type) else scheduler).config)
    return cls, {k: v for k, v in base.items() if not k.startswith("_")}


def _build(cls, base, sigmas, keep_config):
    betas, n = grid_table(sigmas)
    cfg = dict(base, num_train_timesteps=2 * n, trained_betas=betas.tolist(), timestep_spacing="trailing",
               steps_offset=0, prediction_type="epsilon")
    for key, value in (("set_alpha_to_one", True), ("final_sigmas_type", "zero")):
        if key in base:
            cfg[key] = value
    if not keep_config:
        for key in ("clip_sample", "thresholding"):
            if key in base:
                cfg[key] = False
    sched = cls.from_config(cfg)
    sched.set_timesteps(n)
    ts = sorted({int(round(float(t))) for t in sched.timesteps})
    starts = list(range(1, 2 * n, 2))
    if not set(starts) <= set(ts) or any(t < 0 or t >= 2 * n for t in ts):
        raise ValueError(f"{cls.__name__} did not land on the grid: timesteps {ts[:12]}... for the table's odd "
                         f"entries {starts[:12]}... (an option of its config moves them)")
    return sched, n


def _final_sigma(sched):
    """Where the scheduler's last step lands: its sigma table's last entry, or the sigma of `final_alpha_cumprod`
    (DDIM, PNDM). DEIS ends at the training table's smallest sigma, not at 0."""
    if hasattr(sched, "sigmas"):
        return float(sched.sigmas[-1])
    a = float(sched.final_alpha_cumprod)
    return ((1 - a) / a) ** 0.5


def scheduler_sampler(scheduler, name=None, order=None, keep_config=False, step_kwargs=None):
    """A `diffsolve.testing.Sampler` running `scheduler` (a diffusers scheduler class or instance; a new instance is
    made from its config for every run) on any diffsolve denoiser. order: the nominal order (default
    NOMINAL_ORDERS by class name); step_kwargs: extra arguments of `step` (e.g. {"eta": 1.0} for DDIM)."""
    cls, base = _config(scheduler)
    takes = inspect.signature(cls.step).parameters
    extra = dict(step_kwargs or {})

    def run(model, x, sigmas, noise, transforms):
        if transforms:
            raise NotApplicable("a diffusers scheduler cannot apply split-face flows")
        sched, n = _build(cls, base, sigmas, keep_config)
        table = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
        calls = {"n": 0}

        def denoiser(z, sigma, **cond):
            calls["n"] += 1
            return model(z, sigma, **cond)
        view = VPModelView(denoiser, table)
        grid_sigmas = ((1 - table) / table).sqrt()[1::2].flip(0)
        interior = float(sigmas[-1]) > 0
        timesteps = list(sched.timesteps)[:-1] if interior else list(sched.timesteps)
        kw = dict(extra)
        if "generator" in takes:
            if noise.factory is not None:
                raise NotApplicable("diffusers draws its own noise from generators; it cannot be injected")
            kw["generator"] = noise.generators(x.shape[0], x.device)
        probe = torch.ones(1, dtype=x.dtype)
        ve = not torch.equal(sched.scale_model_input(probe, sched.timesteps[0]), probe)
        s0 = float(grid_sigmas[0])
        latents = x if ve else (x / (1 + s0 ** 2) ** 0.5).to(x.dtype)
        for t in timesteps:
            z = sched.scale_model_input(latents, t)
            eps = view(z, t)
            latents = sched.step(eps, t, latents, **kw).prev_sample
        final = float(grid_sigmas[-1]) if interior else _final_sigma(sched)
        out = latents if ve else (latents * (1 + final ** 2) ** 0.5).to(x.dtype)
        realized = grid_sigmas if interior else torch.cat([grid_sigmas, grid_sigmas.new_tensor([final])])
        return RunResult(out, calls["n"] * 1.0, realized)

    label = name or cls.__name__
    return Sampler(label, run, kind="diffusers-scheduler", order=order if order is not None else
                   NOMINAL_ORDERS.get(cls.__name__), stochastic=None, flows=False, precision=1e-7)
