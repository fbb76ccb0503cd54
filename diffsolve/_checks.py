"""Input validation shared by the core: every error names the bad value."""
import torch


def as_float(value, name):
    """A Python float from a number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    return float(value)


def check_positive(value, name):
    """Raise unless every entry of `value` (number or tensor) is finite and > 0."""
    bad = ~(torch.as_tensor(value, dtype=torch.float64) > 0) | ~torch.isfinite(torch.as_tensor(value, dtype=torch.float64))
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_sigmas(sigmas, infinite_start=False):
    """Validate a noise schedule: 1-D, at least two entries, finite (the first may be inf with
    `infinite_start`, the flow-matching t = 1), >= 0, strictly descending."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    rest = sigmas[1:] if infinite_start and sigmas[0] == float("inf") else sigmas
    if not torch.isfinite(rest).all():
        where = " (only the first may be inf)" if infinite_start else ""
        raise ValueError(f"sigmas must be finite{where}, got {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be >= 0, got {sigmas.min().item()} in {sigmas.tolist()}")
    steps = sigmas[1:] - sigmas[:-1]
    if (steps >= 0).any():
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"sigmas must be strictly descending, got sigmas[{i}]={sigmas[i].item()} <= sigmas[{i + 1}]={sigmas[i + 1].item()}")
    return sigmas


def check_like(x, other, name):
    """Raise unless tensor `other` sits on x's device with x's dtype and a batch dimension that matches."""
    if not isinstance(other, torch.Tensor):
        return
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but x is on {x.device}")
    if other.is_floating_point() and other.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {other.dtype} but x has dtype {x.dtype}")


def check_finite_step(x, i, sigma, sigma_next):
    """Cheap per-step guard: one reduction; NaN and inf both make the sum non-finite."""
    if not torch.isfinite(x.sum()):
        raise ValueError(
            f"non-finite values (NaN or inf) in x after step {i} (sigma {sigma:.6g} -> {sigma_next:.6g}); "
            "an explicit stiff term (e.g. kernel with small bandwidth) or a bad model output is the usual cause")
