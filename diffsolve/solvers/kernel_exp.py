"""Kernel-exact exponential integrator of mean-shift distillation's product ODE / SDE (paper eq. 9, 12, 14-15).

With the Gaussian kernel's score 2 (c - z) / lambda**2 added to the model's (`GaussianKernel`), the reverse
SDE of the DPM-Solver++ SDE family (k = 1 + eta, as `diffsolve.solvers.sde`) reads, in VE coordinates,

    dz = k [ (z - D(z, sigma)) / sigma + 2 sigma (z - c) / lambda**2 ] dsigma + sqrt(2 eta sigma) dW

(sigma decreasing; eta = 0 is the probability-flow ODE). Everything but D is linear in z. With
a(tau) = k / tau + R tau (R = 2 k / lambda**2) the step from sigma to sigma' is, exactly,

    z' = Phi z + int_sigma'^sigma Phi(tau) [k D(tau) / tau + R tau c] dtau + noise,
    Phi(tau) = (sigma' / tau)**k exp(-R (tau**2 - sigma'**2) / 2),  Phi = Phi(sigma),

and D is extrapolated as a polynomial in t = -log sigma through the step's and the earlier steps' predictions
(DPM-Solver++'s variable: D is smooth in log sigma, and at R = 0 the weights are DPM-Solver++'s phi-functions).
So the linear part (the stiff kernel included) is integrated exactly: no splitting error, no stability limit.
The weights int Phi(tau) k / tau (u / h)**m dtau (u = log(sigma / tau), h = log(sigma / sigma')) have no
elementary closed form for general k, so they are computed by Gauss-Legendre quadrature after the substitution
p = -log Phi(tau) in float64 (`laplace_integrals`), which turns the kernel's boundary layer into the weight
e^-p and keeps every integrand smooth: machine precision at every sigma |dsigma| / lambda**2 and every h.
The noise of the linear part is exact too: Gaussian with variance int Phi(tau)**2 2 eta tau dtau.

It removes stiffness and splitting error, not the chain's bias: the kernel-guided score is not the score of the
noisy product p_sigma * G (paper §3.3), so the chain's limit differs from the product (docs/samplers.md).

The polynomial: order 1 freezes D; order 2 adds the divided difference a_1 = (D - D_1) / r0; order 3 the
quadratic a_2 through D_2 (nodes 0, -r0, -(r0 + r1) in units of h). weights="exact" integrates that polynomial
exactly (order = `order`); weights="kdiffusion" keeps k-diffusion's approximations of the phi-integrals as their
kernel-weighted analogues: order 2 uses W_0 / 2 for W_1 (`sample_dpmpp_2m`'s 1 + 1/(2r), `sample_dpmpp_2m_sde`'s
"midpoint"), order 3 uses W_2 / 2 (`sample_dpmpp_3m_sde`'s -phi_3 for the exact -2 phi_3: global order 2, as
`DPMpp3MSDE` declares). With lambda -> infinity (and with no flows, exactly) a step is the DPM-Solver++ step.
"""
import functools
import math

import torch

from ..sampling import Solver, sample
from .registry import register

__all__ = ["KernelExponential", "sample_kernel_exp"]  # the weight helpers stay in this module

WEIGHT_RULES = ("exact", "kdiffusion")
_F64 = torch.float64
_PANEL, _CUT, _NODES = 2.0, 46.0, 16  # quadrature panels in p = -log Phi; e^-46 < 1e-19 ends the integral


def gauss_legendre(n):
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1] (Newton on P_n, float64)."""
    nodes, weights = [], []
    for i in range(1, n + 1):
        x = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for k in range(2, n + 1):
                p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
            dp = n * (x * p1 - p0) / (x * x - 1)
            step = p1 / dp
            x -= step
            if abs(step) < 1e-16:
                break
        nodes.append(0.5 * (1 - x))
        weights.append(1.0 / ((1 - x * x) * dp * dp))
    return torch.tensor(nodes, dtype=_F64), torch.tensor(weights, dtype=_F64)


_GL = gauss_legendre(_NODES)
_GL_FLOATS = tuple(zip(_GL[0].tolist(), _GL[1].tolist()))


def exp_weights(a, n):
    """W_m(a) = a int_0^1 e^(-a (1 - y)) y^m dy for m = 0..n: the lambda -> infinity weights of D's polynomial
    terms (u / h)^m, a = k h. W_0 = 1 - e^-a, W_1 = 1 + expm1(-a) / a (k-diffusion's phi_2), W_2 = -2 phi_3;
    the series m! a sum_j (-a)^j / (j + m + 1)! below a = 1 (no cancellation for small steps), else
    W_m = 1 - m W_(m-1) / a."""
    out = [-math.expm1(-a)]
    for m in range(1, n + 1):
        if a < 1:
            total, term, j = 0.0, 1.0 / math.factorial(m + 1), 0  # term = (-a)^j / (j + m + 1)!
            while abs(term) > 1e-18 * abs(total) or j == 0:
                total += term
                j += 1
                term *= -a / (j + m + 1)
            out.append(math.factorial(m) * a * total)
        else:
            out.append(1 - m * out[-1] / a)
    return out


def _invert(p, a, b, h):
    """v in [0, h] with a v + b expm1(2 v) = p (a > 0, b >= 0; convex increasing in v): Newton from the
    least of the upper bounds h, p / (a + 2 b) (expm1(2v) >= 2v) and log1p(p / b) / 2, from where it
    converges monotonically from above (a few iterations: the first bound is tight for small steps)."""
    v = torch.clamp(p / (a + 2 * b), max=h)
    v = torch.where(b > 0, torch.minimum(v, 0.5 * torch.log1p(p / torch.where(b > 0, b, 1.0))), v)
    for _ in range(100):
        e2 = torch.expm1(2 * v)
        step = (a * v + b * e2 - p) / (a + 2 * b * (e2 + 1))
        v = v - step
        if bool((step <= 4e-16 * v + 1e-300).all()):
            break
    return v


def laplace_integrals(a, b, h, integrands):
    """(the integrals int_0^h exp(-(a v + b expm1(2 v))) g(v) dv for each g of `integrands`, exp(-P)) with
    P = a h + b expm1(2 h), per row of b (a [R] float64 tensor; a > 0 a float). Substituting p for the exponent
    (dp = (a + 2 b e^(2v)) dv) leaves e^-p times a smooth function of p, integrated by 16-point Gauss-Legendre
    on panels of width 2 up to min(P, 46) (beyond, e^-p < 1e-19): machine precision for a stiff kernel
    (b >> 1, the boundary layer at v = 0), a tiny step (h -> 0) and lambda -> infinity (b -> 0) alike.
    Each g maps v ([R, N]) to a tensor broadcastable to it."""
    b = b.reshape(-1, 1)
    total = a * h + b * math.expm1(2 * h)
    top = torch.clamp(total, max=_CUT)
    panels = max(1, math.ceil(float(top.max()) / _PANEL))
    edges = torch.arange(panels + 1, dtype=_F64) * _PANEL
    lo, hi = torch.minimum(edges[:-1], top), torch.minimum(edges[1:], top)  # [R, panels], empty past P
    x, w = _GL
    p = (lo[..., None] + (hi - lo)[..., None] * x).flatten(1)
    weight = ((hi - lo)[..., None] * w).flatten(1)
    v = _invert(p, a, b, h)
    base = weight * torch.exp(-p) / (a + 2 * b * torch.exp(2 * v))
    return [(base * g(v)).sum(-1) for g in integrands], torch.exp(-total.flatten())


def _laplace_scalar(a, b, h, integrands):
    """`laplace_integrals` for one row (floats in, floats out), in plain float64 arithmetic."""
    total = a * h + b * math.expm1(2 * h)
    top = min(total, _CUT)
    sums = [0.0] * len(integrands)
    for j in range(max(1, math.ceil(top / _PANEL))):
        lo, hi = min(j * _PANEL, top), min((j + 1) * _PANEL, top)
        for x, w in _GL_FLOATS:
            p = lo + (hi - lo) * x
            v = min(h, p / (a + 2 * b))
            if b > 0:
                v = min(v, 0.5 * math.log1p(p / b))
            for _ in range(100):
                e2 = math.expm1(2 * v)
                step = (a * v + b * e2 - p) / (a + 2 * b * (e2 + 1))
                v -= step
                if step <= 4e-16 * v + 1e-300:
                    break
            base = (hi - lo) * w * math.exp(-p) / (a + 2 * b * math.exp(2 * v))
            for i, g in enumerate(integrands):
                sums[i] += base * g(v)
    return sums, math.exp(-total)


@functools.lru_cache(maxsize=4096)
def _piece_scalar(k, eta, b, lo, span, top, h, q):
    gs = [lambda v, m=m: k * ((top - v) / h) ** m for m in range(q + 1)] + [lambda v: 2 * b * math.exp(2 * v)]
    (*wd, wc), decay = _laplace_scalar(k, b, span, gs)
    var = _laplace_scalar(2 * eta, 2 * b, span, [lambda v: 2 * eta * lo ** 2])[0][0] if eta > 0 else 0.0
    return tuple(wd), wc, decay, var


def piece_weights(k, eta, b, lo, span, top, h, q):
    """The exact weights of one piece [lo, lo e^span] of a step of length h (in log sigma) whose upper end lies
    top - span below the step's start, for the SDE of the module docstring with k = 1 + eta and
    b = rate lo**2 / 2: ([W_0..W_q] of D's terms (u / h)^m, W_c of the centre, Phi, the noise variance V):
    W_m = int_0^span e^-p k ((top - v) / h)^m dv, W_c = int e^-p 2 b e^(2v) dv, V = 2 eta lo**2 int e^-(2p - 2v) dv,
    p = k v + b expm1(2 v) (tau = lo e^v). b a float (cached: repeated grids cost nothing) or a [R] tensor."""
    if not isinstance(b, torch.Tensor):
        return _piece_scalar(float(k), float(eta), float(b), float(lo), float(span), float(top), float(h), int(q))
    gs = [lambda v, m=m: k * ((top - v) / h) ** m for m in range(q + 1)]
    gs.append(lambda v: 2 * b.reshape(-1, 1) * torch.exp(2 * v))
    (*wd, wc), decay = laplace_integrals(k, b, span, gs)
    var = laplace_integrals(2 * eta, 2 * b, span, [lambda v: 2 * eta * lo ** 2])[0][0] if eta > 0 else 0.0
    return wd, wc, decay, var


def _scale(value, like):
    """A float as is; a [R] tensor as [R, 1, ...] on like's device, float32 or wider."""
    return _rows(value, like) if isinstance(value, torch.Tensor) else value


def _check(order, eta, weights):
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if weights not in WEIGHT_RULES:
        raise ValueError(f"weights must be one of {WEIGHT_RULES}, got {weights!r}")
    return int(order), float(eta), weights


def _rows(value, like):
    """A float or a [R] tensor as a [R, 1, ...] tensor broadcastable to `like` (its device, float32 or wider)."""
    t = torch.as_tensor(value, dtype=_F64).reshape(-1)
    return t.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32)).reshape(
        -1, *([1] * (like.ndim - 1)))


class KernelExponential(Solver):
    """The kernel-exact exponential integrator (module docstring), orders 1-3, deterministic (eta = 0) or the
    SDE (eta > 0) of the DPM-Solver++ SDE family: `drift` is 1 + eta (so eta = 1 is the reverse SDE, drift 2).
    It absorbs the loop's flows (`Flow.linear_terms`: `GaussianKernel`'s split face, also inside
    `limited_interval`, any number of them, per-row bandwidths): on each part of a step where the same kernels
    are active their rates add and their centres average by rate. A callable centre (MSD's "noised" /
    "inverted") is frozen at each piece's lower end, where the split flow takes it, so the centre's own motion
    is first order in the step. Flows without a linear form are refused before the first model call.
    The first steps use the orders the history allows; the last step to sigma = 0 returns D (exact for D frozen:
    Phi(0, tau) = 0, the kernel's weight vanishes). Without flows, or where none is active, the step is the
    DPM-Solver++ step in closed form (`exp_weights`): orders 1 / 2 / 3 are DDIM, DPM-Solver++(2M) and its 3M,
    "exact" the phi-function integrals, "kdiffusion" k-diffusion's (`sample_dpmpp_2m` / `_2m_sde` midpoint /
    `_3m_sde`)."""

    name = "kernel_exp"
    absorbs_flows, applies_flows, evaluates_at_start = True, True, True

    def __init__(self, order=2, eta=0.0, weights="exact"):
        self.degree, self.eta, self.weights = _check(order, eta, weights)
        self.degree -= 1  # the polynomial degree of D
        self.history = self.degree
        self.order = 2 if self.degree == 2 and weights == "kdiffusion" else self.degree + 1
        self.stochastic = self.eta > 0

    def drift(self, sigmas, i):
        """1 + eta (the DPM-Solver++ SDE convention, module docstring); 1 on the last step to 0, which returns D."""
        return 1.0 + self.eta if sigmas[i + 1] > 0 else 1.0

    # ------------------------------------------------------------------------------------ the step
    def terms(self, s):
        """The flows' linear terms over this step; on the first step every flow is asked for the whole grid, so
        one it cannot integrate is refused before any model call."""
        out = []
        for f in s.flows:
            try:
                if s.i == 0:
                    f.linear_terms(s.x, s.sigmas[0], s.sigmas[-1], self.drift(s.sigmas, 0))
                out += f.linear_terms(s.x, s.sigma, s.sigma_next, self.drift(s.sigmas, s.i))
            except NotImplementedError as err:
                raise ValueError(f"{self!r} cannot integrate the flow {f!r} ({err}); use GaussianKernel's split "
                                 "face or a solver that applies flows") from None
        return out

    def polynomial(self, s, d, h):
        """[a_0, a_1, a_2] of D(u) = sum_m a_m (u / h)^m, u = log(sigma / tau), as far as the history allows."""
        q = min(self.degree, len(s.history))
        if q == 0:
            return [d]
        p1 = s.history[-1]
        r0 = math.log(p1.sigma / s.sigma) / h
        d1_0 = (d - p1.denoised) / r0
        if q == 1:
            return [d, d1_0]
        p2 = s.history[-2]
        r1 = math.log(p2.sigma / p1.sigma) / h
        d2 = (d1_0 - (p1.denoised - p2.denoised) / r1) / (r0 + r1)
        return [d, d1_0 + r0 * d2, d2]

    def rule(self, w):
        """The weights the step applies to [a_0, a_1, a_2], from their exact integrals w (module docstring)."""
        if self.weights == "exact" or len(w) == 1:
            return w
        if self.degree == 1:
            return [w[0], w[0] / 2]
        return w if len(w) == 2 else [w[0], w[1], w[2] / 2]

    def step(self, s):
        terms = self.terms(s)
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        a = self.polynomial(s, d, h)
        if not terms:
            return self._plain(s, a, h)
        return self._kernel(s, a, h, terms)

    def _plain(self, s, a, h):
        """The DPM-Solver++ (SDE) step: e^(-k h) x + sum_m W_m(k h) a_m + sigma' sqrt(1 - e^(-2 eta h)) n."""
        k = 1 + self.eta
        x = (s.sigma_next / s.sigma) * math.exp(-self.eta * h) * s.x
        for w, am in zip(self.rule(exp_weights(k * h, len(a) - 1)), a):
            x = x + w * am
        if self.stochastic:
            x = x + s.noise(s.sigma, s.sigma_next) * (s.sigma_next * math.sqrt(-math.expm1(-2 * self.eta * h)))
        return x

    def pieces(self, s, terms):
        """[(hi, lo, rate, centre)] over the parts of the step where the same terms are active: their rates
        summed (a float, or a [R] float64 tensor when a term has one per row) and their centres averaged by
        rate (None where no term is active)."""
        cuts = sorted({s.sigma, s.sigma_next, *(t.hi for t in terms), *(t.lo for t in terms)}, reverse=True)
        out = []
        for hi, lo in zip(cuts[:-1], cuts[1:]):
            active = [t for t in terms if t.lo <= lo and t.hi >= hi]
            rates = [t.rate if isinstance(t.rate, torch.Tensor) else float(t.rate) for t in active]
            if any(isinstance(r, torch.Tensor) for r in rates):
                rates = [torch.as_tensor(r, dtype=_F64).reshape(-1).cpu() for r in rates]
            rate = sum(rates) if rates else 0.0
            if not bool(torch.all(torch.as_tensor(rate) >= 0)) or not bool(torch.isfinite(torch.as_tensor(rate)).all()):
                raise ValueError(f"flow rates must be finite and >= 0, got {rate}")
            centre = None
            for t, r in zip(active, rates):
                part = _scale(r, s.x) * t.center
                centre = part if centre is None else centre + part
            if centre is not None:
                centre = centre / _scale(torch.where(rate > 0, rate, 1.0) if isinstance(rate, torch.Tensor)
                                         else (rate if rate > 0 else 1.0), s.x)
            out.append((hi, lo, rate, centre))
        return out

    def _kernel(self, s, a, h, terms):
        """Compose the exact pieces (module docstring): z' = Phi x + sum_m W_m a_m + W_c c + sqrt(V) n."""
        phi, w, cen, var = 1.0, [0.0] * len(a), 0.0, 0.0
        for hi, lo, rate, centre in self.pieces(s, terms):
            wd, wc, decay, vj = piece_weights(1 + self.eta, self.eta, rate * lo ** 2 / 2, lo, math.log(hi / lo),
                                              math.log(s.sigma / lo), h, len(a) - 1)
            phi = decay * phi
            w = [decay * wt + wj for wt, wj in zip(w, wd)]
            cen = _scale(decay, s.x) * cen  # what earlier pieces added decays through this one
            if centre is not None:
                cen = cen + _scale(wc, s.x) * centre
            var = decay ** 2 * var + vj
        x = _scale(phi, s.x) * s.x + cen
        for wm, am in zip(self.rule(w), a):
            x = x + _scale(wm, s.x) * am
        if self.stochastic:
            sd = var ** 0.5 if not isinstance(var, torch.Tensor) else torch.sqrt(var)
            x = x + s.noise(s.sigma, s.sigma_next) * _scale(sd, s.x)
        return x.to(s.x.dtype)

    def __repr__(self):
        return f"KernelExponential(order={self.degree + 1}, eta={self.eta}, weights={self.weights!r})"


def sample_kernel_exp(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, eta=0.0,
                      weights="exact", noise_sampler=None, **loop):
    """The kernel-exact exponential integrator on diffsolve's loop (give the kernel as
    `transforms=[gaussian_kernel(c, lam, face="split")]`)."""
    return sample(KernelExponential(order, eta, weights), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


def _fixed_order(order):
    def factory(eta=0.0, weights="exact"):
        return KernelExponential(order, eta, weights)
    return factory


register("kernel_exp", KernelExponential)
for _order in (1, 2, 3):
    register(f"kernel_exp_{_order}", _fixed_order(_order))
