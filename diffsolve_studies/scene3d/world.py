"""A small, fully known 3-D world: procedurally defined shapes with a visible front, as voxel fields.

Coordinates: the world cube [-1, 1]^3, y up; a shape's front faces +x (azimuth 0 looks at it, see
`render.camera_rays`). Each class is a union of primitives at a fixed pose and scale, coloured from one
palette, with a part of a distinct colour on its front only, so that a front drawn on the back of a
volume is visible in its renders (the "Janus" failure). A shape is an occupancy function of points,
sampled on a voxel grid (`occupancy_grid`); `field_of` turns it into the density and colour grids the
renderer reads. The renderer composites onto `BACKGROUND` (black), a colour no shape is painted in, so that
every part of every shape (the snowman's white body, the car's white cabin) stands out from it.
"""
import torch

__all__ = ["BACKGROUND", "CLASSES", "PALETTE", "occupancy", "colour", "occupancy_grid", "field_of", "voxel_centres"]

# the palette every shape is coloured from (RGB in [0, 1])
PALETTE = {"red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.2, 0.35, 0.85),
           "yellow": (0.95, 0.85, 0.2), "grey": (0.55, 0.55, 0.55), "brown": (0.55, 0.35, 0.2),
           "orange": (0.95, 0.55, 0.1), "white": (0.95, 0.95, 0.95)}
BACKGROUND = 0.0  # the renders' background grey level: black, darker than every palette colour


def _box(p, centre, half):
    c, h = p.new_tensor(centre), p.new_tensor(half)
    return ((p - c).abs() <= h).all(-1)


def _sphere(p, centre, radius):
    return (p - p.new_tensor(centre)).norm(dim=-1) <= radius


def _cylinder_y(p, centre, radius, half_height):
    d = p - p.new_tensor(centre)
    return (d[..., [0, 2]].norm(dim=-1) <= radius) & (d[..., 1].abs() <= half_height)


# class -> list of (primitive, arguments, palette colour); the last part of each class is its front marker
_PARTS = {
    "tower": [(_cylinder_y, ((0.0, -0.1, 0.0), 0.35, 0.6), "grey"),
              (_cylinder_y, ((0.0, 0.6, 0.0), 0.45, 0.12), "red"),
              (_box, ((0.36, -0.45, 0.0), (0.08, 0.22, 0.14)), "yellow")],
    "car": [(_box, ((0.0, -0.35, 0.0), (0.7, 0.18, 0.35)), "blue"),
            (_box, ((-0.1, -0.05, 0.0), (0.35, 0.14, 0.3)), "white"),
            (_box, ((0.74, -0.35, 0.0), (0.06, 0.1, 0.3)), "orange")],
    "snowman": [(_sphere, ((0.0, -0.4, 0.0), 0.42), "white"),
                (_sphere, ((0.0, 0.25, 0.0), 0.3), "white"),
                (_box, ((0.38, 0.25, 0.0), (0.12, 0.06, 0.06)), "orange")],
    "mushroom": [(_cylinder_y, ((0.0, -0.45, 0.0), 0.16, 0.4), "brown"),
                 (_cylinder_y, ((0.0, 0.1, 0.0), 0.6, 0.16), "red"),
                 (_box, ((0.63, 0.1, 0.0), (0.05, 0.1, 0.15)), "green")],
}
CLASSES = tuple(_PARTS)


def _parts(cls):
    if cls not in _PARTS:
        raise ValueError(f"unknown shape class {cls!r}; known: {CLASSES}")
    return _PARTS[cls]


def occupancy(cls, points):
    """True where points [..., 3] lie inside shape `cls`."""
    inside = torch.zeros(points.shape[:-1], dtype=torch.bool, device=points.device)
    for prim, args, _ in _parts(cls):
        inside |= prim(points, *args)
    return inside


def colour(cls, points):
    """RGB [..., 3] of shape `cls` at points (the last part containing a point wins; outside: 0)."""
    rgb = points.new_zeros(points.shape)
    for prim, args, name in _parts(cls):
        rgb = torch.where(prim(points, *args)[..., None], points.new_tensor(PALETTE[name]), rgb)
    return rgb


def voxel_centres(resolution, dtype=torch.float32):
    """[R, R, R, 3] centres of an R^3 grid over [-1, 1]^3, indexed [z, y, x] (grid_sample's D, H, W)."""
    t = (torch.arange(resolution, dtype=dtype) + 0.5) / resolution * 2 - 1
    z, y, x = torch.meshgrid(t, t, t, indexing="ij")
    return torch.stack([x, y, z], -1)


def _voxel_sums(t, resolution, supersample):
    """Sums over each voxel's supersample^3 points of t [R s, R s, R s, ...] -> [R, R, R, ...]."""
    r, s = resolution, supersample
    return t.reshape(r, s, r, s, r, s, *t.shape[3:]).sum((1, 3, 5))


def occupancy_grid(cls, resolution=32, supersample=2):
    """Fraction of each voxel inside the shape ([R, R, R] in [0, 1]), from supersample^3 points per voxel."""
    fine = occupancy(cls, voxel_centres(resolution * supersample, torch.float64)).double()
    return (_voxel_sums(fine, resolution, supersample) / supersample ** 3).float()


def field_of(cls, resolution=32, density=40.0, supersample=2):
    """The true shape as the renderer's field: (density [1, R, R, R] = density * occupancy fraction,
    colour [3, R, R, R] in [0, 1]: the mean colour of the voxel's inside points, so that a voxel the shape
    only partly fills has the shape's colour, not the empty space's)."""
    pts = voxel_centres(resolution * supersample, torch.float64)
    count = _voxel_sums(occupancy(cls, pts).double(), resolution, supersample)
    rgb = _voxel_sums(colour(cls, pts), resolution, supersample) / count.clamp(min=1)[..., None]  # colour is 0 outside
    occ = (count / supersample ** 3).float()
    return density * occ[None], rgb.permute(3, 0, 1, 2).float()
