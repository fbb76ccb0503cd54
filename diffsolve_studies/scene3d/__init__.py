"""A 3-D distillation testbed with ground truth: a small known world of shapes, a differentiable volume
renderer, and (in the other modules) a view-conditioned prior trained on its renders."""
from .render import VoxelField, camera_rays, random_cameras, render
from .world import CLASSES, PALETTE, colour, field_of, occupancy, occupancy_grid, voxel_centres

__all__ = ["CLASSES", "PALETTE", "VoxelField", "camera_rays", "colour", "field_of", "occupancy", "occupancy_grid",
           "random_cameras", "render", "voxel_centres"]
