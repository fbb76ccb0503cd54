"""Renders of the true shapes: the prior's training data and the evaluation's real images.

Every view comes from a seeded random camera (`render.random_cameras`), so a data set is a pure function
of (views per class, seed, resolution): nothing is downloaded or cached.
"""
from dataclasses import dataclass

import torch

from .render import random_cameras, render
from .world import CLASSES, field_of

__all__ = ["RenderSet", "render_set", "to_model", "to_image"]


def to_model(images):
    """[0, 1] images -> the model's [-1, 1] pixels."""
    return images * 2 - 1


def to_image(x):
    """Model pixels -> [0, 1] images (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


@dataclass
class RenderSet:
    """`train_images` [N, 3, S, S] in [-1, 1], `train_labels` [N] class indices, `elevation` / `azimuth` [N]
    degrees (the name `train_*` lets the digits training loop hash and read it)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor

    def __len__(self):
        return len(self.train_labels)


@torch.no_grad()
def render_set(views_per_class, seed=0, size=32, resolution=32, chunk=256):
    """`views_per_class` renders of every class from seeded random cameras."""
    if int(views_per_class) != views_per_class or views_per_class < 1:
        raise ValueError(f"views_per_class must be a positive integer, got {views_per_class!r}")
    g = torch.Generator().manual_seed(seed)
    images, labels, elev, azim = [], [], [], []
    for k, cls in enumerate(CLASSES):
        density, rgb = field_of(cls, resolution)
        cams = random_cameras(int(views_per_class), generator=g)
        for i in range(0, int(views_per_class), chunk):
            sl = slice(i, i + chunk)
            images.append(render(density, rgb, cams["elevation"][sl], cams["azimuth"][sl],
                                 cams["camera_distances"][sl], size=size))
        labels.append(torch.full((int(views_per_class),), k, dtype=torch.long))
        elev.append(cams["elevation"]), azim.append(cams["azimuth"])
    return RenderSet(to_model(torch.cat(images)), torch.cat(labels), torch.cat(elev), torch.cat(azim))
