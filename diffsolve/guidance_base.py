"""What every guidance method of `diffsolve.guidance` shares: the prediction spaces (eps, x0, v) and their
conversions, the checks, and `CombinedGuidance`, the base that evaluates (d_u, d_c) once per model call and
combines them with a method's own `combine` (see `diffsolve.guidance` for the conventions)."""
import math

import torch

from .denoisers import append_dims, sigma_rows
from .transforms import CONVENTIONS, Transform, predict_under

__all__ = ["SPACES", "CombinedGuidance", "from_space", "rescale_to", "to_space"]

SPACES = ("eps", "x0", "v")


def _check_space(space):
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return space


def _finite(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _sigma_like(sigma, x, dtype):
    """sigma as a [B, 1, ...] tensor in `dtype`, checked > 0 (eps and v divide by it)."""
    s = append_dims(sigma_rows(sigma, x).to(dtype), x.ndim)
    if not ((s > 0) & torch.isfinite(s)).all():
        raise ValueError(f"guidance in eps or v space needs 0 < sigma < inf, got {s.flatten().tolist()}")
    return s


def to_space(d, x, sigma, space):
    """The denoised prediction d at (x, sigma) in `space` ("x0", "eps" or "v"); see the module docstring."""
    if space == "x0":
        return d
    s = _sigma_like(sigma, x, d.dtype)
    eps = (x.to(d.dtype) - d) / s
    if space == "eps":
        return eps
    return (eps - s * d) / torch.sqrt(1 + s * s)


def from_space(p, x, sigma, space):
    """The denoised prediction whose `space` representation at (x, sigma) is p (inverse of `to_space`)."""
    if space == "x0":
        return p
    s = _sigma_like(sigma, x, p.dtype)
    x = x.to(p.dtype)
    if space == "eps":
        return x - s * p
    return x / (1 + s * s) - s * p / torch.sqrt(1 + s * s)


def _dims(t):
    return list(range(1, t.ndim))


def rescale_to(pred, ref, phi):
    """Lin et al. (2023, eq. 15-16; diffusers' `rescale_noise_cfg`): pred rescaled to ref's per-row standard
    deviation, mixed phi : 1 - phi with pred itself. A row of pred with zero spread (CFG-Zero*'s zero-init
    output) is kept as it is, where diffusers divides by zero and returns NaN."""
    if phi == 0:
        return pred
    std = pred.std(dim=_dims(pred), keepdim=True)
    ratio = torch.where(std > 0, ref.std(dim=_dims(ref), keepdim=True) / std, torch.ones_like(std))
    return phi * (pred * ratio) + (1 - phi) * pred


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


class CombinedGuidance(Transform):
    """Base of the methods that combine (uncond, cond) predictions nonlinearly.

    Per evaluation it computes d_u and d_c once (one batched model call of twice the batch when `batched`, or a
    `guide` model for d_u), stores d_u in `run.uncond`, maps both into `space`, calls `combine(u, c, state)`,
    applies the optional `guidance_rescale` (Lin et al. 2023) against c, and maps back. Subclasses define
    `combine` and, if stateful, `initial_state()`. Work is done in float32 or wider; the result has d_c's dtype.
    Cost: 2 model evaluations per call (`evaluations`).
    """

    evaluations = 2
    default_space = "eps"

    def __init__(self, scale, *, uncond=None, guide=None, convention="diffusers", batched=True, space=None,
                 guidance_rescale=0.0):
        if (uncond is None) == (guide is None):
            raise ValueError("give exactly one of uncond (condition overrides) or guide (a model)")
        if uncond is not None and not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of condition overrides, got {type(uncond).__name__}")
        if guide is not None and not callable(guide):
            raise ValueError(f"guide must be a denoiser (callable), got {type(guide).__name__}")
        self.scale = _finite(scale, "guidance scale")
        self.paper = _check_convention(convention) == "paper"
        self.space = _check_space(self.default_space if space is None else space)
        self.guidance_rescale = _finite(guidance_rescale, "guidance_rescale")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.uncond, self.guide, self.batched = uncond, guide, bool(batched)

    @property
    def neutral(self):
        """The scale at which the method returns the conditional prediction (diffusers' guiders' rule)."""
        return math.isclose(self.scale, 0.0 if self.paper else 1.0)

    def guided(self, u, c, update):
        """(c if convention="paper" else u) + scale * update."""
        return (c if self.paper else u) + self.scale * update

    def initial_state(self):
        return None

    def combine(self, u, c, state):
        raise NotImplementedError

    def predictions(self, model, guide, x, sigma, cond):
        """(d_u, d_c) at (x, sigma)."""
        if guide is not None:
            return guide(x, sigma, **cond), model(x, sigma, **cond)
        return tuple(predict_under(model, x, sigma, cond, [self.uncond, {}], self.batched))

    def wrap(self, model, run):
        guide = run.count(self.guide) if self.guide is not None else None
        if self not in run.state:  # once per run: a distiller may build several denoisers in one gradient
            run.state[self] = self.initial_state()

        def guided(x, sigma, **cond):
            d_u, d_c = self.predictions(model, guide, x, sigma, cond)
            run.uncond = d_u
            wide = torch.promote_types(d_c.dtype, torch.float32)
            u, c = (to_space(d.to(wide), x, sigma, self.space) for d in (d_u, d_c))
            out = c if self.neutral and self.always_neutral() else self.combine(u, c, run.state[self])
            out = rescale_to(out, c, self.guidance_rescale)
            return from_space(out, x, sigma, self.space).to(d_c.dtype)
        return guided

    def always_neutral(self):
        """Whether the neutral scale short-cuts to c (False for CFG-Zero*, whose zero-init steps come first)."""
        return True
