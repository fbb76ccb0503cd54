"""Bandwidth schedules for MSD and the termination criterion of paper §4.5."""
import math


def linear_decay(lam0, total_steps):
    """The paper's 2D schedule: lambda_k = lambda_0 (1 - k / K), k = 0..K-1 (last value lambda_0 / K)."""
    if not lam0 > 0 or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"need lam0 > 0 and a positive integer total_steps, got {lam0}, {total_steps}")
    return lambda k, mean_shift_norm=None: lam0 * (1 - min(k, total_steps - 1) / total_steps)


def constant(lam):
    """A fixed bandwidth."""
    if not lam > 0:
        raise ValueError(f"bandwidth must be > 0, got {lam}")
    return lambda k, mean_shift_norm=None: lam


class AdaptiveBandwidth:
    """Shrink lambda by `factor` once the mean-shift step is small against the kernel's scale:
    mean |m| < ratio * lambda means the iterate sits at a mode of p * G_lambda, so a narrower kernel
    can resolve more; never below `floor`. Stateful per optimisation run (create one per run)."""

    def __init__(self, lam0, factor=0.7, ratio=0.05, floor=1e-2):
        if not (lam0 > 0 and 0 < factor < 1 and ratio > 0 and floor > 0):
            raise ValueError(f"need lam0 > 0, 0 < factor < 1, ratio > 0, floor > 0; got {lam0}, {factor}, {ratio}, {floor}")
        self.lam, self.factor, self.ratio, self.floor = lam0, factor, ratio, floor

    def __call__(self, k, mean_shift_norm=None):
        if mean_shift_norm is not None and float(mean_shift_norm) < self.ratio * self.lam:
            self.lam = max(self.lam * self.factor, self.floor)
        return self.lam


def should_stop(lam, mean_shift_norm=None, lam_floor=1e-2, tol=None):
    """Paper §4.5: terminate when lambda falls below lambda_1 (1e-2 there), or when |m| < tol."""
    if lam < lam_floor:
        return True
    return tol is not None and mean_shift_norm is not None and float(mean_shift_norm) < tol and math.isfinite(tol)
