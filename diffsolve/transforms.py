"""Score-term transforms: each wraps a denoiser and returns a denoiser, so they stack in any order.

A transform may also carry exact flows (`flows()`): linear stiff terms that the sampling loop integrates
exactly around each model step (split / exponential integration, paper eq. 14-15) instead of feeding them
to the explicit integrator. Each `Flow` carries its own splitting ("lie" or "strang"), and wrappers such
as `LimitedInterval` pass it on. `compose` builds the denoiser of one run from an ordered list; the loop
(diffsolve.sampling) applies the flows. Guidance is linear in the denoiser, so combining denoisers equals
combining noise predictions or scores at the same x and sigma.

Per-run state (model-call counts, the unconditional prediction of the latest evaluation, the state of a
stateful transform) lives in the `Run` that `wrap` receives: a new one for every sampling call and every
distiller gradient, so nothing leaks between calls.
"""
import math

import torch

from ._checks import check_like, check_positive
from .denoisers import append_dims, sigma_rows

__all__ = ["CONVENTIONS", "FLOWS", "KERNEL_FACES", "SPLITTINGS", "Flow", "GaussianKernel", "Guidance",
           "IntervalFlow", "LimitedInterval", "LinearTerm", "Run", "SampleInfo", "Transform", "autoguidance", "cfg",
           "compose", "gaussian_kernel", "limited_interval", "predict_under"]

CONVENTIONS = ("diffusers", "paper")
SPLITTINGS = ("lie", "strang")


class SampleInfo:
    """What a run cost: network evaluations (a batched CFG call of twice the batch counts 2) and steps."""

    def __init__(self, nfe=0.0, steps=0):
        self.nfe, self.steps = nfe, steps

    def __repr__(self):
        return f"SampleInfo(nfe={self.nfe}, steps={self.steps})"


class Run:
    """The state of one sampling call or one distiller gradient.

    `count(model)` counts a model's evaluations into `info.nfe` in units of `batch` rows; `uncond` is the
    unconditional prediction of the latest guided evaluation (set by guidance transforms, read by steps that
    renoise with it, e.g. CFG++); `state` is a dict where stateful transforms keep what lives across steps.
    """

    def __init__(self, batch, info=None):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch, self.info = batch, SampleInfo() if info is None else info
        self.uncond, self.state = None, {}

    def count(self, model):
        def counted(x, sigma, **cond):
            self.info.nfe += x.shape[0] / self.batch
            return model(x, sigma, **cond)
        return counted


class Flow:
    """An exact flow of a linear term, applied by the loop: `splitting` says where ("lie": after the
    step; "strang": half before, half after). `apply(x, sigma, sigma_next, drift)` integrates the term
    from sigma to sigma_next; `drift` is the factor by which the step's score drift exceeds the
    probability-flow ODE's over this interval (1 for ODE steps, 1 + eta**2 for DDIM / ancestral eta,
    1 + eta for DPM-Solver++ SDE steps; `Solver.drift` reports it). The map must be affine in x: the loop
    applies it to a multistep solver's stored points too."""

    splitting = "lie"

    def apply(self, x, sigma, sigma_next, drift=1.0):
        raise NotImplementedError

    def linear_terms(self, x, sigma, sigma_next, drift=1.0):
        """The flow's term over [sigma_next, sigma] for a solver that absorbs it (`Solver.absorbs_flows`, e.g.
        `KernelExponential`): a list of `LinearTerm(hi, lo, rate, center)`, the term being
        dz/dsigma = rate * sigma * (z - center) on each [lo, hi] and 0 elsewhere in the step. A flow that
        cannot be written so keeps this default and such solvers refuse it."""
        raise NotImplementedError(f"{type(self).__name__} has no linear form")


class LinearTerm:
    """One piece of an absorbable flow: dz/dsigma = rate * sigma * (z - center) for sigma in [lo, hi].
    rate >= 0 is a float or a [B] float64 tensor (one value per row); center is a tensor like x, frozen on
    the piece."""

    __slots__ = ("hi", "lo", "rate", "center")

    def __init__(self, hi, lo, rate, center):
        self.hi, self.lo, self.rate, self.center = float(hi), float(lo), rate, center

    def __repr__(self):
        return f"LinearTerm(hi={self.hi}, lo={self.lo}, rate={self.rate})"


class Transform:
    """Base: `wrap(model, run)` returns the denoiser of one run; `flows()` lists its exact flows;
    `renoises_with_uncond` says the step must renoise with the unconditional prediction (CFG++), which
    only solvers that split data and noise can do."""

    renoises_with_uncond = False

    def wrap(self, model, run):
        return model

    def flows(self):
        return []


def compose(model, transforms=(), run=None):
    """Apply `transforms` in order (the first wraps the model directly) for one `run` (a fresh one with
    batch 1 when None); return (denoiser, flows)."""
    run = Run(1) if run is None else run
    for t in transforms:
        if not isinstance(t, Transform):
            raise ValueError(f"transforms must be diffsolve Transform objects, got {t!r}")
        model = t.wrap(model, run)
    return model, [f for t in transforms for f in t.flows()]


def _guidance_scale(scale, convention):
    """Return s of the diffusers form u + s (c - u); the paper / threestudio form c + w (c - u) has s = 1 + w."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    return float(scale) if convention == "diffusers" else 1.0 + float(scale)


def _rows(value, batch, key, side):
    """A condition tensor with `batch` rows: batch-1 tensors are expanded, other sizes refused."""
    if value.ndim == 0 or value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{side} condition {key!r} has batch {value.shape[0]} but x has batch {batch}")


def predict_under(model, x, sigma, cond, overrides, batched=True):
    """The model's predictions at (x, sigma) under each condition set {**cond, **o}, o in `overrides`
    (diffusers' order: e.g. [uncond, {}] gives [D_u, D_c]).

    One call of len(overrides) times the batch when `batched` and the sets can share it: every key present in
    every set (batch-1 tensors are expanded) and non-tensors equal. Otherwise one call per set, so nothing is
    silently wrong: a condition the model holds itself (a prompt fixed in the denoiser) and that only an
    override names cannot be batched against it, and filling the other half with the override would give
    every half the override. Model calls cost the same either way."""
    sets = [{**cond, **o} for o in overrides]
    keys = set().union(*sets)
    if batched and len(sets) > 1 and all(k in st for st in sets for k in keys):
        b, k = x.shape[0], len(sets)
        merged, shareable = {}, True
        names = ("uncond", "cond") if k == 2 else [f"condition set {i}" for i in range(k)]
        for key in keys:
            values = [st[key] for st in sets]
            if all(isinstance(v, torch.Tensor) for v in values):
                merged[key] = torch.cat([_rows(v, b, key, name) for name, v in zip(names, values)])
            elif any(isinstance(v, torch.Tensor) for v in values) or any(v != values[0] for v in values[1:]):
                shareable = False
                break
            else:
                merged[key] = values[0]
        if shareable:
            return list(model(torch.cat([x] * k), sigma_rows(sigma, x).repeat(k), **merged).chunk(k))
    return [model(x, sigma, **st) for st in sets]


class Guidance(Transform):
    """D_g = D_u + s (D_c - D_u), with D_u from the unconditional arguments or from a guide model.

    scale is s in the "diffusers" convention (u + s (c - u)) and w in the "paper" convention
    (paper eq. 13, threestudio: c + w (c - u)); s = 1 + w. Costs 2 model evaluations per call
    (one call of twice the batch when `batched`).
    """

    def __init__(self, scale, *, uncond=None, guide=None, convention="diffusers", batched=True):
        if (uncond is None) == (guide is None):
            raise ValueError("give exactly one of uncond (condition overrides) or guide (a model)")
        self.s = _guidance_scale(scale, convention)
        self.uncond, self.guide, self.batched = uncond, guide, batched

    def wrap(self, model, run):
        s, uncond = self.s, self.uncond
        guide = run.count(self.guide) if self.guide is not None else None

        def guided(x, sigma, **cond):
            if guide is not None:
                d_c, d_u = model(x, sigma, **cond), guide(x, sigma, **cond)
            elif self.batched:
                d_u, d_c = predict_under(model, x, sigma, cond, [uncond, {}])
            else:
                d_c, d_u = model(x, sigma, **cond), model(x, sigma, **{**cond, **uncond})
            run.uncond = d_u
            return torch.lerp(d_u, d_c, s) if d_u.dtype == d_c.dtype else d_u + s * (d_c - d_u)
        return guided


def cfg(scale, uncond=None, *, uncond_model=None, convention="diffusers", batched=True):
    """Classifier-free guidance (Ho & Salimans 2021; paper eq. 13 with convention="paper")."""
    return Guidance(scale, uncond=uncond, guide=uncond_model, convention=convention, batched=batched)


def autoguidance(guide, scale, convention="diffusers"):
    """Autoguidance (Karras et al. 2024): a weaker version of the model takes the unconditional's place."""
    return Guidance(scale, guide=guide, convention=convention)


class IntervalFlow(Flow):
    """`inner` integrated over the part of each step that lies in (lo, hi]; its splitting is kept."""

    def __init__(self, inner, lo, hi):
        self.inner, self.lo, self.hi = inner, lo, hi
        self.splitting = inner.splitting

    def apply(self, x, sigma, sigma_next, drift=1.0):
        hi, lo = min(sigma, self.hi), max(sigma_next, self.lo)
        return self.inner.apply(x, hi, lo, drift) if hi > lo else x

    def linear_terms(self, x, sigma, sigma_next, drift=1.0):
        """The inner flow's terms over the part of [sigma_next, sigma] in (lo, hi]; none outside."""
        hi, lo = min(sigma, self.hi), max(sigma_next, self.lo)
        return self.inner.linear_terms(x, hi, lo, drift) if hi > lo else []


class LimitedInterval(Transform):
    """Apply `inner` only where sigma_lo < sigma <= sigma_hi (Kynkäänniemi et al. 2024), decided per
    evaluation (per row when sigma is per row); its exact flows are integrated over the overlap only, each
    with its own splitting."""

    def __init__(self, inner, sigma_lo=0.0, sigma_hi=math.inf):
        if not isinstance(inner, Transform):
            raise ValueError(f"inner must be a Transform, got {inner!r}")
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
        self.inner, self.lo, self.hi = inner, float(sigma_lo), float(sigma_hi)
        self.renoises_with_uncond = inner.renoises_with_uncond

    def active(self, sigma):
        return (sigma > self.lo) & (sigma <= self.hi)

    def flows(self):
        return [IntervalFlow(f, self.lo, self.hi) for f in self.inner.flows()]

    def wrap(self, model, run):
        inner = self.inner.wrap(model, run)

        def limited(x, sigma, **cond):
            if not isinstance(sigma, torch.Tensor) or sigma.ndim == 0:
                return inner(x, sigma, **cond) if self.active(float(sigma)) else model(x, sigma, **cond)
            mask = self.active(sigma)
            if mask.all():
                return inner(x, sigma, **cond)
            if not mask.any():
                return model(x, sigma, **cond)
            return torch.where(append_dims(mask, x.ndim), inner(x, sigma, **cond), model(x, sigma, **cond))
        return limited


def limited_interval(inner, sigma_lo=0.0, sigma_hi=math.inf):
    """`inner` active only for sigma in (sigma_lo, sigma_hi]."""
    return LimitedInterval(inner, sigma_lo, sigma_hi)


KERNEL_FACES = ("score", "split")
FLOWS = ("matched", "literal")


class GaussianKernel(Transform, Flow):
    """The product-density term of mean-shift distillation (paper eq. 9, 12; faces of eq. 14-15).

    The kernel G(u) = exp(-|u|**2 / lambda**2) has standard deviation lambda / sqrt(2) and score
    2 (c - z) / lambda**2 (eq. 9 prints it with a sign slip and without the 2). `bandwidth` is the
    paper's lambda unless `bandwidth_is="std"`. Faces:
      - "score": explicit, D' = D + sigma**2 * 2 (c - z) / lambda**2; stable only while
        sigma |dsigma| / lambda**2 <= 1 under Euler.
      - "split": the model is integrated alone and the loop applies the exact kernel flow
        z <- c + (z - c) exp(-k (sigma**2 - sigma_next**2) / lambda**2) after each step (Lie) or in
        two halves around it (Strang, second order with a second-order solver). flow="matched" uses
        k = the step's drift (1 + eta**2 for DDIM eta, what churn adds, 1 + eta for DPM++ SDE steps), so
        that both faces target one chain; flow="literal" uses k = 1 whatever the step (eq. 15 read
        literally after a stochastic step).
    `center` is a tensor like x, or a callable sigma -> tensor (the noised / inverted centre of paper
    §4.3), taken at the evaluation's sigma in the score face and at the end of each flow in the split
    face (so the split is first order whatever the solver). Factors are computed in float64 / float32:
    sigma**2 / lambda**2 reaches 1e6 and overflows float16.
    """

    def __init__(self, center, bandwidth, *, bandwidth_is="lambda", face="score", splitting="lie",
                 flow="matched"):
        if bandwidth_is not in ("lambda", "std"):
            raise ValueError(f"bandwidth_is must be 'lambda' or 'std', got {bandwidth_is!r}")
        if face not in KERNEL_FACES:
            raise ValueError(f"face must be one of {KERNEL_FACES}, got {face!r}")
        if splitting not in SPLITTINGS:
            raise ValueError(f"splitting must be one of {SPLITTINGS}, got {splitting!r}")
        if flow not in FLOWS:
            raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")
        check_positive(bandwidth, "bandwidth")
        lam = bandwidth * math.sqrt(2) if bandwidth_is == "std" else bandwidth
        self.lam2 = lam ** 2 if not isinstance(lam, torch.Tensor) else lam.to(torch.float64) ** 2
        self.center, self.face, self.splitting, self.flow_kind = center, face, splitting, flow

    @property
    def bandwidth(self):
        """The paper's lambda."""
        return self.lam2 ** 0.5

    def flows(self):
        return [self] if self.face == "split" else []

    def center_at(self, sigma, x):
        c = self.center(sigma) if callable(self.center) else self.center
        if c.shape != x.shape:
            raise ValueError(f"kernel center has shape {tuple(c.shape)} but x has shape {tuple(x.shape)}")
        check_like(x, c, "kernel center")
        return c

    def _per_row(self, value, x):
        """A float, or a [B, 1, ...] tensor in float32 or wider on x's device."""
        if not isinstance(value, torch.Tensor):
            return value
        wide = torch.promote_types(x.dtype, torch.float32)
        return append_dims(value.to(device=x.device, dtype=wide), x.ndim)

    def score(self, z, sigma):
        """grad_z log G(c - z) = 2 (c - z) / lambda**2, in float32 or wider."""
        wide = torch.promote_types(z.dtype, torch.float32)
        c = self.center_at(sigma, z)
        return 2 * (c.to(wide) - z.to(wide)) / self._per_row(self.lam2, z)

    def wrap(self, model, run):
        if self.face == "split":
            return model

        def kernel_guided(x, sigma, **cond):
            d = model(x, sigma, **cond)
            s2 = self._per_row(sigma_rows(sigma, x).to(torch.float64) ** 2, x)
            return (d.to(torch.promote_types(d.dtype, torch.float32)) + s2 * self.score(x, sigma))
        return kernel_guided

    def exponent_scale(self, drift=1.0):
        """k of the flow factor: the step's drift for the matched flow, 1 for the literal one."""
        return float(drift) if self.flow_kind == "matched" else 1.0

    def factor(self, sigma, sigma_next, drift=1.0):
        """exp(-k (sigma**2 - sigma_next**2) / lambda**2), computed in float64."""
        a = self.exponent_scale(drift) * (sigma ** 2 - sigma_next ** 2) / self.lam2
        return math.exp(-a) if not isinstance(a, torch.Tensor) else torch.exp(-a)

    def apply(self, x, sigma, sigma_next, drift=1.0):
        """Exact solution of dz/dsigma = 2 k sigma (z - c) / lambda**2 from sigma to sigma_next."""
        c = self.center_at(sigma_next, x)
        f = self._per_row(self.factor(sigma, sigma_next, drift), x)
        if isinstance(f, torch.Tensor):
            return (c + (x - c) * f).to(x.dtype)
        return torch.lerp(c, x, f)

    def linear_terms(self, x, sigma, sigma_next, drift=1.0):
        """The split face's term as one `LinearTerm`: rate 2 k / lambda**2 (k = `exponent_scale(drift)`), the
        centre frozen at sigma_next as `apply` takes it (a callable centre is first order in the step)."""
        if not sigma > sigma_next:
            return []
        rate = 2 * self.exponent_scale(drift) / self.lam2
        return [LinearTerm(sigma, sigma_next, rate, self.center_at(sigma_next, x))]

    def first_useful_step(self, sigmas, drift=1.0, tol=1e-6):
        """Index of the first step whose kernel factor exceeds `tol`: earlier steps reset z to c and only
        waste their model call, so a kernel chain should start there."""
        sig = [float(s) for s in sigmas]
        lam2_max = float(torch.as_tensor(self.lam2).max())
        k = self.exponent_scale(drift)
        for i in range(len(sig) - 1):
            if math.exp(-k * (sig[i] ** 2 - sig[i + 1] ** 2) / lam2_max) > tol:
                return i
        return len(sig) - 1


def gaussian_kernel(center, bandwidth, **kwargs):
    """The MSD product-density term; see `GaussianKernel`."""
    return GaussianKernel(center, bandwidth, **kwargs)
