"""Guidance methods beyond plain CFG, as transforms: each wraps a denoiser and returns a denoiser.

Every method here evaluates the conditional and the unconditional predictions once per model call (one batched
call of twice the batch, the [uncond, cond] order of `diffsolve.transforms.Guidance`) and combines them with its
own `combine`. The combination is linear for CFG and CFG++, so its space does not matter; the nonlinear methods
differ by the space they combine in, chosen with `space=`:

  - "x0":  the denoised prediction D itself;
  - "eps": the noise prediction eps = (x - D) / sigma (VE coordinates x = x0 + sigma n), D = x - sigma eps;
  - "v":   the VP-equivalent velocity v = a eps - b D with a = 1 / sqrt(1 + sigma**2), b = sigma / sqrt(1 + sigma**2)
           (Salimans & Ho 2022 on x_VP = x / sqrt(1 + sigma**2) = a D + b eps), so D = x / (1 + sigma**2) - b v.

Each defaults to the space its diffusers peer combines in (the model's raw predictions: eps for Stable Diffusion
1.5) or, for the ComfyUI-only methods, ComfyUI's (x0, its "denoised"). eps and v need sigma > 0.

State that lives across steps (APG's momentum, CFG-Zero*'s evaluation counter) is kept in `run.state[self]`:
a fresh `Run` is made for every sampling call and every distiller gradient, so it is reset at each call and
never leaks between calls; it is per row (each row's momentum is its own), so a batch equals its rows alone.

Scales follow `diffsolve.transforms.cfg`: convention="diffusers" is u + s (c - u); convention="paper" is
diffusers' `use_original_formulation` (c + w (c - u), and c + w * update for the methods that change the update).
As in diffusers' guiders, a method whose scale is neutral (s = 1, or w = 0) returns the conditional prediction
(after the optional `guidance_rescale`) without touching its state. The more specialised methods (tangential,
magnitude-aware, frequency-decoupled, Perp-Neg, dual CFG, CFG normalisation, dynamic thresholding) live in
`diffsolve.guidance_extra` and are re-exported here. See docs/guidance.md.
"""
import torch

from . import guidance_extra as _extra
from .denoisers import append_dims
from .guidance_base import SPACES, CombinedGuidance, _dims, _finite, from_space, rescale_to, to_space  # noqa: F401
from .guidance_extra import *  # noqa: F401,F403  (the rest of the methods)
from .transforms import Guidance

__all__ = sorted({"SPACES", "AdaptiveProjectedGuidance", "CFGPlusPlus", "CFGZeroStar", "CombinedGuidance",
                  "RescaledCFG", "apg", "cfg_pp", "cfg_rescale", "cfg_zero_star", "from_space", "rescale_to",
                  "to_space", *_extra.__all__})


class RescaledCFG(CombinedGuidance):
    """CFG with rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", §3.4,
    eq. 15-16): g = u + s (c - u), then g <- phi g std(c) / std(g) + (1 - phi) g per row (phi =
    `guidance_rescale`, 0.7 in the paper). Peer: diffusers `ClassifierFreeGuidance(guidance_rescale=...)`
    (diffusers/guiders/classifier_free_guidance.py), eps space. ComfyUI's RescaleCFG does the same in v space."""

    def combine(self, u, c, state):
        return self.guided(u, c, c - u)


class AdaptiveProjectedGuidance(CombinedGuidance):
    """APG (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance scales", Algorithm 1):
    the update c - u, averaged with `momentum` (running = update + momentum * running, kept per row across
    steps in run.state), clipped to norm `norm_threshold` (0: off), split into its parts parallel and orthogonal
    to c (per row, over all non-batch dims, in float64) and recombined as orthogonal + eta * parallel; then
    u + s * update. Peer: diffusers `AdaptiveProjectedGuidance` (adaptive_projected_guidance.py; its
    `adaptive_projected_guidance_rescale` is our `norm_threshold`), eps space. ComfyUI's APG node works in x0 and
    returns c + s * update (our convention="paper")."""

    def __init__(self, scale, *, momentum=0.0, norm_threshold=0.0, eta=1.0, **kwargs):
        super().__init__(scale, **kwargs)
        self.momentum = _finite(momentum, "momentum")
        if not -1 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [-1, 1], got {momentum}")
        self.norm_threshold = _finite(norm_threshold, "norm_threshold")
        if self.norm_threshold < 0:
            raise ValueError(f"norm_threshold must be >= 0 (0 turns it off), got {norm_threshold}")
        self.eta = _finite(eta, "eta")

    def initial_state(self):
        return {"running": None}

    def combine(self, u, c, state):
        diff = c - u
        dims = _dims(diff)
        if self.momentum != 0:
            running = state["running"]
            if running is not None and running.shape != diff.shape:
                raise ValueError(f"APG momentum was built for shape {tuple(running.shape)}, got {tuple(diff.shape)} "
                                 "in the same run")
            diff = diff if running is None else diff + self.momentum * running
            state["running"] = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        v0, v1 = diff.double(), torch.nn.functional.normalize(c.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        update = (v0 - parallel) + self.eta * parallel
        return self.guided(u, c, update.to(diff.dtype))


class CFGZeroStar(CombinedGuidance):
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: improved classifier-free guidance for flow matching models",
    eq. 8-9 and §3.2): the unconditional prediction is scaled by the per-row optimal
    alpha = <c, u> / (|u|**2 + 1e-8) before CFG, u + s (c - alpha u) on alpha u; the first `zero_init_steps`
    model evaluations of a run return a zero prediction in `space` (in eps space D = x: the sample stays put).
    The evaluation counter lives in run.state (one count per guided call: a step for the one-evaluation solvers).
    Peer: diffusers `ClassifierFreeZeroStarGuidance` (classifier_free_zero_star_guidance.py), eps space."""

    def __init__(self, scale, *, zero_init_steps=0, **kwargs):
        super().__init__(scale, **kwargs)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps

    def initial_state(self):
        return {"evaluations": 0}

    def always_neutral(self):
        return self.zero_init_steps == 0

    def combine(self, u, c, state):
        state["evaluations"] += 1
        if state["evaluations"] <= self.zero_init_steps:
            return torch.zeros_like(c)
        if self.neutral:
            return c
        cf, uf = c.flatten(1), u.flatten(1)
        alpha = append_dims((cf * uf).sum(1) / ((uf * uf).sum(1) + 1e-8), c.ndim)
        u = alpha * u
        return self.guided(u, c, c - u)


class CFGPlusPlus(Guidance):
    """CFG++ (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance", Algorithm 1 / eq. 10):
    the data part of each update is the guided D_u + lambda (D_c - D_u) (lambda = `scale`, in [0, 1] in the
    paper), the noise part the unconditional prediction's: the transform sets `run.uncond` and asks the step to
    renoise with it (`renoises_with_uncond`), which Euler, Euler ancestral, DDIM, DPM++ 2M and DPM++ 2S ancestral
    do (`Step.noise_direction`); other solvers refuse it. lambda = 0 is the unconditional sampler. Cost: 2."""

    renoises_with_uncond = True

    def __init__(self, scale, *, uncond=None, guide=None, batched=True):
        _finite(scale, "CFG++ scale")
        super().__init__(scale, uncond=uncond, guide=guide, convention="diffusers", batched=batched)


def cfg_rescale(scale, uncond=None, *, guidance_rescale=0.7, **kwargs):
    """CFG with rescale (Lin et al. 2023); see `RescaledCFG`."""
    return RescaledCFG(scale, uncond=uncond, guidance_rescale=guidance_rescale, **kwargs)


def apg(scale, uncond=None, *, momentum=0.0, norm_threshold=0.0, eta=1.0, **kwargs):
    """Adaptive projected guidance (Sadat et al. 2024); see `AdaptiveProjectedGuidance`."""
    return AdaptiveProjectedGuidance(scale, uncond=uncond, momentum=momentum, norm_threshold=norm_threshold,
                                     eta=eta, **kwargs)


def cfg_zero_star(scale, uncond=None, *, zero_init_steps=0, **kwargs):
    """CFG-Zero* (Fan et al. 2025); see `CFGZeroStar`."""
    return CFGZeroStar(scale, uncond=uncond, zero_init_steps=zero_init_steps, **kwargs)


def cfg_pp(scale, uncond=None, *, uncond_model=None, batched=True):
    """CFG++ (Chung et al. 2024); see `CFGPlusPlus`."""
    return CFGPlusPlus(scale, uncond=uncond, guide=uncond_model, batched=batched)
