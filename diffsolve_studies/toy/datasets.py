"""The fractal tree of Karras et al. (2024) as the MSD paper draws it, and pinwheel / spiral.

The tree is built from its published recipe (the design notes: design/toy-experiments.md §1.1-1.2):
8 anisotropic Gaussians per branch, binary branching, per-axis scale. The MSD figures show a depth-5
tree whose class A points straight up and class B straight down; that is the default here.
"""
import math

import numpy as np
import torch

from diffsolve.analytic import GaussianMixture

ORIGIN = (0.0030, 0.0325)
SCALE = (1.3136, 1.3844)


def _tree_components(depth_limit, angles, seed):
    """Yield (class, weight, mean, covariance) in the recipe's order, drawing from one RandomState."""
    rnd = np.random.RandomState(seed)
    scale = np.array(SCALE)
    out = []

    def branch(cls, depth, pos, angle):
        if depth >= depth_limit:
            return
        direction = np.array([math.cos(angle), math.sin(angle)])
        dist = 0.292 * 0.8 ** depth * (rnd.randn() * 0.2 + 1)
        thick = 0.2 * 0.8 ** depth / dist
        size = scale * dist * 0.06
        along = np.outer(direction, direction)
        cov = (along + (np.eye(2) - along) * thick ** 2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, 8):
            out.append((cls, dist * 0.5 ** depth, (pos + direction * dist * t) * scale, cov))
        for sign in (1, -1):
            branch(cls, depth + 1, pos + direction * dist, angle + sign * 0.7 ** depth * (rnd.randn() * 0.2 + 1))

    branch("A", 0, np.array(ORIGIN), angles[0])
    branch("B", 0, np.array(ORIGIN), angles[1])
    return out


def fractal_tree(classes="A", depth=5, angles=(math.pi / 2, 3 * math.pi / 2), seed=2, dtype=torch.float64):
    """The two-class fractal as a GaussianMixture over `classes` ("A" orange / up, "B" gray / down, "AB").

    depth=7 with angles (pi/4, 5pi/4) gives Karras et al.'s original tree.
    """
    if not classes or set(classes) - {"A", "B"}:
        raise ValueError(f"classes must be 'A', 'B' or 'AB', got {classes!r}")
    comps = [c for c in _tree_components(depth, angles, seed) if c[0] in classes]
    weights = torch.tensor([c[1] for c in comps], dtype=dtype)
    means = torch.tensor(np.stack([c[2] for c in comps]), dtype=dtype)
    covs = torch.tensor(np.stack([c[3] for c in comps]), dtype=dtype)
    return GaussianMixture(weights, means, covs)


def pinwheel_points(n, seed=0, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25, scale=1 / 2.5):
    """FFJORD's pinwheel, rescaled to about [-1, 1]^2 as in Moser Flow (factor 1 / 2.5)."""
    rng = np.random.RandomState(seed)
    per_arm = n // arms
    rads = np.linspace(0, 2 * np.pi, arms, endpoint=False)
    feats = rng.randn(arms * per_arm, 2) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = np.repeat(np.arange(arms), per_arm)
    angles = rads[labels] + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
    pts = np.einsum("ti,tij->tj", feats, rot)
    return torch.tensor(scale * rng.permutation(pts))


def spiral_points(n, seed=0, noise=0.1, scale=1 / 12):
    """FFJORD's two spirals, rescaled as in Moser Flow (/3 then /4, i.e. 1 / 12)."""
    rng = np.random.RandomState(seed)
    half = n // 2
    t = np.sqrt(rng.rand(half, 1)) * 540 * (2 * np.pi) / 360
    d1 = np.hstack([-np.cos(t) * t + rng.rand(half, 1) * 0.5, np.sin(t) * t + rng.rand(half, 1) * 0.5])
    x = np.vstack([d1, -d1]) + rng.randn(2 * half, 2) * noise * 3
    return torch.tensor(x * scale)


def kde_mixture(points, bandwidth=0.02, dtype=torch.float64):
    """An isotropic Gaussian KDE of `points` as a GaussianMixture (the analytic density of a point set)."""
    points = torch.as_tensor(points, dtype=dtype)
    return GaussianMixture.isotropic(points, bandwidth)


def three_component_mixture(dtype=torch.float64):
    """A small 2D mixture with full, correlated covariances: the reference of the product-density
    tests and benchmarks (its product with the MSD kernel is closed-form)."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, 1.5]], dtype=dtype)
    covs = torch.tensor([[[0.05, 0.02], [0.02, 0.03]], [[0.02, 0.0], [0.0, 0.1]],
                         [[0.04, -0.01], [-0.01, 0.02]]], dtype=dtype)
    return GaussianMixture(torch.tensor([0.3, 0.4, 0.3], dtype=dtype), means, covs)
