"""The digits networks: a class-conditional denoiser with EDM preconditioning and the evaluation classifier.

Denoiser (Karras et al. 2022, EDM, Table 1): D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) with
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = log(sigma) / 4. F is a residual MLP on the 64 pixels whose blocks are modulated (scale and shift)
by an embedding of the noise level and the class; class index 10 is the "no class" token that label dropout
trains, so D(x, sigma) without labels is the unconditional model that classifier-free guidance needs.
"""
import math

import torch
from torch import nn

from diffsolve.denoisers import append_dims, sigma_rows
from .data import CLASSES, PIXELS

NULL_CLASS = CLASSES


class _Block(nn.Module):
    def __init__(self, width, emb):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(emb, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight), nn.init.zeros_(self.fc2.bias)

    def forward(self, h, e):
        scale, shift = self.mod(e).chunk(2, dim=-1)
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class DigitsDenoiser(nn.Module):
    """D(x, sigma, class_labels=None) -> denoised x, x of shape [B, 64] (or [B, 8, 8]) in model space.
    class_labels: [B] ints in 0..9, or None for the unconditional model."""

    def __init__(self, width=256, depth=4, emb=128, sigma_data=0.5):
        super().__init__()
        self.config = dict(width=width, depth=depth, emb=emb, sigma_data=sigma_data)
        self.sigma_data = float(sigma_data)
        self.freqs = nn.Parameter(torch.randn(emb // 2) * 4.0, requires_grad=False)  # Fourier noise embedding
        self.class_emb = nn.Embedding(CLASSES + 1, emb)
        self.emb_mlp = nn.Sequential(nn.Linear(2 * emb, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Linear(PIXELS, width)
        self.blocks = nn.ModuleList(_Block(width, emb) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, PIXELS)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def raw(self, x_in, c_noise, labels):
        """F(c_in x, c_noise, labels) on flat [B, 64] inputs."""
        ang = c_noise[:, None] * self.freqs[None] * (2 * math.pi)
        e = self.emb_mlp(torch.cat([ang.cos(), ang.sin(), self.class_emb(labels)], -1))
        h = self.inp(x_in)
        for block in self.blocks:
            h = block(h, e)
        return self.out(self.out_norm(h))

    def forward(self, x, sigma, class_labels=None):
        shape, flat = x.shape, x.reshape(x.shape[0], -1)
        if flat.shape[1] != PIXELS:
            raise ValueError(f"digits images have {PIXELS} pixels, got shape {tuple(shape)}")
        sigma = sigma_rows(sigma, flat).to(flat.dtype)
        if class_labels is None:
            labels = torch.full((flat.shape[0],), NULL_CLASS, dtype=torch.long, device=flat.device)
        else:
            labels = torch.as_tensor(class_labels, device=flat.device).long().expand(flat.shape[0])
        sd2, s = self.sigma_data ** 2, append_dims(sigma, 2)
        c_skip, c_out, c_in = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt(), 1 / (s ** 2 + sd2).sqrt()
        dtype = self.inp.weight.dtype
        f = self.raw((c_in * flat).to(dtype), (sigma.log() / 4).to(dtype), labels).to(flat.dtype)
        return (c_skip * flat + c_out * f).reshape(shape)


class DigitsClassifier(nn.Module):
    """A small MLP classifier whose penultimate layer (`features`, `feature_dim` wide) serves the Fréchet
    distance; trained with input noise so that it judges generated (continuous) images sensibly."""

    def __init__(self, width=256, feature_dim=16):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(nn.Linear(PIXELS, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, CLASSES)

    def features(self, x):
        return self.body(x.reshape(x.shape[0], -1).to(self.head.weight.dtype))

    def forward(self, x):
        return self.head(self.features(x))
