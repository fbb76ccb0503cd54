"""Linear multistep solvers of the probability-flow ODE dx/dsigma = eps(x, sigma) = (x - D(x, sigma)) / sigma.

Each step interpolates eps (the derivative) at the current and earlier steps by a polynomial and integrates it
over [sigma, sigma_next], so x_next = x + sum_j c_j eps_j; the solvers differ in the variable of the polynomial:

  - LMS (k-diffusion's `sample_lms`): Lagrange polynomial in sigma, integrated exactly (variable-step
    Adams-Bashforth in sigma);
  - DEIS (Zhang & Chen 2023, the "logrho" multistep of diffusers' `DEISMultistepScheduler`): Lagrange
    polynomial in log sigma, integrated over sigma (in VE coordinates rho = sigma_VP / alpha = sigma);
  - iPNDM (Zhang & Chen 2023, as ComfyUI's `sample_ipndm`): the fixed Adams-Bashforth weights of a uniform
    grid, x_next = x + (sigma_next - sigma) sum_j b_j eps_j.

The earlier eps_j come from the loop's history, eps_j = (x_j - D_j) / sigma_j for each `Past` record, so they
follow the records through the loop's affine flows (x -> a x + b maps eps to a eps). The DPM-Solver++
multistep SDE solvers live in `diffsolve.solvers.sde`.
"""
import math

from ..sampling import Solver, sample
from .registry import register

__all__ = ["DEIS", "IPNDM", "LMS", "adams_bashforth_coefficients", "deis_coefficients", "lagrange_basis",
           "lms_coefficients", "sample_deis", "sample_ipndm", "sample_lms"]


# --------------------------------------------------------------------------- exact polynomial integrals
def _times_linear(coeffs, root):
    """Coefficients (lowest degree first) of p(v) (v - root), given those of p."""
    out = [0.0] * (len(coeffs) + 1)
    for n, c in enumerate(coeffs):
        out[n + 1] += c
        out[n] -= root * c
    return out


def lagrange_basis(nodes, j):
    """Coefficients (lowest degree first) of the Lagrange basis polynomial l_j(v) = prod_{k != j}
    (v - v_k) / (v_j - v_k) of `nodes` (l_j(v_k) = 1 if k == j else 0)."""
    coeffs, denom = [1.0], 1.0
    for k, v in enumerate(nodes):
        if k != j:
            coeffs = _times_linear(coeffs, v)
            denom *= nodes[j] - v
    return [c / denom for c in coeffs]


def lms_coefficients(nodes, sigma, sigma_next):
    """c_j = int_sigma^sigma_next l_j(tau) dtau for the Lagrange basis of `nodes` (sigmas, current first),
    exactly: in v = (tau - sigma) / (sigma_next - sigma) the basis is a polynomial sum_n a_n v^n and its
    integral over [0, 1] is sum_n a_n / (n + 1). k-diffusion's `linear_multistep_coeff` computes the same
    integral with scipy's quad."""
    h = sigma_next - sigma
    v = [(t - sigma) / h for t in nodes]
    return [h * sum(a / (n + 1) for n, a in enumerate(lagrange_basis(v, j))) for j in range(len(v))]


def _exp_moments(w1, n):
    """I_m = int_0^w1 w^m e^w dw for m = 0..n: the power series sum_k w1^(m+k+1) / (k! (m+k+1)) for
    |w1| < 1 (no cancellation for small steps), else the recursion I_0 = expm1(w1), I_m = w1^m e^w1 - m I_(m-1)."""
    if abs(w1) < 1:
        out = []
        for m in range(n + 1):
            total, term, k = 0.0, w1 ** (m + 1), 0  # term = w1^(m+k+1) / k!
            while True:
                add = term / (m + k + 1)
                total += add
                if abs(add) <= 1e-17 * abs(total):
                    break
                k += 1
                term *= w1 / k
            out.append(total)
        return out
    out = [math.expm1(w1)]
    for m in range(1, n + 1):
        out.append(w1 ** m * math.exp(w1) - m * out[-1])
    return out


def deis_coefficients(nodes, sigma, sigma_next):
    """c_j = int_sigma^sigma_next l_j(log tau) dtau for the Lagrange basis in log sigma of `nodes` (sigmas,
    current first): DEIS's log-rho multistep (Zhang & Chen 2023, eq. 15 with the eps polynomial in log rho;
    diffusers' `ind_fn`). With w = log(tau / sigma) the basis is a polynomial sum_m a_m w^m and
    dtau = sigma e^w dw, so c_j = sigma sum_m a_m int_0^log(sigma_next / sigma) w^m e^w dw, in closed form."""
    w = [math.log(t / sigma) for t in nodes]
    moments = _exp_moments(math.log(sigma_next / sigma), len(w) - 1)
    return [sigma * sum(a * i for a, i in zip(lagrange_basis(w, j), moments)) for j in range(len(w))]


def adams_bashforth_coefficients(order):
    """The Adams-Bashforth weights b_j of a uniform grid (nodes 0, -1, ..., 1 - order integrated over [0, 1]):
    1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24 for orders 1-4."""
    return lms_coefficients([-float(j) for j in range(order)], 0.0, 1.0)


# ----------------------------------------------------------------------------------------- helpers
def _check_order(value, name, high):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer from 1 to {high}, got {value!r}")
    return value


def _derivatives(s, d, k):
    """(sigmas, eps) of the current step and its k - 1 latest predecessors, newest first, from the records."""
    past = tuple(reversed(s.history[len(s.history) - (k - 1):])) if k > 1 else ()
    sigmas = [s.sigma] + [p.sigma for p in past]
    eps = [(s.x - d) / s.sigma] + [(p.x - p.denoised) / p.sigma for p in past]
    return sigmas, eps


def _combine(x, coeffs, eps):
    for c, e in zip(coeffs, eps):
        x = x + c * e
    return x


# ----------------------------------------------------------------------------------------- solvers
class LMS(Solver):
    """k-diffusion's linear multistep method (`sample_lms`): variable-step Adams-Bashforth in sigma,
    x_next = x + sum_j c_j eps_j with c_j = int_sigma^sigma_next l_j(tau) dtau (`lms_coefficients`), at order
    min(order, steps so far); the last step to sigma = 0 integrates the same polynomial. Global order `order`
    (nominal: the Euler / lower-order first steps add an O(h^2) term, small on grids that start where the flow
    is nearly linear in sigma; order 4 measures 3.7-3.8 over 64-256 Karras steps)."""

    evaluates_at_start = True  # one model call, at the step's start: flows go after the step

    name, stochastic = "lms", False

    def __init__(self, order=4):
        self.order = _check_order(order, "order", 4)
        self.history = self.order - 1

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        sigmas, eps = _derivatives(s, d, min(self.order, len(s.history) + 1))
        return _combine(s.x, lms_coefficients(sigmas, s.sigma, s.sigma_next), eps)

    def __repr__(self):
        return f"LMS(order={self.order})"


class DEIS(Solver):
    """DEIS (Zhang & Chen 2023) as diffusers' `DEISMultistepScheduler` (algorithm_type "deis", solver_type
    "logrho") computes it, in VE coordinates: x_next = x + sum_j c_j eps_j with c_j = int_sigma^sigma_next
    l_j(log tau) dtau (`deis_coefficients`). Order min(max_order, steps so far); with `lower_order_final` and fewer
    than 15 steps the last two steps use at most orders 1 and 2 (diffusers' rule); the step to sigma = 0 is
    first order (returns D), where diffusers never goes. Global order `max_order` (1-3).

    Not ComfyUI's `sample_deis` (zju-pi's 'tab' mode integrates in VP time); only the name is ComfyUI's."""

    evaluates_at_start = True  # one model call, at the step's start: flows go after the step

    name, stochastic = "deis", False

    def __init__(self, max_order=3, lower_order_final=True):
        self.order = self.max_order = _check_order(max_order, "max_order", 3)
        self.history = self.order - 1
        self.lower_order_final = bool(lower_order_final)

    def order_at(self, s):
        """The order step s uses."""
        k = min(self.order, len(s.history) + 1)
        n = len(s.sigmas) - 1
        return min(k, n - s.i) if self.lower_order_final and n < 15 else k

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        sigmas, eps = _derivatives(s, d, self.order_at(s))
        return _combine(s.x, deis_coefficients(sigmas, s.sigma, s.sigma_next), eps)

    def __repr__(self):
        return f"DEIS(max_order={self.order}, lower_order_final={self.lower_order_final})"


class IPNDM(Solver):
    """iPNDM (Zhang & Chen 2023, improved PNDM): x_next = x + (sigma_next - sigma) sum_j b_j eps_j with the
    fixed Adams-Bashforth weights b of order min(max_order, steps so far) (`adams_bashforth_coefficients`),
    as ComfyUI's `sample_ipndm` (comfy/k_diffusion/sampling.py, from zju-pi/diff-sampler); the last step to
    sigma = 0 returns D. Fixed weights are exact for uniform steps in sigma (order `max_order` there, less the
    lower-order start); on a non-uniform grid sigma(u) (Karras, log-uniform) their mismatch leaves a local
    O(h^3) error: global order min(max_order, 2), which is what `order` declares."""

    evaluates_at_start = True  # one model call, at the step's start: flows go after the step

    name, stochastic = "ipndm", False

    def __init__(self, max_order=4):
        self.max_order = _check_order(max_order, "max_order", 4)
        self.order, self.history = min(self.max_order, 2), self.max_order - 1
        self._weights = tuple(tuple(adams_bashforth_coefficients(k)) for k in range(1, self.max_order + 1))

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        k = min(self.max_order, len(s.history) + 1)
        _, eps = _derivatives(s, d, k)
        h = s.sigma_next - s.sigma
        return _combine(s.x, [h * b for b in self._weights[k - 1]], eps)

    def __repr__(self):
        return f"IPNDM(max_order={self.max_order})"


# ---------------------------------------------------------------------------- k-diffusion signatures
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, **loop):
    """k-diffusion's `sample_lms` on diffsolve's loop."""
    return sample(LMS(order), model, x, sigmas, extra_args, callback, disable, **loop)


def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3,
                lower_order_final=True, **loop):
    """diffusers' DEIS multistep (log-rho) on diffsolve's loop, with ComfyUI's `max_order` (1-3)."""
    return sample(DEIS(max_order, lower_order_final), model, x, sigmas, extra_args, callback, disable, **loop)


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, **loop):
    """ComfyUI's `sample_ipndm` on diffsolve's loop."""
    return sample(IPNDM(max_order), model, x, sigmas, extra_args, callback, disable, **loop)


register("lms", LMS)
register("deis", DEIS)
register("ipndm", IPNDM)
