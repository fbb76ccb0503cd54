"""scikit-learn's digits (1,797 real 8x8 images, pixels 0..16, 10 classes) as a 64-dimensional testbed.

Model space: a pixel k in {0..16} is dequantised to k + u, u ~ U[0, 1), and mapped to
x = (k + u) * 2 / 17 - 1 in [-1, 1). The density of the discrete images is bounded below by the density
of the dequantised ones (Theis et al. 2016), so NLL in bits per pixel is
    bpp = (-log p_x(x) - 64 log(2 / 17)) / (64 log 2),
and a uniform model over the 17 levels scores log2(17) = 4.09 bpp.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

LEVELS = 17
PIXELS = 64
CLASSES = 10
SCALE = 2.0 / LEVELS
LOG_JACOBIAN = PIXELS * math.log(SCALE)  # log |dx / d(k + u)| over the 64 pixels


@dataclass
class DigitsSplit:
    """Integer images [N, 64] (0..16) and labels [N], split into train and held-out."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def load_digits_split(heldout_fraction=0.3, seed=0):
    """Stratified split of sklearn's digits: the same `heldout_fraction` of every class is held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    from sklearn.datasets import load_digits
    d = load_digits()
    images, labels = np.asarray(d.data, dtype=np.int64), np.asarray(d.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in range(CLASSES):
        idx = np.flatnonzero(labels == c)
        held[rng.permutation(idx)[: int(round(heldout_fraction * len(idx)))]] = True
    t = torch.from_numpy
    return DigitsSplit(t(images[~held]), t(labels[~held]), t(images[held]), t(labels[held]))


def dequantize(images, generator=None, dtype=torch.float32):
    """Integer pixels 0..16 -> x = (k + u) 2 / 17 - 1 with u ~ U[0, 1) (fresh draw per call)."""
    images = torch.as_tensor(images)
    if images.is_floating_point() or images.min() < 0 or images.max() >= LEVELS:
        raise ValueError(f"images must be integers in 0..{LEVELS - 1}")
    u = torch.rand(images.shape, generator=generator, dtype=dtype)
    return (images.to(dtype) + u) * SCALE - 1


def centre(images, dtype=torch.float32):
    """The dequantisation cell's centre (u = 1/2): a deterministic continuous image."""
    return (torch.as_tensor(images).to(dtype) + 0.5) * SCALE - 1


def bits_per_pixel(log_px):
    """NLL in bits per pixel of the integer images from log p(x) of their dequantised versions."""
    return (-log_px - LOG_JACOBIAN) / (PIXELS * math.log(2))
