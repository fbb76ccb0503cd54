"""What every distiller shares: a gradient for x = g(theta), the detached-target loss, NFE, random draws,
checks on the model's output, and the per-step protocol.

Conventions (stated once): `grad(x)` has x's shape; `loss(x)` = 0.5 * sum over points and dims of
|x - stopgrad(x - grad)|^2, so d loss / d x = grad exactly and gradient descent with lr = 1 on MSD's
loss is the mean-shift step x <- mean(y). Pass `reduction="mean"` to divide by the batch as
threestudio does.

Randomness: every draw of a call comes from that call's `Draws`: the `generator` given to the call
(sequential draws), or a `seed` (row i's draws depend only on (seed, row_offset + i), so a gradient does
not change when a batch is split). Conditions and transforms may be given per call (`extra_args=`,
`transforms=`), overriding the distiller's own for that call only.

Step protocol: an optimisation loop calls `on_step(step, x, generator)` before each gradient; each
distiller updates what depends on the step there (MSD's bandwidth schedule, SDI's timestep annealing,
VSD's variational fit). `step` also names the optimisation step in errors.
"""
import math

import torch

from ..denoisers import append_dims
from ..noise import gaussian_noise, seeded_noise
from ..sampling import Run, run_denoiser
from ..transforms import Transform

__all__ = ["Call", "Distiller", "Draws", "NoisyDistiller", "SIGMA_SAMPLINGS", "WEIGHTINGS", "euler_inversion",
           "sigma_from_uniform", "weight"]

SIGMA_SAMPLINGS = ("karras", "log_uniform")
WEIGHTINGS = ("uniform", "sds")
_MASK63 = (1 << 63) - 1


class Draws:
    """The random draws of one gradient call: from a torch.Generator in sequence, or from a seed, row by row.

    With a seed, draw k of row i depends only on (seed, k, row_offset + i): batch-split invariant."""

    def __init__(self, generator=None, seed=None, row_offset=0):
        if seed is not None and generator is not None:
            raise ValueError("give a generator or a seed, not both")
        if seed is not None and (int(seed) != seed or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if int(row_offset) != row_offset or row_offset < 0:
            raise ValueError(f"row_offset must be a non-negative integer, got {row_offset!r}")
        self.generator, self.seed, self.row_offset, self.count = generator, seed, int(row_offset), 0

    def _seeded(self, like):
        self.count += 1
        return seeded_noise(like, (self.seed * 1_000_003 + self.count) & _MASK63, self.row_offset)

    def randn(self, like):
        """Standard normal noise shaped like `like`."""
        if self.seed is None:
            return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)
        return self._seeded(like)(0.0, 0.0)

    def rand(self, rows, device="cpu"):
        """`rows` uniform draws in [0, 1), float64."""
        if self.seed is None:
            return torch.rand(rows, generator=self.generator, dtype=torch.float64).to(device)
        z = self._seeded(torch.empty(rows, dtype=torch.float64, device=device))(0.0, 0.0)
        return (0.5 * (1 + torch.erf(z / math.sqrt(2)))).clamp(max=1 - 2 ** -53)

    def noise_sampler(self, like):
        """A solver noise sampler for a chain started from `like`."""
        if self.seed is None:
            return gaussian_noise(like, self.generator)
        return self._seeded(like)

    def repeated(self, n):
        """The draws of a batch whose rows are each repeated n times (row i -> rows n i .. n i + n - 1)."""
        if self.seed is None or n == 1:
            return self
        out = Draws(seed=self.seed, row_offset=self.row_offset * n)
        out.count = self.count
        return out


class Call:
    """One gradient call: its `Run` (model-call count), its draws, its conditions and transforms."""

    def __init__(self, distiller, x, draws, extra_args, transforms, check_finite=True):
        self.distiller, self.draws, self.check_finite = distiller, draws, bool(check_finite)
        self.run = Run(x.shape[0])
        self.extra_args = distiller.extra_args if extra_args is None else dict(extra_args)
        self.transforms = distiller.transforms if transforms is None else _check_transforms(transforms)

    def denoiser(self, transforms=None, model=None, batch=None):
        """The model (or `model`) with the call's transforms (or `transforms`), checked, its evaluations counted
        into the call's total in units of the call's batch (or of `batch` rows, for a repeated batch)."""
        base = self.checked(self.distiller.model if model is None else model)
        run = self.run if batch is None else Run(batch, self.run.info)
        return run_denoiser(base, self.transforms if transforms is None else transforms, run)[0]

    def checked(self, model):
        """`model` whose every output is checked: shape like x, and finite unless the call was made with
        check_finite=False (an error naming the distiller, the sigma and the step otherwise)."""
        name, step, check_finite = self.distiller.name, self.distiller.step, self.check_finite

        def checked_model(x, sigma, **cond):
            out = model(x, sigma, **cond)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{name}: the model returned shape {shape} for x of shape {tuple(x.shape)}")
            if check_finite and not torch.isfinite(out).all():
                s = torch.as_tensor(sigma, dtype=torch.float64).flatten()
                bad = ~torch.isfinite(out.flatten(1)).all(1)
                where = float(s[bad.nonzero()[0, 0]] if s.numel() > 1 else s[0])
                raise ValueError(f"{name}: the model returned NaN or inf at sigma {where:.6g} "
                                 f"(optimisation step {step}, {int(bad.sum())} of {len(bad)} rows)")
            return out
        return checked_model

    def extra(self, repeats=1):
        """Condition arguments repeated for `repeats` copies of each row (batch dims only)."""
        if repeats == 1:
            return self.extra_args
        return {k: v.repeat_interleave(repeats, 0) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] > 1
                else v for k, v in self.extra_args.items()}


def _check_transforms(transforms):
    transforms = list(transforms)
    for t in transforms:
        if not isinstance(t, Transform):
            raise ValueError(f"transforms must be diffsolve Transform objects, got {t!r}")
    return transforms


class Distiller:
    """Base: subclasses implement `_grad(x, call, **kw)`; NFE is accumulated in `self.nfe`."""

    name = "distiller"

    def __init__(self, model, transforms=(), extra_args=None):
        self.model, self.transforms = model, _check_transforms(transforms)
        self.extra_args = {} if extra_args is None else dict(extra_args)
        self.nfe = 0.0        # model evaluations since construction, in units of the batch given to grad
        self.last_nfe = 0.0   # those of the last grad call
        self.step = 0         # the optimisation step, set by on_step

    def on_step(self, step, x=None, generator=None):
        """Called by the optimisation loop before the gradient of step `step` (x: the current particles)."""
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = int(step)

    @torch.no_grad()
    def grad(self, x, generator=None, *, seed=None, row_offset=0, extra_args=None, transforms=None, check_finite=True,
             **kw):
        """The descent direction for x (same shape); step along -grad to climb the density. A non-finite model
        output or gradient is an error naming the distiller, the sigma and the step, unless check_finite=False
        (the caller then handles it, e.g. threestudio's nan_to_num)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"{self.name}: x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: x contains NaN or inf")
        call = Call(self, x, Draws(generator, seed, row_offset), extra_args, transforms, check_finite)
        g = self._grad(x.detach(), call, **kw)
        self.last_nfe = call.run.info.nfe
        self.nfe += call.run.info.nfe
        if check_finite and not torch.isfinite(g).all():
            raise ValueError(f"{self.name}: the gradient has NaN or inf at optimisation step {self.step}")
        return g.to(x.dtype)

    def loss(self, x, generator=None, reduction="sum", **kw):
        """0.5 |x - stopgrad(x - grad)|^2 summed over dims; over points "sum" (default) or "mean"."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        target = (x - self.grad(x, generator, **kw)).detach()
        total = 0.5 * ((x - target) ** 2).sum()
        return total / x.shape[0] if reduction == "mean" else total

    def _grad(self, x, call, **kw):
        raise NotImplementedError


def euler_inversion(den, x, levels, extra_args):
    """Deterministic DDIM (Euler) inversion: carry x, taken as the sample at levels[0], up the ascending
    `levels` (floats or per-row [B] tensors) with z <- z + (s1 - s0) (z - D(z; s0)) / s0. Returns the
    list of z at every level (the first is x itself)."""
    trajectory = [x]
    for s0, s1 in zip(levels[:-1], levels[1:]):
        z = trajectory[-1]
        s0_rows = s0 if isinstance(s0, torch.Tensor) else s0 * z.new_ones(z.shape[0])
        d = den(z, s0_rows, **extra_args).to(z.dtype)
        trajectory.append(z + append_dims((s1 - s0) / s0, z.ndim) * (z - d))
    return trajectory


def check_sigma_range(sigma_min, sigma_max):
    """0 < sigma_min < sigma_max < inf. A distiller draws or starts at sigma_max, so it must be finite: a flow
    model's t = 1 (sigma = inf) is pure noise, where the gradient carries no information about x; take
    sigma_max = t_max / (1 - t_max) for the largest t wanted (threestudio's max_step_percent = 0.98: t = 0.98)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not math.isfinite(sigma_max):
        raise ValueError(f"sigma_max must be finite for a distiller, got {sigma_max} (a flow model's t = 1); take "
                         "sigma_max = t / (1 - t) for the largest flow time t to draw, e.g. 49 for t = 0.98")


def check_sigma_sampling(sampling):
    if sampling not in SIGMA_SAMPLINGS:
        raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}")
    return sampling


def sigma_from_uniform(u, sigma_min, sigma_max, sampling="karras", rho=7.0):
    """Map u in [0, 1] to sigma: "karras" is the continuous EDM rho-grid (u = 0 at sigma_max),
    "log_uniform" is uniform in log sigma."""
    check_sigma_sampling(sampling)
    if sampling == "karras":
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + u * (lo - hi)) ** rho
    return torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))


def check_weighting(weighting):
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}")
    return weighting


def weight(sigma, weighting):
    """w(sigma): "uniform" is 1; "sds" is DreamFusion's sigma_VP^2 = 1 - abar = sigma^2 / (1 + sigma^2)."""
    if callable(check_weighting(weighting)):
        return weighting(sigma)
    if weighting == "uniform":
        return torch.ones_like(sigma)
    return sigma ** 2 / (1 + sigma ** 2)


class NoisyDistiller(Distiller):
    """Shared by SDS, VSD and SDI: sigma drawn per row from a range, a weighting w(sigma)."""

    def __init__(self, model, *, sigma_min=0.002, sigma_max=5.0, sigma_sampling="karras", rho=7.0,
                 weighting="uniform", transforms=(), extra_args=None):
        super().__init__(model, transforms, extra_args)
        check_sigma_range(sigma_min, sigma_max)
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_sampling, self.weighting = check_sigma_sampling(sigma_sampling), check_weighting(weighting)

    def draw_sigma(self, x, call):
        u = call.draws.rand(x.shape[0], x.device)
        return sigma_from_uniform(u, self.sigma_min, self.sigma_max, self.sigma_sampling, self.rho).to(x.dtype)

    def noised(self, x, call):
        """One draw of the forward process z = x + sigma n: (sigma [B], sigma broadcast to x, n, z)."""
        sigma = self.draw_sigma(x, call)
        n = call.draws.randn(x)
        s = append_dims(sigma, x.ndim)
        return sigma, s, n, x + s * n

    def weighted(self, sigma, g):
        return append_dims(weight(sigma, self.weighting), g.ndim) * g
