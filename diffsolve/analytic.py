"""Closed-form densities, scores and ideal denoisers (variance-exploding / EDM convention).

A noisy point is ``z = y + sigma * n`` with ``n ~ N(0, I)`` (Karras et al. 2022, EDM, eq. 1), so the
noisy marginal is ``p_sigma = p_data * N(0, sigma^2 I)``.  The ideal denoiser is the posterior mean
``D(z; sigma) = E[y | z]`` and Tweedie's formula links it to the score (EDM eq. 3):

    grad_z log p_sigma(z) = (D(z; sigma) - z) / sigma^2.                                   (T)

Every ``sigma`` argument may be a float, a 0-d tensor or a tensor of shape ``[B]`` (one per row).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = ["EmpiricalDenoiser", "GaussianMixture"]

SigmaLike = Union[float, Tensor]
_LOG_2PI = math.log(2.0 * math.pi)


def _sigma_vec(sigma: SigmaLike, batch: int, dtype, device, name: str = "sigma") -> Tensor:
    """Validate ``sigma`` (scalar or ``[batch]``, finite, >= 0) and return it as a ``[batch]`` tensor."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (one per row), "
                         f"got shape {list(s.shape)}")
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} must be finite, got {s.tolist()}")
    if s.numel() and bool((s < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {s.min().item():g}")
    return s.expand(batch) if s.ndim == 0 else s


def _scalar(value: SigmaLike, name: str) -> float:
    """Validate a single non-negative finite number."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {list(t.shape)}")
    v = float(t)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v:g}")
    return v


def _float_tensor(x, dtype=None, device=None) -> Tensor:
    t = torch.as_tensor(x, device=device)
    if dtype is not None:
        return t.to(dtype)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _rows(x, d: int, ref: str, dtype, device) -> Tensor:
    """Cast ``x`` [B, ...] to ``dtype`` and flatten to [B, d]; ValueError naming both shapes."""
    x = _float_tensor(x, dtype, device)
    if x.ndim < 2 or math.prod(x.shape[1:]) != d:
        raise ValueError(f"x must have shape [B, ...] with {d} features per row to match {ref}, "
                         f"got shape {list(x.shape)}")
    return x.reshape(x.shape[0], d)


def _chunked(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, s: Tensor, rows: int) -> Tensor:
    """Apply ``fn(x_chunk, s_chunk)`` over row chunks of at most ``rows`` rows and concatenate."""
    rows = max(1, rows)
    return torch.cat([fn(x[i:i + rows], s[i:i + rows]) for i in range(0, max(x.shape[0], 1), rows)])


def _normalised_log_weights(weights: Tensor, n: int, ref: str) -> Tensor:
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape [{n}] to match {ref}, got shape {list(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got min {weights.min().item():g}")
    total = weights.sum()
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {total.item():g}")
    return (weights / total).log()


class GaussianMixture:
    """p(y) = sum_k w_k N(y; mu_k, C_k) with full covariances C_k = Q_k diag(L_k) Q_k^T.

    Convolving with N(0, sigma^2 I) gives p_sigma(x) = sum_k w_k N(x; mu_k, C_k + sigma^2 I), and
    C_k + sigma^2 I = Q_k diag(L_k + sigma^2) Q_k^T, so any per-row sigma costs one eigenbasis
    projection.  All computations use the dtype/device of ``means``; inputs are cast to it.
    """

    def __init__(self, weights, means, covs, max_chunk_elements: int = 2 ** 22):
        means = _float_tensor(means)
        dtype, device = means.dtype, means.device
        weights, covs = _float_tensor(weights, dtype, device), _float_tensor(covs, dtype, device)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got shape {list(means.shape)}")
        K, d = means.shape
        log_w = _normalised_log_weights(weights, K, f"means of shape {list(means.shape)}")
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape [K, d, d]=[{K}, {d}, {d}] to match means of shape "
                             f"{list(means.shape)}, got shape {list(covs.shape)}")
        if not bool(torch.isfinite(means).all()) or not bool(torch.isfinite(covs).all()):
            raise ValueError("means and covs must be finite, got non-finite entries")
        tol = math.sqrt(torch.finfo(dtype).eps) * max(covs.abs().max().item() if covs.numel() else 0.0, 1e-30)
        asym = (covs - covs.mT).abs().max().item() if covs.numel() else 0.0
        if asym > tol:
            raise ValueError(f"covs must be symmetric, got max |C - C^T| = {asym:g}")
        covs = 0.5 * (covs + covs.mT)
        L, Q = torch.linalg.eigh(covs)
        if L.numel() and L.min().item() < -tol:
            k = int(L.min(-1).values.argmin())
            raise ValueError(f"covs must be positive semi-definite, got eigenvalue {L.min().item():g} "
                             f"in component {k}")
        self.weights, self.means, self.covs = log_w.exp(), means, covs
        self._log_w, self._L, self._Q = log_w, L.clamp_min(0), Q
        self.max_chunk_elements = int(max_chunk_elements)

    @classmethod
    def isotropic(cls, means, std: SigmaLike, weights=None, **kw) -> "GaussianMixture":
        """Mixture with C_k = std_k^2 I; ``std`` is a scalar or has shape [K]."""
        means = _float_tensor(means)
        K, d = means.shape if means.ndim == 2 else (None, None)
        if K is None:
            raise ValueError(f"means must have shape [K, d], got shape {list(means.shape)}")
        std = _sigma_vec(std, K, means.dtype, means.device, name="std")
        weights = torch.ones(K, dtype=means.dtype, device=means.device) if weights is None else weights
        eye = torch.eye(d, dtype=means.dtype, device=means.device)
        return cls(weights, means, std[:, None, None] ** 2 * eye, **kw)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim}, dtype={self.means.dtype})"

    # ----------------------------------------------------------------------------------- internals
    def _prep(self, x, sigma):
        xr = _rows(x, self.dim, f"means of shape {list(self.means.shape)}", self.means.dtype, self.means.device)
        s = _sigma_vec(sigma, xr.shape[0], self.means.dtype, self.means.device)
        if xr.shape[0] and bool((self._L.min() + s.min() ** 2) <= 0):
            raise ValueError("a covariance is singular, so sigma must be > 0 here, got 0")
        return xr, s

    def _terms(self, x: Tensor, s: Tensor):
        """log(w_k N(x; mu_k, C_k + s^2 I)) [B, K] and Q_k^T (C_k + s^2 I)^-1 (x - mu_k) [B, K, d]."""
        v = self._L[None] + (s * s)[:, None, None]
        proj = torch.einsum("bkd,kde->bke", x[:, None, :] - self.means[None], self._Q)
        white = proj / v
        maha = (proj * white).sum(-1)
        return self._log_w - 0.5 * (maha + v.log().sum(-1) + self.dim * _LOG_2PI), white

    def _score_rows(self, x: Tensor, s: Tensor) -> Tensor:
        """sum_k r_k(x) * -(C_k + s^2 I)^-1 (x - mu_k), r = responsibilities (softmax of log terms)."""
        logits, white = self._terms(x, s)
        return -torch.einsum("bke,kde->bd", logits.softmax(-1)[..., None] * white, self._Q)

    def _apply(self, fn, x, sigma) -> Tensor:
        xr, s = self._prep(x, sigma)
        return _chunked(fn, xr, s, self.max_chunk_elements // (self.num_components * self.dim))

    # ------------------------------------------------------------------------------------- public
    def log_prob(self, x, sigma: SigmaLike = 0.0) -> Tensor:
        """log p_sigma(x) = logsumexp_k [log w_k + log N(x; mu_k, C_k + sigma^2 I)], shape [B]."""
        return self._apply(lambda xc, sc: torch.logsumexp(self._terms(xc, sc)[0], -1), x, sigma)

    def prob(self, x, sigma: SigmaLike = 0.0) -> Tensor:
        return self.log_prob(x, sigma).exp()

    def score(self, x, sigma: SigmaLike = 0.0) -> Tensor:
        """grad_x log p_sigma(x) in closed form, same shape as ``x``."""
        x = _float_tensor(x, self.means.dtype, self.means.device)
        return self._apply(self._score_rows, x, sigma).reshape(x.shape)

    def denoise(self, x, sigma: SigmaLike) -> Tensor:
        """Ideal denoiser E[y | z = x] = x + sigma^2 * score(x, sigma) (Tweedie, eq. (T))."""
        x = _float_tensor(x, self.means.dtype, self.means.device)
        fn = lambda xc, sc: xc + (sc * sc)[:, None] * self._score_rows(xc, sc)  # noqa: E731
        return self._apply(fn, x, sigma).reshape(x.shape)

    def __call__(self, x, sigma: SigmaLike, **cond) -> Tensor:
        return self.denoise(x, sigma)

    def sample(self, n: int, sigma: SigmaLike = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """n exact samples of p_sigma: k ~ w, x = mu_k + Q_k diag(sqrt(L_k + sigma^2)) eps."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        dtype, device, d = self.means.dtype, self.means.device, self.dim
        s = _sigma_vec(sigma, n, dtype, device)
        if n == 0:
            return torch.empty(0, d, dtype=dtype, device=device)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, d, dtype=dtype, device=device, generator=generator)
        scaled = (self._L[comp] + (s * s)[:, None]).sqrt() * eps
        rows = max(1, self.max_chunk_elements // (d * d))
        return torch.cat([self.means[comp[i:i + rows]]
                          + torch.einsum("nde,ne->nd", self._Q[comp[i:i + rows]], scaled[i:i + rows])
                          for i in range(0, n, rows)])

    def convolve(self, sigma: SigmaLike) -> "GaussianMixture":
        """p_sigma = p * N(0, sigma^2 I) as a mixture with covariances C_k + sigma^2 I."""
        s = _scalar(sigma, "sigma")
        eye = torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)
        return GaussianMixture(self.weights, self.means, self.covs + s * s * eye, self.max_chunk_elements)

    def product_with_gaussian(self, center, std: SigmaLike) -> "GaussianMixture":
        """Normalised p(y) N(y; c, std^2 I) = posterior of y given z = c at noise level std.

        w'_k ∝ w_k N(c; mu_k, C_k + s^2 I),  mu'_k = mu_k + C_k (C_k + s^2 I)^-1 (c - mu_k),
        C'_k = C_k - C_k (C_k + s^2 I)^-1 C_k = Q_k diag(L_k s^2 / (L_k + s^2)) Q_k^T.
        """
        c = _float_tensor(center, self.means.dtype, self.means.device)
        if c.shape != (self.dim,):
            raise ValueError(f"center must have shape [{self.dim}] to match means of shape "
                             f"{list(self.means.shape)}, got shape {list(c.shape)}")
        s2 = _scalar(std, "std") ** 2
        v = self._L + s2
        if bool((v <= 0).any()):
            raise ValueError("a covariance is singular, so std must be > 0, got 0")
        proj = torch.einsum("kd,kde->ke", c - self.means, self._Q)
        logw = self._log_w - 0.5 * ((proj * proj / v).sum(-1) + v.log().sum(-1) + self.dim * _LOG_2PI)
        means = self.means + torch.einsum("kde,ke->kd", self._Q, self._L / v * proj)
        covs = torch.einsum("kde,ke,kfe->kdf", self._Q, self._L * s2 / v, self._Q)
        return GaussianMixture(logw.softmax(-1), means, covs, self.max_chunk_elements)

    def mean(self) -> Tensor:
        """E[y] = sum_k w_k mu_k."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[y] = sum_k w_k (C_k + mu_k mu_k^T) - m m^T (law of total variance)."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)


class EmpiricalDenoiser:
    """Ideal denoiser of a weighted point set (eq. 16): D(z; s) = sum_i w_i u_i K_i / sum_i w_i K_i,
    K_i = exp(-|z - u_i|^2 / (2 s^2)).  Computed as softmax_i[(z.u_i - |u_i|^2/2) / s^2 + log w_i]
    (the |z|^2 term cancels), after centring the points for accuracy, in query chunks of at most
    ``max_chunk_elements`` query*point logits.  Rows with s = 0 return the nearest point (the s -> 0 limit).
    Half-precision points and queries are computed in float32 (1 / s^2 overflows float16 below s = 0.004)
    and returned in the query's dtype.
    """

    def __init__(self, points, weights=None, max_chunk_elements: int = 2 ** 24):
        u = _float_tensor(points)
        u = u.to(torch.promote_types(u.dtype, torch.float32))
        if u.ndim < 2 or u.shape[0] == 0:
            raise ValueError(f"points must have shape [N, ...] with N >= 1, got shape {list(u.shape)}")
        if int(max_chunk_elements) < 1:
            raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
        self.points_shape = tuple(u.shape)
        self.points = u.reshape(u.shape[0], -1)
        N = self.points.shape[0]
        w = torch.ones(N) if weights is None else weights
        w = _float_tensor(w, u.dtype, u.device)
        self._log_w = _normalised_log_weights(w, N, f"points of shape {list(u.shape)}")
        self.weights = self._log_w.exp()
        self._center = self.points.mean(0)
        self._u = self.points - self._center
        self._half_sq = 0.5 * (self._u * self._u).sum(-1)
        self._half_sq_masked = torch.where(self._log_w.isfinite(), self._half_sq, math.inf)  # drop w_i = 0
        self._u_aug = torch.cat([self._u, self._half_sq_masked[:, None]], 1)
        self._weighted = weights is not None
        self.max_chunk_elements = int(max_chunk_elements)

    def _prep(self, x, sigma):
        u = self.points
        xr = _rows(x, u.shape[1], f"points of shape {list(self.points_shape)}", u.dtype, u.device)
        return xr, _sigma_vec(sigma, xr.shape[0], u.dtype, u.device)

    def _denoise_rows(self, x: Tensor, s: Tensor) -> Tensor:
        inv = 1.0 / (s * s)
        if bool(((s > 0) & inv.isfinite()).all()):  # fast path: one matmul gives (z.u_i - |u_i|^2/2) / s^2
            lhs = torch.cat([(x - self._center) * inv[:, None], -inv[:, None]], 1)
            logits = lhs @ self._u_aug.T
            if self._weighted:
                logits = logits + self._log_w
            return logits.softmax(-1) @ self._u + self._center
        base = (x - self._center) @ self._u.T - self._half_sq_masked
        top = base.max(-1, keepdim=True).values
        inv = 1.0 / (s * s)
        ok = (s > 0) & inv.isfinite()
        logits = (base - top) * torch.where(ok, inv, 0.0)[:, None] + self._log_w
        if not bool(ok.all()):  # s -> 0 limit: (uniform over tied) nearest points
            nearest = torch.where(base == top, 0.0, -math.inf)
            logits = torch.where(ok[:, None], logits, nearest)
        return logits.softmax(-1) @ self._u + self._center

    def denoise(self, x, sigma: SigmaLike) -> Tensor:
        xr, s = self._prep(x, sigma)
        out = _chunked(self._denoise_rows, xr, s, self.max_chunk_elements // self.points.shape[0])
        x = _float_tensor(x)
        return out.reshape(x.shape).to(x.dtype)

    def __call__(self, x, sigma: SigmaLike, **cond) -> Tensor:
        return self.denoise(x, sigma)

    def log_prob(self, x, sigma: SigmaLike) -> Tensor:
        """log sum_i w_i N(x; u_i, sigma^2 I) via logsumexp (sigma > 0 required), shape [B]."""
        xr, s = self._prep(x, sigma)
        if xr.shape[0] and bool((s <= 0).any()):
            raise ValueError(f"sigma must be > 0 for log_prob, got {s.min().item():g}")
        d = xr.shape[1]

        def fn(xc: Tensor, sc: Tensor) -> Tensor:
            xc = xc - self._center
            sq = ((xc * xc).sum(-1, keepdim=True) - 2.0 * xc @ self._u.T + 2.0 * self._half_sq).clamp_min(0)
            lse = torch.logsumexp(self._log_w - sq / (2.0 * (sc * sc)[:, None]), -1)
            return lse - 0.5 * d * (_LOG_2PI + 2.0 * sc.log())

        return _chunked(fn, xr, s, self.max_chunk_elements // self.points.shape[0])
