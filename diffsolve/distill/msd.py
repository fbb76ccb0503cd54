"""Mean-shift distillation (paper §3, eq. 5-15): grad = x - mean(y), y ~ p(y) G(x - y).

The exact mean-shift iterate for the kernel G = exp(-|u|^2 / lambda^2) is the posterior mean at
noise level s = lambda / sqrt(2): x' = D(x; s) (Tweedie). Three ways to sample / estimate it:
  - "kernel": the paper's chain. The solver runs from x + sigma_max n to 0 with the Gaussian-kernel
    term (explicit "score" face, eq. 12, or exact "split" face, eq. 14-15) centred on x.
  - "posterior": the reverse SDE (eta = 1) started at z = x at sigma = s, which samples the product
    exactly with the exact denoiser, using only the steps below s.
  - "one_call": the expected gradient x - D(x; s) itself: one model call, zero variance.
"""
import math

import torch

from ..noise import gaussian_noise
from ..schedules import sigmas_karras
from ..denoisers import append_dims
from ..solvers import SampleInfo, sample_ddim, sample_heun
from ..transforms import GaussianKernel, LimitedInterval
from .base import Distiller, euler_inversion

SAMPLERS = ("kernel", "posterior", "one_call")
CENTERS = ("iterate", "noised", "inverted")
SOLVERS = {"ddim": sample_ddim, "heun": sample_heun}


class MSD(Distiller):
    """Mean-shift distillation as a gradient provider (a drop-in for SDS).

    bandwidth: the paper's lambda (or the kernel's std with bandwidth_is="std"); set `self.bandwidth`
    between steps, or pass `bandwidth=` to grad (see diffsolve.distill.bandwidth for schedules).
    n_samples: product samples averaged per point (eq. 10); the paper uses 1 on Stable Diffusion.
    center: "iterate" (x), "noised" (x + sigma n_c, fixed n_c per chain) or "inverted" (x carried up
    the grid by deterministic DDIM inversion), the §4.3 heuristic; taken at sigma_next per step.
    kernel_interval: (sigma_lo, sigma_hi) to apply the kernel only there (§3.4).
    When s = lambda / sqrt(2) exceeds sigma_max, the posterior / one-call estimators start at
    sigma_max (the product is then close to the prior there) and `self.clipped` says so.
    """

    def __init__(self, model, bandwidth=0.316, *, sampler="kernel", steps=32, sigma_min=0.002, sigma_max=5.0,
                 rho=7.0, solver="ddim", eta=1.0, face="split", splitting="lie", flow="matched", n_samples=1,
                 center="iterate", kernel_interval=None, skip_tol=1e-6, bandwidth_is="lambda", transforms=(),
                 extra_args=None):
        super().__init__(model, transforms, extra_args)
        for name, value, allowed in (("sampler", sampler, SAMPLERS), ("center", center, CENTERS),
                                     ("solver", solver, tuple(SOLVERS))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
        if bandwidth_is not in ("lambda", "std"):
            raise ValueError(f"bandwidth_is must be 'lambda' or 'std', got {bandwidth_is!r}")
        GaussianKernel(torch.zeros(1), bandwidth, face=face, splitting=splitting, flow=flow)  # validates
        self.bandwidth, self.bandwidth_is = bandwidth, bandwidth_is
        self.sampler, self.steps, self.sigma_min, self.sigma_max, self.rho = sampler, steps, sigma_min, sigma_max, rho
        self.solver, self.eta, self.face, self.splitting, self.flow = solver, eta, face, splitting, flow
        self.n_samples, self.center, self.kernel_interval, self.skip_tol = int(n_samples), center, kernel_interval, skip_tol
        self.clipped = False
        self.mean_shift_norm = None  # per-point |m| = |mean(y) - x| of the last grad call

    def lam(self, bandwidth=None):
        b = self.bandwidth if bandwidth is None else bandwidth
        return b * math.sqrt(2) if self.bandwidth_is == "std" else b

    def _grad(self, x, generator, info, bandwidth=None):
        y = self.sample_product(x, generator, bandwidth, info)
        m = y.mean(1) - x
        self.mean_shift_norm = m.flatten(1).norm(dim=1)
        return -m

    @torch.no_grad()
    def sample_product(self, x, generator=None, bandwidth=None, info=None):
        """Samples y of the product density for each point: shape [B, N, ...] (N = 1 for one_call)."""
        lam = self.lam(bandwidth)
        s = lam / math.sqrt(2)
        self.clipped = s > self.sigma_max
        info = info if info is not None else SampleInfo()
        if self.sampler == "one_call":
            den = self.denoiser(x.shape[0], info)
            return den(x, min(s, self.sigma_max) * x.new_ones(x.shape[0]), **self.extra_args).to(x.dtype)[:, None]
        n = self.n_samples
        xs = x.repeat_interleave(n, 0)
        extra = self.extra(n)
        if self.sampler == "posterior":
            sigmas = sigmas_karras(self.steps, self.sigma_min, min(s, self.sigma_max)) \
                if min(s, self.sigma_max) > self.sigma_min else torch.tensor([min(s, self.sigma_max), 0.0])
            y, run = SOLVERS[self.solver](self.model, xs.clone(), sigmas, extra, disable=True, transforms=self.transforms,
                                          noise_sampler=gaussian_noise(xs, generator), return_info=True,
                                          **({"eta": 1.0} if self.solver == "ddim" else {}))
        else:
            y, run = self._kernel_chain(xs, lam, extra, generator, info)
        info.nfe += run.nfe * n
        return y.reshape((x.shape[0], n) + x.shape[1:])

    def _kernel_chain(self, xs, lam, extra, generator, info):
        sigmas = sigmas_karras(self.steps, self.sigma_min, self.sigma_max, self.rho)
        center = self._center(xs, sigmas, generator, info)
        kernel = GaussianKernel(center, lam, face=self.face, splitting=self.splitting, flow=self.flow)
        eta = self.eta if self.solver == "ddim" else 0.0
        start = 0
        if self.face == "split" and self.kernel_interval is None and self.skip_tol > 0:
            start = min(kernel.first_useful_step(sigmas, eta, self.skip_tol), len(sigmas) - 2)
        sigmas = sigmas[start:]  # earlier steps contract z onto the centre: start there, skip their model calls
        z = kernel.center_at(float(sigmas[0]), xs).clone()
        if start == 0 and self.center == "iterate":  # the paper's start x + sigma_max n (a moving centre is noisy)
            z += float(sigmas[0]) * torch.randn(xs.shape, generator=generator, dtype=xs.dtype).to(xs.device)
        term = kernel if self.kernel_interval is None else LimitedInterval(kernel, *self.kernel_interval)
        kw = {"eta": eta} if self.solver == "ddim" else {}
        return SOLVERS[self.solver](self.model, z, sigmas, extra, disable=True, transforms=[*self.transforms, term],
                                    noise_sampler=gaussian_noise(z, generator), return_info=True, **kw)

    def _center(self, xs, sigmas, generator, info):
        if self.center == "iterate":
            return xs
        if self.center == "noised":
            n_c = torch.randn(xs.shape, generator=generator, dtype=xs.dtype).to(xs.device)
            return lambda sigma: xs + append_dims(torch.as_tensor(sigma, dtype=xs.dtype, device=xs.device), xs.ndim) * n_c
        return self._inversion(xs, sigmas, info)

    def _inversion(self, xs, sigmas, info):
        """Deterministic DDIM (Euler) inversion of x up the grid; centre(sigma) looks the level up."""
        den = self.denoiser(xs.shape[0] // self.n_samples, info)
        sig = [float(v) for v in sigmas]
        up = sig[-2::-1]  # ascending from the smallest positive sigma
        trajectory = dict(zip(up, euler_inversion(den, xs, up, self.extra(self.n_samples))))
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
