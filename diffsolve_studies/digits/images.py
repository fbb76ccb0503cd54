"""Image parametrisations x = g(theta) for the digits study: the pixels themselves, or one coordinate MLP
per image (Fourier features of the pixel centre -> MLP -> tanh grey level), the 8x8 analogue of the
paper's text-to-2D generator (§4.4). All images of a run are evaluated together with batched products."""
import math

import torch
from torch import nn

from .data import PIXELS

SIDE = int(math.isqrt(PIXELS))


class PixelImages(nn.Module):
    """theta = x: [n, 64] free pixels."""

    def __init__(self, x0):
        super().__init__()
        self.x = nn.Parameter(x0.detach().clone())

    def forward(self):
        return self.x


def pixel_centres(side=SIDE):
    """[side^2, 2] pixel centres in the unit square, row-major like the images."""
    t = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


class CoordinateImages(nn.Module):
    """n independent coordinate MLPs f(p; theta_i): [0, 1]^2 -> [-1, 1], rendered on the 8x8 grid.
    The Fourier frequencies (N(0, scale^2), shared, fixed) and every MLP's initial weights (PyTorch's
    default uniform(+-1/sqrt(fan_in))) come from `generator`."""

    def __init__(self, n, features=32, scale=3.0, width=64, depth=3, generator=None):
        super().__init__()
        freqs = torch.randn(2, features // 2, generator=generator) * scale
        ang = 2 * math.pi * pixel_centres() @ freqs
        self.register_buffer("phi", torch.cat([ang.sin(), ang.cos()], 1))  # [64, features]
        dims = [2 * (features // 2)] + [width] * (depth - 1) + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(d_in)
            self.weights.append(nn.Parameter((torch.rand(n, d_in, d_out, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(n, 1, d_out, generator=generator) * 2 - 1) * bound))

    def forward(self):
        h = self.phi.expand(self.weights[0].shape[0], -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            h = torch.tanh(h) if i == len(self.weights) - 1 else nn.functional.silu(h)
        return h[..., 0]
