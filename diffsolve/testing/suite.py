"""The whole suite on one sampler: `check_sampler(obj) -> SuiteReport` (a table, a dict for JSON, an assertion)."""
import time

from .checks import check_agreement, check_exactness, check_order, check_stiff_flow, check_stiff_score
from .contract import (check_batch_invariance, check_batch_invariance_float32, check_declared_noise, check_determinism,
                       check_finiteness, check_global_rng, check_nfe, check_purity, check_thread_invariance)
from .report import DEFAULT, CheckReport, fmt
from .samplers import NotApplicable, as_sampler

__all__ = ["CHECKS", "SuiteReport", "assert_sampler", "check_sampler"]

CHECKS = {"order": check_order, "exactness": check_exactness, "agreement": check_agreement,
          "stiff_score": check_stiff_score, "stiff_flow": check_stiff_flow, "determinism": check_determinism,
          "global_rng": check_global_rng,
          "batch_invariance": check_batch_invariance, "batch_invariance_float32": check_batch_invariance_float32,
          "thread_invariance": check_thread_invariance, "nfe": check_nfe, "finiteness": check_finiteness,
          "purity": check_purity, "declared_noise": check_declared_noise}


class SuiteReport:
    """The reports of one sampler, in CHECKS order. passed: no check failed (n/a ones do not count); failures: the
    names of the failed checks; table(): one row per check; to_dict(): JSON-ready."""

    def __init__(self, sampler, reports, seconds=0.0):
        self.sampler, self.reports, self.seconds = sampler, list(reports), seconds

    @property
    def passed(self):
        return all(r.passed is not False for r in self.reports)

    @property
    def failures(self):
        return [r.name for r in self.reports if r.passed is False]

    def __getitem__(self, name):
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(name)

    def table(self, details=False):
        rows = [("check", "result", "measured", "expected")]
        for r in self.reports:
            rows.append((r.name, {True: "pass", False: "FAIL", None: "n/a"}[r.passed], fmt(r.measured),
                         fmt(r.expected)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        head = f"{self.sampler.name} ({self.sampler.kind}, nominal order {fmt(self.sampler.order)})"
        lines = [head] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        if details:
            lines += [f"  {r.name}: {r.details}" for r in self.reports]
        verdict = "all checks passed" if self.passed else "FAILED: " + ", ".join(self.failures)
        return "\n".join(lines + [verdict])

    def to_dict(self):
        return {"name": self.sampler.name, "kind": self.sampler.kind, "order": self.sampler.order,
                "adaptive": self.sampler.adaptive, "grid": self.sampler.grid,
                "passed": self.passed, "failures": self.failures, "seconds": round(self.seconds, 2),
                "checks": {r.name: r.to_dict() for r in self.reports}}

    def assert_passed(self):
        """AssertionError naming every failed check with its details."""
        if not self.passed:
            raise AssertionError(self.table() + "\n" + "\n".join(
                f"{r.name}: {r.details}" for r in self.reports if r.passed is False))
        return self

    def __repr__(self):
        return f"SuiteReport({self.sampler.name!r}, failures={self.failures})"


def run_check(name, sampler, config):
    """One check by name; NotApplicable becomes n/a and any other exception a failure naming it."""
    try:
        return CHECKS[name](sampler, config)
    except NotApplicable as e:
        return CheckReport(name, None, None, None, str(e))
    except Exception as e:  # noqa: BLE001 - a sampler that crashes a check fails it
        return CheckReport(name, False, None, None, f"raised {type(e).__name__}: {str(e)[:300]}")


def check_sampler(obj, kind=None, config=None, checks=None, **meta):
    """Every check (or those named in `checks`) on obj: a diffsolve Solver class / instance / registry name, a
    k-diffusion-style function, or a `Sampler` (e.g. a diffusers scheduler through
    `diffsolve.integrations.scheduler_step.scheduler_sampler`). `meta` (name, order, stochastic, nfe) overrides what
    the kit infers; `config` overrides the thresholds (`Config`). Returns a SuiteReport."""
    sampler = as_sampler(obj, kind, **meta)
    config = config or DEFAULT
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    start = time.perf_counter()
    reports = [run_check(name, sampler, config) for name in names]
    return SuiteReport(sampler, reports, time.perf_counter() - start)


def assert_sampler(obj, kind=None, config=None, checks=None, **meta):
    """`check_sampler(...).assert_passed()`."""
    return check_sampler(obj, kind, config, checks, **meta).assert_passed()
