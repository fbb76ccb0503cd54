"""UniPC (Zhao et al. 2023): the unified predictor-corrector, data-prediction form, in VE coordinates.

With lambda = -log sigma and h = log(sigma / sigma_next), UniP-p (the predictor) from x_i at sigma_i is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D_i - B(h) sum_{k<p} rho^p_k D1_k,
    D1_k = (D_{i-k} - D_i) / r_k,  r_k = (lambda_{i-k} - lambda_i) / h,

and UniC-p (the corrector) redoes the same step once D_{i+1} is known at the predicted point:

    x^c_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D_i - B(h) [sum_{k<p} rho^c_k D1_k + rho^c_p (D_{i+1} - D_i)],

which raises the order of accuracy from p to p + 1 at no extra model evaluation (Zhao et al. 2023,
Sec. 3.1). B(h) is the variant: "bh1" B(h) = -h, "bh2" B(h) = expm1(-h) (their B_1(h) = h and
B_2(h) = e^h - 1 in the data-prediction sign convention, hh = -h). rho^c solves the p x p system
R_p rho = g / B(h) with R_p[m, k] = r_k^m (r_p = 1) and g_m = hh phi_{m+1}(hh) m!; rho^p solves its leading
(p-1) x (p-1) block, except at p = 2 where rho^p = 1/2 (as the paper's reference code and diffusers do).

The step contract, one model evaluation per step: step i first evaluates D_i at its x (the predicted point,
recorded in the history), then corrects x with UniC (the prediction of step i - 1 and the correction share
x_{i-1} and every D1 term, so x^c_i = x_i - B(h) [sum_k (rho^c_k - rho^p_k) D1_k + rho^c_p (D_i - D_{i-1})]
needs only the (sigma, denoised) records in `s.history`), then predicts from the corrected x with D_i.
The last step has no corrector (no later evaluation), and the step to sigma = 0 returns D_i.
This matches diffusers' `UniPCMultistepScheduler(predict_x0=True, lower_order_final=True,
disable_corrector=[])` step for step (tests/test_samplers_diffusers.py).
"""
import math

import torch

from ..sampling import Solver, sample
from .registry import register

__all__ = ["UniPC", "sample_uni_pc", "sample_uni_pc_bh2", "unipc_coefficients"]

VARIANTS = ("bh1", "bh2")


def _b_of_h(h, variant):
    """B(h) in data prediction (hh = -h): bh1 -> hh, bh2 -> expm1(hh) (Zhao et al. 2023, Sec. 3)."""
    return -h if variant == "bh1" else math.expm1(-h)


def _g_terms(h, p):
    """g_m = hh phi_{m+1}(hh) m!, m = 1..p (hh = -h), with phi_1 = expm1(hh) / hh and
    phi_{m+1} = (phi_m - 1/m!) / hh (the phi functions of exponential integrators). The recursion
    loses ~log10(1/|h|**m) digits for small h, so there the series hh phi_{m+1}(hh) = sum_{j>=1}
    hh**j / (j + m)! is summed instead (the two agree to ~1e-16 at |h| = 1/2)."""
    hh = -h
    if abs(hh) < 0.5:
        return [math.factorial(m) * sum(hh ** j / math.factorial(j + m) for j in range(1, 24))
                for m in range(1, p + 1)]
    hphi = math.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    out, fact = [], 1.0
    for m in range(1, p + 1):
        out.append(hphi * fact)
        fact *= m + 1
        hphi = hphi / hh - 1.0 / fact
    return out


def _solve(rs, rhs):
    """Solve sum_k rs[k]**m rho_k = rhs[m] (m = 0..len-1) in float64: the Vandermonde system R rho = b."""
    R = torch.tensor([[r ** m for r in rs] for m in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(rhs, dtype=torch.float64)).tolist()


def unipc_coefficients(h, rs, variant="bh1"):
    """(B(h), rho_p, rho_c) of UniP-p / UniC-p with p = len(rs) + 1 and rs = [r_1, ..., r_{p-1}]
    (r_k = (lambda_{i-k} - lambda_i) / h < 0): rho_p has p - 1 entries (the predictor's weights of D1_k),
    rho_c has p (the corrector's weights of D1_k and, last, of D_{i+1} - D_i)."""
    p = len(rs) + 1
    B = _b_of_h(h, variant)
    b = [g / B for g in _g_terms(h, p)]
    nodes = list(rs) + [1.0]
    rho_p = [] if p == 1 else [0.5] if p == 2 else _solve(rs, b[:-1])
    rho_c = [0.5] if p == 1 else _solve(nodes, b)
    return B, rho_p, rho_c


def _weighted(base, records, weights, rs):
    """sum_k weights[k] * (records[k].denoised - base) / rs[k], or None when empty."""
    out = None
    for w, rec, r in zip(weights, records, rs):
        if w:
            term = (rec.denoised - base) * (w / r)
            out = term if out is None else out + term
    return out


def _check_options(order, variant, disable_corrector):
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    steps = tuple(disable_corrector)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in steps):
        raise ValueError(f"disable_corrector must hold step indices >= 0, got {disable_corrector!r}")
    return frozenset(steps)


class UniPC(Solver):
    """UniPC-p, data prediction (Zhao et al. 2023). order: the predictor order p in 1..3 (diffusers'
    solver_order), warmed up over the first steps and, with lower_order_final, lowered near the end as
    diffusers does: step i uses p_i = min(order, i + 1, n - i). variant: "bh1" (ComfyUI's "uni_pc") or
    "bh2" ("uni_pc_bh2", diffusers' default). disable_corrector: indices of steps whose prediction is not
    corrected. UniC-p has order p + 1 (Zhao et al. 2023, Sec. 3.1), but the warm-up's first step
    (UniPC-1, local error O(h^3)) bounds the global order at 3, and with lower_order_final the bare
    first-order last step (local error O(h^2)) bounds it at 2 on a grid that ends above sigma = 0: the
    declared `order` is min(p + 1, 3), or 2 with lower_order_final. One model evaluation per step;
    history p records."""

    stochastic, evaluates_at_start = False, True

    def __init__(self, order=3, variant="bh1", lower_order_final=True, disable_corrector=()):
        self.disable_corrector = _check_options(order, variant, disable_corrector)
        self.solver_order, self.variant = order, variant
        self.lower_order_final = bool(lower_order_final)
        self.order = 2 if self.lower_order_final else min(order + 1, 3)
        self.history = order
        self.name = "uni_pc" if variant == "bh1" else "uni_pc_bh2"

    def predictor_order(self, n_steps, i):
        """Order of step i's predictor (diffusers' warm-up and lower_order_final)."""
        p = min(self.solver_order, i + 1)
        return min(p, n_steps - i) if self.lower_order_final else p

    def correct(self, s, d):
        """UniC applied to s.x (the prediction of step i - 1) with D_i = d: returns x^c_i."""
        p = self.predictor_order(len(s.sigmas) - 1, s.i - 1)
        base, past = s.history[-1], s.history[-p:-1][::-1]  # D_{i-1}; then D_{i-2}, ..., D_{i-p}
        h = math.log(base.sigma / s.sigma)
        rs = [math.log(base.sigma / rec.sigma) / h for rec in past]
        B, rho_p, rho_c = unipc_coefficients(h, rs, self.variant)
        delta = (d - base.denoised) * rho_c[-1]
        older = _weighted(base.denoised, past, [c - q for c, q in zip(rho_c, rho_p)], rs)
        return s.x - B * (delta if older is None else delta + older)

    def predict(self, s, x, d):
        """UniP from x at s.sigma with D = d to s.sigma_next."""
        if s.sigma_next == 0:
            return d
        p = self.predictor_order(len(s.sigmas) - 1, s.i)
        past = s.history[len(s.history) - (p - 1):][::-1] if p > 1 else ()  # D_{i-1}, ..., D_{i-p+1}
        h = math.log(s.sigma / s.sigma_next)
        rs = [math.log(s.sigma / rec.sigma) / h for rec in past]
        B, rho_p, _ = unipc_coefficients(h, rs, self.variant)
        x_next = (s.sigma_next / s.sigma) * x - math.expm1(-h) * d
        res = _weighted(d, past, rho_p, rs)
        return x_next if res is None else x_next - B * res

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        x = s.x
        if s.i > 0 and s.history and s.sigma_next > 0 and (s.i - 1) not in self.disable_corrector:
            x = self.correct(s, d)  # at sigma_next = 0 the result is D_i whatever x is
        return self.predict(s, x, d)

    def __repr__(self):
        return f"UniPC(order={self.solver_order}, variant={self.variant!r})"


def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant="bh1",
                  lower_order_final=True, disable_corrector=(), **loop):
    """ComfyUI's "uni_pc" (UniPC-3, B(h) = bh1 by default) on diffsolve's loop."""
    return sample(UniPC(order, variant, lower_order_final, disable_corrector), model, x, sigmas, extra_args,
                  callback, disable, **loop)


def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3,
                      lower_order_final=True, disable_corrector=(), **loop):
    """ComfyUI's "uni_pc_bh2": UniPC with B(h) = expm1(-h)."""
    return sample(UniPC(order, "bh2", lower_order_final, disable_corrector), model, x, sigmas, extra_args,
                  callback, disable, **loop)


def _uni_pc_bh2(order=3, lower_order_final=True, disable_corrector=()):
    return UniPC(order, "bh2", lower_order_final, disable_corrector)


register("uni_pc", UniPC)
register("uni_pc_bh2", _uni_pc_bh2)
