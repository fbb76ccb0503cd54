"""The small 2D score network of the toy studies (Karras et al. 2024, "Guiding a diffusion model with a bad
version of itself", toy example; architecture as described in the design notes, design/toy-experiments.md §1.4).

The network models a log-density, not a denoiser:

    x_s  = x / sqrt(sigma_data^2 + sigma^2)
    y    = MLP([x_s, log(sigma) / 4, 1])                      (hidden_dim features)
    logp = mean(y^2) * gain / sigma - |x_s|^2 / 2             (gain: learnable scalar, starts at 0)

so at initialisation it is the log-density of N(0, (sigma_data^2 + sigma^2) I) up to a constant. The score is
the autograd gradient of ``logp`` and the denoiser is D = x + sigma^2 * score (Tweedie).

The MLP is magnitude-preserving (EDM2 style): linear layers have no bias and use a weight whose rows have unit
norm, so a unit-variance input gives unit-variance outputs; the activation is SiLU divided by 0.596 (the
standard deviation of silu(n), n ~ N(0, 1)). While training, each layer rescales its raw weight rows in place
before use ("forced weight normalisation"), so the raw weights stay at norm sqrt(fan_in).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["MPLinear", "MPSiLU", "ToyModel", "normalize_rows"]

_EPS = 1e-4


def normalize_rows(w: Tensor, eps: float = _EPS) -> Tensor:
    """Scale every output row of ``w`` [out, in] to Euclidean norm sqrt(in): w / (eps + |w_row| / sqrt(in))."""
    fan_in = w[0].numel() if w.shape[0] else 1
    norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).reshape((-1,) + (1,) * (w.ndim - 1))
    return w / (eps + norm / math.sqrt(fan_in))


class MPLinear(nn.Module):
    """Bias-free linear layer with weight normalize_rows(W) / sqrt(fan_in) (unit-norm rows).

    In training mode the raw weight is overwritten by normalize_rows(W) before every forward.
    """

    def __init__(self, in_features: int, out_features: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.training:
            with torch.no_grad():
                w.copy_(normalize_rows(w))
        w = normalize_rows(w) / math.sqrt(self.in_features)
        return nn.functional.linear(x, w.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class MPSiLU(nn.Module):
    """Magnitude-preserving SiLU: silu(x) / 0.596."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(x) / 0.596


class ToyModel(nn.Module):
    """Log-density network for 2D toy data; ``forward`` is the denoiser D(x, sigma, **cond) -> x0.

    ``sigma`` may be a number, a 0-d tensor or a [B] tensor (one per row) and must be > 0 for ``logp`` and
    ``score``; the denoiser returns x itself on rows with sigma = 0. 4 * hidden + num_layers * hidden^2 + 1
    parameters (16,641 for the defaults). ``generator`` makes the initial weights reproducible.
    """

    def __init__(self, in_dim: int = 2, num_layers: int = 4, hidden_dim: int = 64, sigma_data: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_dim, self.num_layers, self.hidden_dim = int(in_dim), int(num_layers), int(hidden_dim)
        self.sigma_data = float(sigma_data)
        layers = [MPLinear(self.in_dim + 2, self.hidden_dim, generator=generator)]
        for _ in range(self.num_layers):
            layers += [MPSiLU(), MPLinear(self.hidden_dim, self.hidden_dim, generator=generator)]
        self.layers = nn.Sequential(*layers)
        self.gain = nn.Parameter(torch.zeros([]))
        self.train_seconds: Optional[float] = None  # set by diffsolve.toy.train when trained / loaded

    @property
    def config(self) -> dict:
        return dict(in_dim=self.in_dim, num_layers=self.num_layers, hidden_dim=self.hidden_dim,
                    sigma_data=self.sigma_data)

    def _inputs(self, x, sigma):
        """(x as [B, in_dim] in the parameter dtype, sigma as [B], original shape of x)."""
        dtype = self.gain.dtype
        x = torch.as_tensor(x)
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_dim:
            raise ValueError(f"x must have shape [B, {self.in_dim}], got shape {list(x.shape)}")
        shape = x.shape
        x = x.reshape(shape[0], self.in_dim).to(device=self.gain.device, dtype=dtype)
        s = torch.as_tensor(sigma, device=x.device).to(dtype)
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != shape[0]):
            raise ValueError(f"sigma must be a scalar or have shape [{shape[0]}], got shape {list(s.shape)}")
        return x, s.expand(shape[0]) if s.ndim == 0 else s, shape

    def logp(self, x, sigma) -> Tensor:
        """Unnormalised log p_sigma(x), shape [B]."""
        x, s, _ = self._inputs(x, sigma)
        xs = x / (self.sigma_data ** 2 + s ** 2).sqrt()[:, None]
        feats = torch.cat([xs, (s.log() / 4)[:, None], torch.ones_like(s)[:, None]], dim=1)
        y = self.layers(feats)
        return (y ** 2).mean(-1) * self.gain / s - 0.5 * (xs ** 2).sum(-1)

    def score(self, x, sigma, create_graph: bool = False) -> Tensor:
        """grad_x logp(x, sigma) by autograd, shape and dtype of x.

        Works under torch.no_grad() and torch.inference_mode(). The result is detached unless
        ``create_graph`` (then it is differentiable w.r.t. the parameters and, if x requires grad, w.r.t. x).
        """
        x = torch.as_tensor(x)
        with torch.inference_mode(False), torch.enable_grad():
            if isinstance(sigma, Tensor) and sigma.is_inference():  # inference tensors cannot enter autograd
                sigma = sigma.clone()
            if create_graph and x.requires_grad:
                xin = x
            else:
                xin = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
            lp = self.logp(xin, sigma)
            (grad,) = torch.autograd.grad(lp.sum(), xin, create_graph=create_graph)
        return grad if create_graph else grad.detach()

    def forward(self, x, sigma, **cond) -> Tensor:
        """Denoiser D(x; sigma) = x + sigma^2 * score(x; sigma), detached, in x's dtype. ``cond`` is ignored
        (the toy models are unconditional; class conditioning means a separate model per class)."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        s = torch.as_tensor(sigma, device=x.device)
        s = s.to(torch.promote_types(s.dtype, x.dtype) if s.is_floating_point() else x.dtype)
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != x.shape[0]):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got shape {list(s.shape)}")
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        zero = s == 0
        s_safe = torch.where(zero, torch.ones_like(s), s)
        sc = self.score(x, s_safe).to(s.dtype)
        s2 = (s * s).reshape((-1,) + (1,) * (x.ndim - 1))
        out = x + s2 * sc
        if bool(zero.any()):
            out = torch.where(zero.reshape(s2.shape), x.to(out.dtype), out)
        return out.to(x.dtype).detach()
