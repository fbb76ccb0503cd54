"""What a check returns (`CheckReport`), the thresholds every check reads (`Config`, whose defaults are the stability
report's), and small shared helpers."""
import dataclasses
import math
from typing import Any, Optional

import torch

from .samplers import Noise, NotApplicable

__all__ = ["CheckReport", "Config", "DEFAULT", "NotApplicable", "asserting"]


@dataclasses.dataclass
class CheckReport:
    """One check's outcome: passed is True, False, or None (not applicable to this sampler); measured and expected
    are the figures the table prints; details says how it was measured and, on failure, what went wrong."""

    name: str
    passed: Optional[bool]
    measured: Any = None
    expected: Any = None
    details: str = ""

    def check(self):
        """The assertion form: AssertionError naming the check when it failed; returns self."""
        if self.passed is False:
            raise AssertionError(f"{self.name} failed: measured {fmt(self.measured)}, expected {fmt(self.expected)}. "
                                 f"{self.details}")
        return self

    def to_dict(self):
        return {"name": self.name, "passed": self.passed, "measured": _json(self.measured),
                "expected": _json(self.expected), "details": self.details}


def _json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def fmt(value):
    """A figure as the tables print it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every threshold and size the checks use; the defaults are the stability report's.

    order: exact-flow error on the anisotropic single Gaussian over Karras (rho 7) grids on [order_sigma_min,
    order_sigma_max] without a final 0 (so the final step to 0 does not cap the order), steps `order_ns`; the slope
    over the last `order_fit` points must reach the nominal order - `order_tol`. Stochastic samplers: the error of the
    chain's variance against the exact marginal s^2 + sigma^2, exactly (linear probes) when the kit controls the
    noise, else from `weak_samples` Monte Carlo draws; pass at nominal weak order - `weak_tol`.
    exactness: point mass, relative error <= max(exact_tol, 100 * sampler.precision).
    stiff: bisection in q = sigma |dsigma| / lambda^2 on [stiff_q_min, stiff_q_max] over a constant-stiffness grid of
    `stiff_steps` steps from stiff_sigma_max to stiff_sigma_end; bounded = final error <= stiff_growth * |x0 - c|.
    batch / threads: relative max difference <= tol64 (float64) / tol32 (float32)."""

    order_ns: tuple = (16, 32, 64, 128, 256)
    order_fit: int = 3
    order_tol: float = 0.25
    order_sigma_min: float = 0.02
    order_sigma_max: float = 80.0
    rho: float = 7.0
    order_rows: int = 16
    weak_ns: tuple = (16, 32, 64, 128, 256)
    weak_tol: float = 0.5
    weak_samples: int = 400_000
    weak_z: float = 5.0
    exact_tol: float = 1e-10
    agree_steps: int = 128
    agree_tol: float = 0.1
    agree_samples: int = 20_000
    agree_stochastic_steps: int = 256
    agree_stochastic_tol: float = 0.05
    reference_steps: int = 512
    stiff_steps: int = 64
    stiff_sigma_max: float = 10.0
    stiff_sigma_end: float = 1.0
    stiff_q_min: float = 0.05
    stiff_q_max: float = 100.0
    stiff_iters: int = 18
    stiff_growth: float = 2.0
    stiff_scale: float = 1e6
    batch_rows: int = 8
    batch_split: int = 3
    tol64: float = 1e-12
    tol32: float = 1e-6
    thread_counts: tuple = (1, 2)
    thread_elements: int = 1 << 15
    contract_steps: int = 10
    finite_steps: tuple = (1, 5)
    seed: int = 0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


DEFAULT = Config()


def asserting(check):
    """The assertion form of a check function: runs it and raises AssertionError when it failed."""
    def assert_check(sampler, config=None, **meta):
        return check(sampler, config, **meta).check()
    assert_check.__name__ = "assert_" + check.__name__[len("check_"):]
    assert_check.__doc__ = f"Assertion form of `{check.__name__}`: AssertionError with the report's details on failure."
    return assert_check


# ----------------------------------------------------------------------------------------------------- helpers
def karras(n, sigma_min, sigma_max, rho=7.0, zero=False):
    """n steps of a Karras grid, float64, with or without the final 0."""
    from ..schedules import sigmas_karras
    s = sigmas_karras(n + (0 if zero else 1), sigma_min, sigma_max, rho)
    return s if zero else s[:-1]


def realized(result, sigmas):
    """The grid a run really used."""
    return sigmas if result.sigmas is None else result.sigmas


def rel_diff(a, b):
    """max |a - b| / max |a| (0 for identical tensors)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    scale = a64.abs().max().item() or 1.0
    return (a64 - b64).abs().max().item() / scale


def counted(model, batch):
    """model with a call counter in diffsolve's units (a call on r rows counts r / batch); returns (model, box)."""
    box = {"nfe": 0.0, "calls": 0}

    def wrapped(x, sigma, **cond):
        box["nfe"] += x.shape[0] / batch
        box["calls"] += 1
        return model(x, sigma, **cond)
    return wrapped, box


def noise(cfg, offset=0, per_row=True, seed=None):
    return Noise(cfg.seed + 7 if seed is None else seed, offset, per_row)
