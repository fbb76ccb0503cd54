"""The view-conditioned prior of the 3-D testbed: a small convolutional U-Net denoiser of 32 x 32 renders,
conditioned on the shape class and the camera (elevation and azimuth, as view-conditioned priors embed
them), with EDM preconditioning (Karras et al. 2022, Table 1):

    D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c),  c_noise = log(sigma) / 4.

The class token `len(CLASSES)` means "no class" (trained by label dropout), so D without class labels is
the camera-conditioned unconditional model that classifier-free guidance needs. Pixels live in [-1, 1].
Also here: the evaluation classifier (class and azimuth bin from a render; its penultimate features serve
the Fréchet distance).
"""
import math

import torch
from torch import nn

from diffsolve.denoisers import append_dims, sigma_rows
from .world import CLASSES

NULL_CLASS = len(CLASSES)
AZIMUTH_BINS = 4  # front (|azimuth| < 45), left, back, right


def camera_features(elevation, azimuth, rows, device, dtype):
    """[rows, 4]: sin / cos of azimuth and elevation (degrees)."""
    e = torch.as_tensor(elevation, dtype=dtype, device=device).flatten().expand(rows) * (math.pi / 180)
    a = torch.as_tensor(azimuth, dtype=dtype, device=device).flatten().expand(rows) * (math.pi / 180)
    return torch.stack([a.sin(), a.cos(), e.sin(), e.cos()], -1)


def azimuth_bin(azimuth):
    """0 front (|a| < 45 degrees), 1 at +90 (side), 2 back, 3 at -90."""
    a = torch.remainder(torch.as_tensor(azimuth, dtype=torch.float32) + 45.0, 360.0)
    return (a // 90).long()


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.mod = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight), nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h, e):
        y = self.c1(nn.functional.silu(self.n1(h)))
        scale, shift = self.mod(e)[:, :, None, None].chunk(2, dim=1)
        y = self.c2(nn.functional.silu(self.n2(y) * (1 + scale) + shift))
        return self.skip(h) + y


class ViewDenoiser(nn.Module):
    """D(x, sigma, class_labels=None, elevation=0, azimuth=0) -> denoised x, x of shape [B, 3, 32, 32]."""

    def __init__(self, channels=(32, 64, 96), emb=128, sigma_data=0.5):
        super().__init__()
        self.config = dict(channels=tuple(channels), emb=emb, sigma_data=sigma_data)
        self.sigma_data = float(sigma_data)
        self.freqs = nn.Parameter(torch.randn(emb // 2) * 4.0, requires_grad=False)
        self.class_emb = nn.Embedding(NULL_CLASS + 1, emb)
        self.camera = nn.Linear(4, emb)
        self.emb_mlp = nn.Sequential(nn.Linear(2 * emb, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        c = list(channels)
        self.inp = nn.Conv2d(3, c[0], 3, padding=1)
        self.down = nn.ModuleList(_ResBlock(c[max(i - 1, 0)], c[i], emb) for i in range(len(c)))
        self.mid = _ResBlock(c[-1], c[-1], emb)
        self.up = nn.ModuleList(_ResBlock(c[i] + c[i], c[max(i - 1, 0)], emb) for i in reversed(range(len(c))))
        self.out_norm = nn.GroupNorm(8, c[0])
        self.out = nn.Conv2d(c[0], 3, 3, padding=1)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def raw(self, x_in, c_noise, labels, cam):
        ang = c_noise[:, None] * self.freqs[None] * (2 * math.pi)
        e = self.emb_mlp(torch.cat([torch.cat([ang.cos(), ang.sin()], -1),
                                    self.class_emb(labels) + self.camera(cam)], -1))
        h = self.inp(x_in)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skip], 1), e)
        return self.out(nn.functional.silu(self.out_norm(h)))

    def forward(self, x, sigma, class_labels=None, elevation=0.0, azimuth=0.0):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"renders have shape [B, 3, H, W], got {tuple(x.shape)}")
        B = x.shape[0]
        sigma = sigma_rows(sigma, x).to(x.dtype)
        if class_labels is None:
            labels = torch.full((B,), NULL_CLASS, dtype=torch.long, device=x.device)
        else:
            labels = torch.as_tensor(class_labels, device=x.device).long().flatten().expand(B)
        dtype = self.inp.weight.dtype
        cam = camera_features(elevation, azimuth, B, x.device, dtype)
        sd2, s = self.sigma_data ** 2, append_dims(sigma, 4)
        c_skip, c_out, c_in = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt(), 1 / (s ** 2 + sd2).sqrt()
        f = self.raw((c_in * x).to(dtype), (sigma.log() / 4).to(dtype), labels, cam).to(x.dtype)
        return c_skip * x + c_out * f


class RenderClassifier(nn.Module):
    """Class and azimuth bin of a render ([B, 3, 32, 32] in [-1, 1]); `features` for the Fréchet distance."""

    def __init__(self, width=32, feature_dim=32):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(32 * w, feature_dim), nn.SiLU())
        self.cls, self.azimuth = nn.Linear(feature_dim, NULL_CLASS), nn.Linear(feature_dim, AZIMUTH_BINS)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        f = self.body(x)
        return self.cls(f), self.azimuth(f)
