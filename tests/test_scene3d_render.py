"""The 3-D testbed's world, renderer and IoU against independent checks (finite differences, hand cases)."""
import math

import pytest
import torch

from diffsolve_studies.scene3d import CLASSES, VoxelField, camera_rays, field_of, occupancy, render
from diffsolve_studies.scene3d.render import trilinear
from diffsolve_studies.scene3d.world import BACKGROUND
from diffsolve_studies.scene3d.geometry import iou, occupied, shape_iou


def test_renderer_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    density = torch.rand(1, 4, 4, 4, generator=g, dtype=torch.float64) * 3
    rgb = torch.rand(3, 4, 4, 4, generator=g, dtype=torch.float64)

    def f(d, c):
        return render(d, c, 20.0, torch.tensor([30.0, -100.0]), 2.5, size=3, samples=6)

    assert torch.autograd.gradcheck(f, (density.requires_grad_(), rgb.requires_grad_()), eps=1e-6, atol=1e-6)


def test_empty_field_renders_the_background_and_an_opaque_slab_its_colour():
    r = 8
    empty = render(torch.zeros(1, r, r, r), torch.zeros(3, r, r, r), 0.0, 0.0, 2.5, size=4)
    assert torch.allclose(empty, torch.full_like(empty, BACKGROUND))
    dens, rgb = torch.full((1, r, r, r), 1e3), torch.zeros(3, r, r, r)
    rgb[1] = 1.0  # green everywhere: the central rays see a green, opaque cube
    img = render(dens, rgb, 0.0, 0.0, 2.5, size=4, samples=64)
    centre = img[0, :, 1:3, 1:3]
    assert torch.allclose(centre, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand_as(centre), atol=1e-4)


@pytest.mark.parametrize("cls", CLASSES)
def test_every_shape_stands_out_from_the_background(cls):
    # a part painted in the background's colour leaves no trace in the renders the prior learns from and the
    # distillers are judged by: every opaque pixel of every class must differ from the background
    density, rgb = field_of(cls, 32)
    views = render(density, rgb, torch.tensor([20.0, 20.0, 60.0]), torch.tensor([0.0, 180.0, 90.0]), 2.4)
    opaque = render(density, torch.zeros_like(rgb), torch.tensor([20.0, 20.0, 60.0]),
                    torch.tensor([0.0, 180.0, 90.0]), 2.4, background=1.0).mean(1) < 0.05  # opacity > 0.95
    assert opaque.sum() > 50
    contrast = (views - BACKGROUND).abs().amax(1)[opaque]
    assert contrast.min() > 0.15, f"{cls}: {int((contrast <= 0.15).sum())} opaque pixels match the background"


def test_absorption_through_a_uniform_cube_is_beer_lambert():
    # the central ray of a camera on the x axis crosses the cube over length 2; the density is sigma up to the
    # outermost voxel centres (1 / R from the faces) and falls linearly towards the zero padding beyond them,
    # to sigma / 2 at the faces: optical depth sigma (2 - 2 / R + 2 * 0.75 / R) = sigma (2 - 1 / (2 R))
    r, sigma = 16, 0.7
    img = render(torch.full((1, r, r, r), sigma, dtype=torch.float64), torch.zeros(3, r, r, r, dtype=torch.float64),
                 0.0, 0.0, 3.0, size=2, samples=800, fov=1e-3, background=1.0)
    assert img[0, 0].mean().item() == pytest.approx(math.exp(-sigma * (2 - 1 / (2 * r))), rel=1e-4)


def test_trilinear_equals_grid_sample():
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(4, 6, 6, 6, generator=g, dtype=torch.float64)
    pts = torch.rand(5, 7, 3, generator=g, dtype=torch.float64) * 2.8 - 1.4  # inside and outside the cube
    ours = trilinear(vol, pts)
    peer = torch.nn.functional.grid_sample(vol[None], pts[None, None], align_corners=False)[0, :, 0].permute(1, 2, 0)
    assert torch.allclose(ours, peer, atol=1e-12)


def test_cameras_look_at_the_origin_and_azimuth_zero_sees_the_front():
    eye, dirs = camera_rays(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 90.0]), 3.0, size=2)
    assert torch.allclose(eye[0], torch.tensor([3.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(eye[1].norm(), torch.tensor(3.0))
    centre = dirs.mean((1, 2))
    assert torch.allclose(centre / centre.norm(dim=-1, keepdim=True), -eye / 3.0, atol=1e-5)
    for cls in CLASSES:  # every class's front marker faces +x: it shows from azimuth 0 and not from 180
        d, rgb = field_of(cls, 32)
        front, back = render(d, rgb, 0.0, torch.tensor([0.0, 180.0]), 2.4)
        assert (front - back).abs().max() > 0.3, cls


def test_iou_hand_case_and_true_shape():
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, 4, dtype=torch.bool)
    a[0, :2] = True      # 8 voxels
    b[0, 1:3] = True     # 8 voxels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    dens = torch.zeros(1, 2, 2, 2)
    dens[0, 0, 0, 0] = 10.0  # opacity 1 - exp(-10 * 1) > 0.5; the rest empty
    assert occupied(dens, 1.0).sum() == 1
    d, _ = field_of("car", 32, density=40.0)
    assert shape_iou(d, "car") > 0.9
    assert shape_iou(d, "tower") < 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="distance"):
        render(torch.zeros(1, 2, 2, 2), torch.zeros(3, 2, 2, 2), 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown shape class"):
        occupancy("teapot", torch.zeros(1, 3))
    with pytest.raises(ValueError, match="resolution"):
        VoxelField(1)
