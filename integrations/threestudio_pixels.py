"""The threestudio guidance's pixel path (`DistillationGuidance(pixels=True)`): the prompt of a class-conditioned
pixel denoiser, and a stand-in scheduler for a VE (EDM) denoiser's timesteps."""
import math

import torch

__all__ = ["PixelConditions", "PixelSchedule", "pixel_schedule"]


class PixelConditions:
    """`prompt_utils` of the pixel path: class labels (one, or one per view) and the null label that CFG's
    unconditional branch uses; the camera of each view goes to the denoiser as `elevation` / `azimuth`."""

    def __init__(self, class_labels, null_label):
        self.class_labels = torch.as_tensor(class_labels).long().flatten()
        self.null_label = int(null_label)

    def arguments(self, elevation, azimuth, batch):
        """(cond, uncond) keyword dicts for `batch` views: labels and cameras, the null label in uncond."""
        if elevation is None or azimuth is None:
            raise ValueError("the pixel path needs each view's elevation and azimuth")
        labels = _rows_of(self.class_labels, batch, "class_labels")
        cam = {"elevation": _rows_of(elevation, batch, "elevation").float(),
               "azimuth": _rows_of(azimuth, batch, "azimuth").float()}
        return {"class_labels": labels, **cam}, {"class_labels": torch.full_like(labels, self.null_label)}


def _rows_of(value, batch, name):
    v = torch.as_tensor(value).flatten()
    if len(v) not in (1, batch):
        raise ValueError(f"{name} needs 1 or {batch} values (one per view), got {len(v)}")
    return v.expand(batch).clone()


class PixelSchedule:
    """A stand-in scheduler for a VE (EDM) pixel denoiser: `steps` training timesteps whose sigma is
    log-uniform from sigma_min to sigma_max, alphas_cumprod = 1 / (1 + sigma^2) (so sigma_t = sqrt((1 - abar)
    / abar) is exact), for the guidance's timestep ranges and threestudio's integer timesteps."""

    def __init__(self, sigma_min=0.01, sigma_max=20.0, steps=1000):
        if not 0 < sigma_min < sigma_max or int(steps) != steps or steps < 2:
            raise ValueError(f"need 0 < sigma_min < sigma_max and an integer steps >= 2, got {sigma_min}, "
                             f"{sigma_max}, {steps}")
        sigmas = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), int(steps), dtype=torch.float64)
        self.alphas_cumprod = 1 / (1 + sigmas ** 2)


def pixel_schedule(sigma_min=0.01, sigma_max=20.0, steps=1000):
    """`PixelSchedule(sigma_min, sigma_max, steps)`."""
    return PixelSchedule(sigma_min, sigma_max, steps)
