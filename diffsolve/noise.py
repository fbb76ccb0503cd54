"""Noise for stochastic steps, pinned down by a seed.

A noise sampler is `noise_sampler(sigma, sigma_next) -> tensor` shaped like x (k-diffusion's contract).
`gaussian_noise` draws from one explicit torch.Generator; `seeded_noise` makes each row's noise a
function of (seed, row index, sigma) alone, so a result does not depend on the batch size, on how a
batch is split into chunks, or on anything else drawn in the process.
`brownian_tree_noise` gives increments of one seeded Brownian path (hashed bridge bisection), step-count invariant.
"""
import math
import numbers
import struct
from collections import OrderedDict

import torch

__all__ = ["BrownianTreeNoise", "brownian_tree_noise", "gaussian_noise", "seeded_noise"]

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


# ------------------------------------------------------------------------------ Brownian tree noise
def _signed64(value):
    """A 64-bit pattern as the int64 that has it (torch has no uint64 arithmetic)."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


_GOLDEN, _MUL1, _MUL2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _mix64_tensor(z, inplace=False):
    """`_mix64` on an int64 tensor, elementwise and bit for bit (int64 arithmetic wraps modulo 2^64)."""
    z = z.add_(_GOLDEN) if inplace else z + _GOLDEN
    tmp = torch.empty_like(z)
    for bits, mul in ((30, _MUL1), (27, _MUL2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=tmp)
        tmp &= (1 << (64 - bits)) - 1  # torch's >> is arithmetic: mask the copied sign bits (logical shift)
        z ^= tmp
        if mul is not None:
            z *= mul
    return z


def _normal_from_bits(h):
    """Standard normals from 64-bit hashes (h is consumed): the top 53 bits m give v = (2m + 1 - 2^53) / 2^53,
    exactly uniform on a symmetric grid in (-1, 1), and z = sqrt(2) erfinv(v), the inverse normal CDF."""
    h >>= 11
    h &= (1 << 53) - 1  # logical shift
    h *= 2
    h += 1 - (1 << 53)
    return h.to(torch.float64).mul_(2.0 ** -53).erfinv_().mul_(math.sqrt(2.0))


def _element_keys(seed, row_offset, rows, per_row, device):
    """One well-mixed int64 key per (row, element): a function of (seed, row_offset + row, element) only."""
    row = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    row_key = _mix64_tensor(row ^ _signed64(_mix64(seed & _MASK)))
    element = torch.arange(per_row, dtype=torch.int64, device=device)
    return _mix64_tensor(row_key[:, None] ^ _mix64_tensor(element)[None, :]).reshape(-1)


def _node_key(node):
    """The key of tree node `node` (0: the right end W(t_max); 2^d + k: midpoint of interval k at level d)."""
    return _signed64(_mix64(_mix64(node) ^ 0x5851F42D4C957F2D))


def _node_normals(keys, nodes):
    """z[i, j] ~ N(0, 1) for node nodes[i] and element j, hashed from (element key, node key) alone."""
    node_keys = torch.tensor([_node_key(n) for n in nodes], dtype=torch.int64, device=keys.device)
    return _normal_from_bits(_mix64_tensor(keys[None, :] ^ node_keys[:, None], inplace=True))


def _bisection_path(u, depth):
    """The dyadic descent to u in [0, 1]: node ids of the midpoints passed, which side was taken, and the
    final interval [k / 2^depth, (k + 1) / 2^depth] with u's fraction inside it (exact dyadic arithmetic)."""
    nodes, right, k = [], [], 0
    for d in range(depth):
        nodes.append((1 << d) + k)
        go_right = u >= (2 * k + 1) / 2.0 ** (d + 1)
        right.append(go_right)
        k = 2 * k + int(go_right)
    frac = min(max(u * 2.0 ** depth - k, 0.0), 1.0)
    return nodes, right, frac


def _bridge_midpoint(w_a, w_b, width, z):
    """W at the midpoint of [a, b] (b - a = width) given W(a), W(b): the Brownian bridge's law there is
    N((W(a) + W(b)) / 2, (m - a)(b - m) / (b - a)) = N((W(a) + W(b)) / 2, width / 4)."""
    return torch.add(w_a, w_b).mul_(0.5).add_(z, alpha=math.sqrt(width / 4.0))


def _brownian_tree(keys, us, width, depth, chunk_elements=1 << 17):
    """W(t_lo + u (t_hi - t_lo)) for each u in us (width = t_hi - t_lo), float64 tensors like keys.

    W(t_lo) = 0 and W(t_hi) = sqrt(width) z_0; then each point descends the dyadic tree, a midpoint's
    value drawn from the bridge given its interval's ends (`_bridge_midpoint`) with the normal of that
    node, down to intervals of width / 2^depth, where W is interpolated linearly (the bridge's exact
    conditional mean). Normals are hashed a few levels at a time, nodes shared by several points once.
    """
    paths = [_bisection_path(u, depth) for u in us]
    z_end = _node_normals(keys, [0])[0]
    ends = [[torch.zeros_like(z_end), math.sqrt(width) * z_end] for _ in us]
    step = max(1, chunk_elements // max(1, keys.numel()))
    for first in range(0, depth, step):
        levels = range(first, min(first + step, depth))
        row = {n: i for i, n in enumerate(dict.fromkeys(p[0][d] for p in paths for d in levels))}
        z = _node_normals(keys, list(row))
        for (nodes, right, _), w in zip(paths, ends):
            for d in levels:
                w[0 if right[d] else 1] = _bridge_midpoint(w[0], w[1], width / 2.0 ** d, z[row[nodes[d]]])
    return [torch.lerp(w_a, w_b, frac) for (_, _, frac), (w_a, w_b) in zip(paths, ends)]


class BrownianTreeNoise:
    """A noise sampler (sigma, sigma_next) -> (W(t1) - W(t0)) / sqrt|t1 - t0|, t = transform(sigma).

    W is one Brownian path per element, W(t_lo) = 0 at the low end of transform([sigma_min, sigma_max]),
    a deterministic function of (seed, row_offset + row, element, t): each bisection node's normal is a
    splitmix64 hash of those integers, never the global RNG, so rows do not depend on the batch size or
    split, and a coarse step's increment is exactly the sum of the fine steps' increments. The tree is
    bisected to intervals narrower than tol * (t_hi - t_lo) (depth ceil(log2(1 / tol))); below that W
    is linear, so steps that short get less than unit variance. Same law as k-diffusion's
    `BrownianTreeNoiseSampler` (not the same numbers). Computed in float64 on x's device (CPU for MPS);
    returned in x's dtype and device. Only W at the last few queried t is cached (a pure function of t).
    """

    _CACHE = 8

    def __init__(self, x, sigma_min, sigma_max, seed, transform=None, row_offset=0, tol=1e-9):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(row_offset, bool) or not isinstance(row_offset, numbers.Integral) or row_offset < 0:
            raise ValueError(f"row_offset must be an int >= 0, got {row_offset!r}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if x.ndim < 1:
            raise ValueError("x must have a batch dimension")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)
                and self.sigma_min < self.sigma_max):
            raise ValueError(f"need finite sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.transform = transform
        ends = sorted((self._t(self.sigma_min), self._t(self.sigma_max)))
        if not (math.isfinite(ends[0]) and math.isfinite(ends[1]) and ends[0] < ends[1]):
            raise ValueError(f"transform must map sigma_min={sigma_min}, sigma_max={sigma_max} to distinct "
                             f"finite times, got {ends}")
        self.t_lo, self.t_hi = ends
        self.seed, self.row_offset = int(seed), int(row_offset)
        self.depth = max(1, math.ceil(math.log2(1.0 / tol)))
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        work = torch.device("cpu") if x.device.type == "mps" else x.device  # MPS has no float64
        self._keys = _element_keys(self.seed, self.row_offset, x.shape[0], math.prod(x.shape[1:]), work)
        self._cache = OrderedDict()

    def _t(self, sigma):
        if self.transform is None:
            return float(sigma)
        return float(self.transform(torch.as_tensor(float(sigma), dtype=torch.float64)))

    def _check_sigma(self, sigma):
        value = float(sigma)
        if not self.sigma_min <= value <= self.sigma_max:
            raise ValueError(f"sigma={value} is outside [sigma_min, sigma_max] = [{self.sigma_min}, {self.sigma_max}]")
        return value

    def brownian(self, *ts):
        """W(t) for every element (float64, flat) at each t in [t_lo, t_hi]; one pass for all new t."""
        ts = [float(t) for t in ts]
        for t in ts:
            if not self.t_lo <= t <= self.t_hi:
                raise ValueError(f"t={t} is outside [t_lo, t_hi] = [{self.t_lo}, {self.t_hi}] (is the transform "
                                 f"monotone?)")
        todo = list(dict.fromkeys(t for t in ts if t not in self._cache))
        if todo:
            width = self.t_hi - self.t_lo
            us = [min((t - self.t_lo) / width, 1.0) for t in todo]
            for t, w in zip(todo, _brownian_tree(self._keys, us, width, self.depth)):
                self._cache[t] = w
        out = [self._cache[t] for t in ts]
        for t in ts:
            self._cache.move_to_end(t)
        while len(self._cache) > self._CACHE:
            self._cache.popitem(last=False)
        return out if len(out) > 1 else out[0]

    def __call__(self, sigma, sigma_next):
        s0, s1 = self._check_sigma(sigma), self._check_sigma(sigma_next)
        t0, t1 = self._t(s0), self._t(s1)
        if s0 == s1 or t0 == t1:
            raise ValueError(f"sigma and sigma_next must differ, got sigma={s0}, sigma_next={s1}")
        w0, w1 = self.brownian(t0, t1)
        dw = (w1 - w0) / math.sqrt(abs(t1 - t0))
        return dw.reshape(self.shape).to(dtype=self.dtype, device=self.device)


def brownian_tree_noise(x, sigma_min, sigma_max, seed, transform=None, row_offset=0):
    """A `BrownianTreeNoise` sampler for x: increments of a seeded Brownian path, batch-size invariant."""
    return BrownianTreeNoise(x, sigma_min, sigma_max, seed, transform=transform, row_offset=row_offset)
