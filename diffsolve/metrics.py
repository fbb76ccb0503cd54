"""Sample-quality and estimator metrics for the toy experiments (design doc toy-experiments.md, section 6).

Pure torch (numpy-free). Pairwise work is done in float64 blocks of at most ``chunk`` elements, so
10^4 x 10^4 point sets in 2-D run in bounded memory.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

__all__ = ["estimator_efficiency", "integrate_gradient_field", "mmd", "mmd_both", "nll", "precision_recall"]

F64 = torch.float64


def _points(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to(F64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, d] with N >= 1, got shape {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _row_blocks(n: int, cols: int, chunk: int):
    """Yield row slices so that a [rows, cols] block has at most ``chunk`` elements (at least one row)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rows = max(1, chunk // max(cols, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def nll(points, log_prob_fn: Callable[[Tensor], Tensor]) -> float:
    """Negative log-likelihood, section 6.1: NLL = -(1/M) sum_j ln p(x_j) (natural log).

    ``log_prob_fn`` maps [M, d] points to [M] log densities, e.g. ``GaussianMixture.log_prob``.
    """
    lp = torch.as_tensor(log_prob_fn(points)).detach().to(F64).reshape(-1)
    if lp.numel() == 0:
        raise ValueError("nll needs at least one point")
    return float(-lp.mean())


def _sq_dists(a: Tensor, b_cols) -> Tensor:
    """Squared Euclidean distances [len(a), N] from explicit per-coordinate differences, summed in a fixed
    order, so identical points give exactly 0 and a pair gives the same value in every block.
    ``b_cols`` is the list of contiguous coordinate columns of the [N, d] reference set."""
    out = torch.zeros(a.shape[0], b_cols[0].shape[0], dtype=F64)
    for i, col in enumerate(b_cols):
        out += torch.sub(a[:, i, None], col[None, :]).square_()
    return out


def _cols(x: Tensor):
    return [x[:, i].contiguous() for i in range(x.shape[1])]


def _knn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Squared distance of every row of x to its k-th nearest neighbour in x, itself excluded.

    The (k+1)-th smallest entry of a row that contains the zero self-distance is the k-th smallest with
    the self entry removed (duplicates of the point still count as neighbours at distance 0).
    """
    out, cols = torch.empty(x.shape[0], dtype=F64), _cols(x)
    for s in _row_blocks(x.shape[0], x.shape[0], chunk):
        out[s] = torch.topk(_sq_dists(x[s], cols), k + 1, dim=1, largest=False).values[:, k]
    return out


def _coverage(query: Tensor, ref: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of query rows within (<=) the squared radius of at least one ref row."""
    hit, cols = 0, _cols(ref)
    for s in _row_blocks(query.shape[0], ref.shape[0], chunk):
        hit += int((_sq_dists(query[s], cols) <= radii[None, :]).any(dim=1).sum())
    return hit / query.shape[0]


def precision_recall(real, fake, k: int = 3, chunk: int = 2 ** 16) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), section 6.2.

    Squared Euclidean distances on the raw coordinates; radius of a point = squared distance to its
    k-th nearest neighbour within its own set (self excluded, no clamping).
    precision = fraction of ``fake`` points within the radius of at least one ``real`` point;
    recall = fraction of ``real`` points within the radius of at least one ``fake`` point.
    ``chunk`` bounds the pairwise distances held at once (small blocks stay in cache: 10^4 x 10^4 in 2-D
    takes about half a second on one thread).
    """
    real, fake = _points(real, "real"), _points(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = int(k)
    for name, t in (("real", real), ("fake", fake)):
        if t.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} points to have a k-th neighbour, got {t.shape[0]}")
    r_real, r_fake = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    return {"precision": _coverage(fake, real, r_real, chunk), "recall": _coverage(real, fake, r_fake, chunk)}


def _kernel_sum(a: Tensor, b: Tensor, inv2h2: float, chunk: int) -> float:
    """sum_{i,j} exp(-|a_i - b_j|^2 / (2 h^2)), accumulated in float64 over row blocks."""
    bb = b.square().sum(1)
    total = 0.0
    for s in _row_blocks(a.shape[0], b.shape[0], chunk):
        blk = a[s]
        sq = (blk.square().sum(1)[:, None] + bb[None, :] - 2.0 * blk @ b.T).clamp_min_(0.0)
        total += float(torch.exp(-inv2h2 * sq).sum())
    return total


def mmd_both(x, y, bandwidth: float = 0.5, chunk: int = 2 ** 18) -> Dict[str, float]:
    """Squared MMD with the Gaussian RBF kernel k(a, b) = exp(-|a - b|^2 / (2 h^2)), section 6.3.

    biased (V-statistic):   mean_{i,j} k(x_i,x_j) + mean_{i,j} k(y_i,y_j) - 2 mean_{i,j} k(x_i,y_j);
    unbiased (U-statistic): the same with the i == j terms left out of the two within-set means,
    i.e. sum_{i != j} k(x_i,x_j) / (n (n-1)) (+ the same for y) - 2 mean k(x_i,y_j). Since k(a,a) = 1,
    biased = unbiased + (1 - U_xx)/n + (1 - U_yy)/m with U_xx, U_yy the within-set U-means.
    """
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    h = float(bandwidth)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth}")
    n, m, inv2h2 = x.shape[0], y.shape[0], 1.0 / (2.0 * h * h)
    sxx, syy, sxy = (_kernel_sum(x, x, inv2h2, chunk), _kernel_sum(y, y, inv2h2, chunk),
                     _kernel_sum(x, y, inv2h2, chunk))
    out = {"biased": sxx / n ** 2 + syy / m ** 2 - 2.0 * sxy / (n * m), "unbiased": None}
    if n >= 2 and m >= 2:  # the diagonal terms are exactly k(a, a) = 1
        out["unbiased"] = (sxx - n) / (n * (n - 1)) + (syy - m) / (m * (m - 1)) - 2.0 * sxy / (n * m)
    return out


def mmd(x, y, bandwidth: float = 0.5, unbiased: bool = False, chunk: int = 2 ** 18) -> float:
    """Squared RBF MMD (see ``mmd_both``): the biased V-statistic, or the U-statistic if ``unbiased``."""
    out = mmd_both(x, y, bandwidth=bandwidth, chunk=chunk)
    if unbiased and out["unbiased"] is None:
        raise ValueError("the unbiased MMD needs at least 2 points in each set")
    return out["unbiased" if unbiased else "biased"]


def estimator_efficiency(samples, cost, reference=None) -> Dict[str, object]:
    """Estimator efficiency, paper eq. 17 / section 6.4: eps(x) = |g(x)|^2 / (MSE(x) * cost).

    ``samples`` [K, P, d]: K independent single-sample estimates at each of P points; ``cost``: score-model
    calls per single estimate (scalar or [P]). With ``reference=None``, g = mean_k g_k and
    MSE = mean_k |g_k - g|^2 (summed over d); with ``reference`` [P, d], g = reference and
    MSE = mean_k |g_k - reference|^2 (= variance + bias^2).

    Points with MSE == 0 (all K estimates identical, resp. equal to the reference) are deterministic:
    their efficiency is +inf, they are counted in ``deterministic_points`` and left out of the summaries
    ``log_mean_efficiency`` = ln(mean eps) and ``mean_log_efficiency`` = mean ln eps (natural log). When
    every point is deterministic, ``deterministic`` is True and both summaries are None. A stochastic point
    with g = 0 has efficiency 0 (so ``mean_log_efficiency`` = -inf).
    """
    s = torch.as_tensor(samples).detach().to(F64)
    if s.ndim != 3 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"samples must have shape [K, P, d] with K, P >= 1, got shape {list(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("samples contains NaN or inf")
    c = torch.as_tensor(cost, dtype=F64)
    if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != s.shape[1]) or not bool(((c > 0) & torch.isfinite(c)).all()):
        raise ValueError(f"cost must be finite and > 0, a scalar or shape [{s.shape[1]}], got {cost}")
    if reference is None:
        g = s.mean(0)
        det = (s == s[:1]).all(dim=2).all(dim=0)  # exact test: a float mean of equal values may be off by an ulp
    else:
        g = torch.as_tensor(reference).detach().to(F64)
        if g.shape != s.shape[1:]:
            raise ValueError(f"reference must have shape {list(s.shape[1:])}, got {list(g.shape)}")
        det = (s == g[None]).all(dim=2).all(dim=0)
    mse = (s - g[None]).square().sum(-1).mean(0)
    mse = torch.where(det, torch.zeros_like(mse), mse)
    g2 = g.square().sum(-1)
    eff = torch.where(det, torch.full_like(mse, math.inf), g2 / (torch.where(det, torch.ones_like(mse), mse) * c))
    finite = eff[~det]
    out = {"efficiency": eff, "g_sq": g2, "mse": mse, "deterministic_mask": det,
           "deterministic_points": int(det.sum()), "deterministic": bool(det.all()),
           "log_mean_efficiency": None, "mean_log_efficiency": None}
    if finite.numel():
        out["log_mean_efficiency"] = float(torch.log(finite.mean()))
        out["mean_log_efficiency"] = float(torch.log(finite).mean())
    return out


def _uniform_step(v: Tensor, name: str) -> float:
    if v.ndim != 1 or v.numel() < 1:
        raise ValueError(f"{name} must be a 1-D grid, got shape {list(v.shape)}")
    if v.numel() == 1:
        return 1.0
    d = v[1:] - v[:-1]
    h = float(d.mean())
    if h <= 0 or float((d - h).abs().max()) > 1e-6 * abs(h):
        raise ValueError(f"{name} must be uniformly spaced and increasing")
    return h


def _path_modes(n: int):
    """Orthonormal DCT-II basis C [n, n] (rows = modes) and eigenvalues of the path-graph Laplacian.

    The Neumann second-difference matrix D^T D (D = forward difference, [n-1, n]) has eigenvectors
    cos(pi k (j + 1/2) / n) with eigenvalues 2 - 2 cos(pi k / n), k = 0..n-1.
    """
    k = torch.arange(n, dtype=F64)[:, None]
    j = torch.arange(n, dtype=F64)[None, :]
    C = torch.cos(math.pi * k * (j + 0.5) / n) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C, 2.0 - 2.0 * torch.cos(math.pi * torch.arange(n, dtype=F64) / n)


def integrate_gradient_field(grad, xs, ys) -> Tensor:
    """Least-squares potential L [ny, nx] of a gradient field on a regular grid, normalised so min L = 0.

    ``grad`` [ny, nx, 2] holds (dL/dx, dL/dy) at (xs[j], ys[i]) (``meshgrid(ys, xs, indexing="ij")``).
    L minimises sum ((L[i,j+1]-L[i,j])/hx - bx)^2 + sum ((L[i+1,j]-L[i,j])/hy - by)^2 with the edge
    targets bx, by = trapezoid averages of the two end-point gradients (second-order accurate). Its
    normal equations are the 5-point Laplacian with Neumann boundary, solved exactly in the DCT basis that
    diagonalises it (the constant mode is fixed by the normalisation). For a conservative field this is
    the potential up to O(h^2); otherwise it is the least-squares (curl-free) part.
    """
    g = torch.as_tensor(grad).detach()
    xs, ys = torch.as_tensor(xs, dtype=F64).detach(), torch.as_tensor(ys, dtype=F64).detach()
    ny, nx = ys.numel(), xs.numel()
    if g.shape != (ny, nx, 2):
        raise ValueError(f"grad must have shape [len(ys), len(xs), 2] = {[ny, nx, 2]}, got {list(g.shape)}")
    out_dtype = g.dtype if g.is_floating_point() else F64
    g = g.to(F64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grad contains NaN or inf")
    hx, hy = _uniform_step(xs, "xs"), _uniform_step(ys, "ys")
    bx = 0.5 * (g[:, 1:, 0] + g[:, :-1, 0])  # [ny, nx-1]
    by = 0.5 * (g[1:, :, 1] + g[:-1, :, 1])  # [ny-1, nx]
    zc, zr = torch.zeros(ny, 1, dtype=F64), torch.zeros(1, nx, dtype=F64)
    # rhs = (1/hx) Dx^T bx + (1/hy) Dy^T by, with (D^T b)[j] = b[j-1] - b[j] (b out of range = 0)
    rhs = (torch.cat([zc, bx], 1) - torch.cat([bx, zc], 1)) / hx + (torch.cat([zr, by], 0) - torch.cat([by, zr], 0)) / hy
    Cx, lx = _path_modes(nx)
    Cy, ly = _path_modes(ny)
    lam = ly[:, None] / hy ** 2 + lx[None, :] / hx ** 2
    coef = Cy @ rhs @ Cx.T
    lam[0, 0] = 1.0
    coef = coef / lam
    coef[0, 0] = 0.0
    L = Cy.T @ coef @ Cx
    return (L - L.min()).to(out_dtype)
