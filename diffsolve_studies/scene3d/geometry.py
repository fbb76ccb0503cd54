"""Shape metrics against the truth: the 3-D IoU of an optimised density with a class's shape."""
import torch

from .world import occupancy_grid

__all__ = ["iou", "occupied", "shape_iou"]


def occupied(density, voxel_size, opacity=0.5):
    """Voxels whose own opacity 1 - exp(-density * voxel_size) exceeds `opacity` (density [1, R, R, R])."""
    if not 0 < opacity < 1:
        raise ValueError(f"opacity must lie in (0, 1), got {opacity}")
    return (1 - torch.exp(-density[0] * voxel_size)) > opacity


def iou(a, b):
    """|a & b| / |a | b| of two boolean grids (1 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"grids differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def shape_iou(density, cls, opacity=0.5):
    """IoU of the voxels a density makes opaque with the voxels at least half inside shape `cls`."""
    r = density.shape[-1]
    truth = occupancy_grid(cls, r) >= 0.5
    return iou(occupied(density, 2.0 / r, opacity), truth)
