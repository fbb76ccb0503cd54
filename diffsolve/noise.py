"""Noise for stochastic steps, pinned down by a seed.

A noise sampler is `noise_sampler(sigma, sigma_next) -> tensor` shaped like x (k-diffusion's contract).
`gaussian_noise` draws from one explicit torch.Generator; `seeded_noise` makes each row's noise a
function of (seed, row index, sigma) alone, so a result does not depend on the batch size, on how a
batch is split into chunks, or on anything else drawn in the process.
"""
import struct

import torch

_MASK = (1 << 64) - 1


def _mix64(z):
    """splitmix64 finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _float_bits(value):
    return struct.unpack("<Q", struct.pack("<d", float(value)))[0]


def gaussian_noise(x, generator=None):
    """Standard normal noise like x from an explicit generator (None: torch's global one)."""
    def sample(sigma=None, sigma_next=None):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return sample


def seeded_noise(x, seed, row_offset=0, block=16):
    """Noise whose row i depends only on (seed, row_offset + i, sigma, sigma_next): batch-size invariant.

    Rows are drawn in blocks of `block` rows, one generator seeding per block and step.
    """
    seed = int(seed)
    rows, shape = x.shape[0], x.shape[1:]

    def sample(sigma, sigma_next):
        key = _mix64(_mix64(seed ^ _float_bits(sigma)) ^ _float_bits(sigma_next))
        first, last = row_offset // block, (row_offset + rows - 1) // block
        parts = []
        for b in range(first, last + 1):
            gen = torch.Generator().manual_seed(_mix64(key ^ _mix64(b)) & ((1 << 63) - 1))
            parts.append(torch.randn((block,) + tuple(shape), generator=gen, dtype=torch.float64))
        noise = torch.cat(parts)[row_offset - first * block:][:rows]
        return noise.to(device=x.device, dtype=x.dtype)
    return sample
