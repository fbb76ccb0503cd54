"""More guidance methods as transforms (re-exported by `diffsolve.guidance`; spaces and conventions as there):
tangential CFG, magnitude-aware guidance, frequency-decoupled guidance (its Laplacian pyramid in pure torch),
Perp-Neg, dual CFG, CFG normalisation and dynamic thresholding. See docs/guidance.md for sources and costs.
"""
import math

import torch
import torch.nn.functional as F

from .denoisers import append_dims
from .guidance_base import CombinedGuidance, _check_space, _dims, _finite, from_space, rescale_to, to_space
from .transforms import Transform, predict_under

__all__ = ["CFGNorm", "DualCFG", "DynamicThresholding", "FrequencyDecoupledGuidance", "MagnitudeAwareGuidance",
           "PerpNeg", "TangentialCFG", "cfg_norm", "dual_cfg", "dynamic_thresholding", "frequency_decoupled",
           "laplacian_pyramid", "magnitude_aware", "perp_neg", "pyramid_image", "tangential_cfg"]


class TangentialCFG(CombinedGuidance):
    """Tangential damping CFG (Kwon et al. 2025, "TCFG: tangential damping classifier-free guidance", Algorithm 1):
    per row, the SVD of the 2 x N matrix [c; u] gives the principal right-singular direction v1; u is replaced by
    its projection (u . v1) v1 (its component along v2 dropped), then u' + s (c - u'). Peer: diffusers
    `TangentialClassifierFreeGuidance` (tangential_classifier_free_guidance.py), eps space."""

    def combine(self, u, c, state):
        vh = torch.linalg.svd(torch.stack([c.flatten(1), u.flatten(1)], 1), full_matrices=False)[2]
        v1 = vh[:, 0]
        u = ((u.flatten(1) * v1).sum(1, keepdim=True) * v1).reshape(u.shape)
        return self.guided(u, c, c - u)


class MagnitudeAwareGuidance(CombinedGuidance):
    """MAMBO-G magnitude-aware guidance (arXiv 2508.03442, eq. 6-7): with r = |c - u| / |u| per row, the scale
    becomes 1 + (s - 1) exp(-alpha r) (paper convention: w exp(-alpha r) on c + w (c - u)). Peer: diffusers
    `MagnitudeAwareGuidance` (magnitude_aware_guidance.py), eps space; it fails on 4-D latents in 0.42.1 (see
    docs/guidance.md), so it is compared on (B, N) and (B, L, C) shapes."""

    def __init__(self, scale, *, alpha=8.0, **kwargs):
        super().__init__(scale, **kwargs)
        self.alpha = _finite(alpha, "alpha")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")

    def combine(self, u, c, state):
        dims = _dims(c)
        diff = c - u
        ratio = torch.linalg.vector_norm(diff, dim=dims, keepdim=True) / torch.linalg.vector_norm(u, dim=dims,
                                                                                                  keepdim=True)
        damp = torch.exp(-self.alpha * ratio)
        scale = self.scale * damp if self.paper else 1.0 + (self.scale - 1.0) * damp
        return (c if self.paper else u) + scale * diff


_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x):
    """The 5 x 5 binomial blur (Burt & Adelson 1983), reflect-padded, per channel."""
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / 256.0
    channels = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(channels, 1, 5, 5), groups=channels)


def _down(x):
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def _up(x):
    return _blur(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False))


def laplacian_pyramid(x, levels):
    """The Laplacian pyramid (Burt & Adelson 1983) of a [B, C, H, W] tensor, finest band first, `levels` entries;
    H and W must be divisible by 2**(levels - 1). Blur, bilinear halving and doubling as kornia's
    `build_laplacian_pyramid` (which pads other sizes to a power of two); `pyramid_image` inverts it exactly."""
    if x.ndim != 4:
        raise ValueError(f"the Laplacian pyramid needs [B, C, H, W] tensors, got shape {tuple(x.shape)}")
    stride = 2 ** (levels - 1)
    if x.shape[-2] % stride or x.shape[-1] % stride or min(x.shape[-2:]) // stride < 3:
        raise ValueError(f"{levels} pyramid levels need H and W divisible by {stride} and at least {3 * stride}, "
                         f"got {tuple(x.shape[-2:])}")
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def pyramid_image(pyramid):
    """The image of a Laplacian pyramid (inverse of `laplacian_pyramid`)."""
    img = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        img = _up(img) + band
    return img


def _per_level(value, levels, name, default):
    if value is None:
        value = default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * levels
    value = [_finite(v, name) for v in value]
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries but guidance_scales has {levels}")
    return value


def _project(v0, v1):
    """(parallel, orthogonal) parts of v0 with respect to v1, per row, in float64."""
    dims = _dims(v0)
    a, b = v0.double(), F.normalize(v1.double(), dim=dims)
    parallel = (a * b).sum(dim=dims, keepdim=True) * b
    return parallel.to(v0.dtype), (a - parallel).to(v0.dtype)


class FrequencyDecoupledGuidance(CombinedGuidance):
    """Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the frequency domain enables high-fidelity
    sampling at low CFG scales", Algorithm 2): c and u are split into Laplacian-pyramid bands (finest first), each
    band guided with its own scale (and `parallel_weights`: the update's part parallel to the band of c weighted,
    1 = plain CFG), then the image rebuilt. `guidance_rescale` per band in "freq" space, or its first entry on the
    result in "data" space. Peer: diffusers `FrequencyDecoupledGuidance` (frequency_decoupled_guidance.py, kornia's
    pyramid), eps space. Needs [B, C, H, W] predictions. Per-band start / stop: use `limited_interval`."""

    def __init__(self, guidance_scales=(10.0, 5.0), *, parallel_weights=None, guidance_rescale=0.0,
                 guidance_rescale_space="data", **kwargs):
        scales = [_finite(s, "guidance_scales") for s in guidance_scales]
        if not scales:
            raise ValueError("guidance_scales must have at least one entry")
        if guidance_rescale_space not in ("data", "freq"):
            raise ValueError(f"guidance_rescale_space must be 'data' or 'freq', got {guidance_rescale_space!r}")
        rescales = _per_level(guidance_rescale, len(scales), "guidance_rescale", 0.0)
        if not all(0 <= r <= 1 for r in rescales):
            raise ValueError(f"guidance_rescale entries must be in [0, 1], got {rescales}")
        super().__init__(scales[0], guidance_rescale=rescales[0] if guidance_rescale_space == "data" else 0.0,
                         **kwargs)
        self.scales, self.rescales, self.rescale_space = scales, rescales, guidance_rescale_space
        self.parallel_weights = _per_level(parallel_weights, len(scales), "parallel_weights", 1.0)

    def _neutral(self, scale):
        return math.isclose(scale, 0.0 if self.paper else 1.0)

    @property
    def neutral(self):
        return all(self._neutral(s) for s in self.scales)

    def combine(self, u, c, state):
        pc, pu = laplacian_pyramid(c, len(self.scales)), laplacian_pyramid(u, len(self.scales))
        bands = []
        for bc, bu, s, w, r in zip(pc, pu, self.scales, self.parallel_weights, self.rescales):
            if self._neutral(s):
                bands.append(bc)
                continue
            shift = bc - bu
            if not math.isclose(w, 1.0):
                parallel, orthogonal = _project(shift, bc)
                shift = w * parallel + orthogonal
            band = (bc if self.paper else bu) + s * shift
            bands.append(rescale_to(band, bc, r) if self.rescale_space == "freq" else band)
        return pyramid_image(bands)


def _predict_many(model, x, sigma, cond, overrides, batched):
    """Predictions at (x, sigma) under each condition set: `cond` updated by each dict of `overrides`; one call
    of len(overrides) times the batch when `batched` and the sets can share it (`predict_under`)."""
    return predict_under(model, x, sigma, cond, overrides, batched)


class _MultiCondition(Transform):
    """Methods that combine predictions under several condition sets (`overrides`, the call's own first) in
    `space`; `run.uncond` is set to the prediction of `uncond_index`. Cost: len(overrides) evaluations."""

    uncond_index = 0

    def __init__(self, overrides, space, batched):
        for o in overrides:
            if not isinstance(o, dict):
                raise ValueError(f"condition overrides must be dicts, got {type(o).__name__}")
        self.overrides, self.space, self.batched = list(overrides), _check_space(space), bool(batched)
        self.evaluations = len(self.overrides)

    def combine(self, preds):
        raise NotImplementedError

    def wrap(self, model, run):
        def guided(x, sigma, **cond):
            preds = _predict_many(model, x, sigma, cond, self.overrides, self.batched)
            run.uncond = preds[self.uncond_index]
            wide = torch.promote_types(preds[-1].dtype, torch.float32)
            out = self.combine([to_space(p.to(wide), x, sigma, self.space) for p in preds])
            return from_space(out, x, sigma, self.space).to(preds[-1].dtype)
        return guided


class PerpNeg(_MultiCondition):
    """Perp-Neg (Armandpour et al. 2023, "Re-imagine the negative prompt algorithm", eq. 8 with one negative):
    with e the empty-prompt prediction, pos = c - e and neg = n - e, the part of neg perpendicular to pos is
    pushed away from: e + s (pos - neg_scale * perp). Per row, so a batch equals its rows alone (ComfyUI's
    `perp_neg`, comfy_extras/nodes_perpneg.py, sums the projection over the whole batch: equal for batch 1).
    ComfyUI space: x0. Cost: 3 evaluations ([empty, negative, positive] in one call)."""

    def __init__(self, scale, negative, empty, *, neg_scale=1.0, space="x0", batched=True):
        super().__init__([empty, negative, {}], space, batched)
        self.scale, self.neg_scale = _finite(scale, "scale"), _finite(neg_scale, "neg_scale")

    def combine(self, preds):
        e, n, c = preds
        pos, neg = c - e, n - e
        dims = _dims(pos)
        coef = (neg * pos).sum(dim=dims, keepdim=True) / (pos * pos).sum(dim=dims, keepdim=True)
        perp = neg - torch.nan_to_num(coef, nan=0.0, posinf=0.0, neginf=0.0) * pos
        return e + self.scale * (pos - self.neg_scale * perp)


class DualCFG(_MultiCondition):
    """Dual CFG (ComfyUI `DualCFGGuider`, comfy_extras/nodes_custom_sampler.py): with p the call's prediction,
    m the middle (second) prompt's and n the negative's, "regular" is n + cfg2 (m - n) + cfg1 (p - m) and
    "nested" n + cfg2 (m + cfg1 (p - m) - n). Linear, so space-free (x0). Cost: 3 evaluations."""

    def __init__(self, cfg1, cfg2, middle, negative, *, style="regular", batched=True):
        if style not in ("regular", "nested"):
            raise ValueError(f"style must be 'regular' or 'nested', got {style!r}")
        super().__init__([negative, middle, {}], "x0", batched)
        self.cfg1, self.cfg2, self.style = _finite(cfg1, "cfg1"), _finite(cfg2, "cfg2"), style

    def combine(self, preds):
        n, m, p = preds
        if self.style == "nested":
            return n + self.cfg2 * (m + self.cfg1 * (p - m) - n)
        return n + self.cfg2 * (m - n) + self.cfg1 * (p - m)


class CFGNorm(CombinedGuidance):
    """CFG normalisation (ComfyUI `CFGNorm`, comfy_extras/nodes_cfg.py): g = u + s (c - u), then
    g * clamp(|c| / (|g| + 1e-8), 0, 1) * strength with the norms over the channel dim (dim 1) at each position,
    so guidance never raises the prediction's per-pixel norm above the conditional one's. ComfyUI space: x0.
    At s = 1 and strength = 1 it returns c (ComfyUI's 1e-8 would scale c by |c| / (|c| + 1e-8))."""

    default_space = "x0"

    def __init__(self, scale, *, strength=1.0, **kwargs):
        super().__init__(scale, **kwargs)
        self.strength = _finite(strength, "strength")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")

    def always_neutral(self):
        return self.strength == 1.0

    def combine(self, u, c, state):
        g = self.guided(u, c, c - u)
        if g.ndim < 2:
            raise ValueError(f"CFGNorm needs a channel dim (dim 1), got shape {tuple(g.shape)}")
        norm_c, norm_g = c.norm(dim=1, keepdim=True), g.norm(dim=1, keepdim=True)
        return g * (norm_c / (norm_g + 1e-8)).clamp(0.0, 1.0) * self.strength


class DynamicThresholding(Transform):
    """Dynamic thresholding (Saharia et al. 2022, Imagen §2.3; diffusers' schedulers `thresholding=True`,
    `_threshold_sample`): per row, s = the `ratio` quantile of |D| clamped to [1, sample_max_value]; D is
    clamped to [-s, s] and divided by s. Wraps any denoiser (put it after a guidance transform to threshold the
    guided prediction). keep_noise=True renoises with the unthresholded prediction, as diffusers' schedulers do
    (they threshold x0 and keep the model's noise): it sets `run.uncond` and needs a solver that splits data and
    noise (Euler, DDIM, Euler ancestral, DPM++ 2M, DPM++ 2S ancestral), and is not combined with CFG++. Cost: 0."""

    def __init__(self, ratio=0.995, sample_max_value=1.0, *, keep_noise=False):
        self.ratio = _finite(ratio, "dynamic_thresholding_ratio")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
        self.sample_max_value = _finite(sample_max_value, "sample_max_value")
        if self.sample_max_value < 1:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
        self.keep_noise = self.renoises_with_uncond = bool(keep_noise)

    def threshold(self, d):
        wide = d.to(torch.promote_types(d.dtype, torch.float32))
        s = torch.quantile(wide.abs().flatten(1), self.ratio, dim=1).clamp(1.0, self.sample_max_value)
        s = append_dims(s, d.ndim)
        return (torch.clamp(wide, -s, s) / s).to(d.dtype)

    def wrap(self, model, run):
        def thresholded(x, sigma, **cond):
            d = model(x, sigma, **cond)
            if self.keep_noise:
                run.uncond = d
            return self.threshold(d)
        return thresholded


def tangential_cfg(scale, uncond=None, **kwargs):
    """Tangential damping CFG; see `TangentialCFG`."""
    return TangentialCFG(scale, uncond=uncond, **kwargs)


def magnitude_aware(scale, uncond=None, *, alpha=8.0, **kwargs):
    """Magnitude-aware guidance (MAMBO-G); see `MagnitudeAwareGuidance`."""
    return MagnitudeAwareGuidance(scale, uncond=uncond, alpha=alpha, **kwargs)


def frequency_decoupled(guidance_scales=(10.0, 5.0), uncond=None, **kwargs):
    """Frequency-decoupled guidance; see `FrequencyDecoupledGuidance`."""
    return FrequencyDecoupledGuidance(guidance_scales, uncond=uncond, **kwargs)


def perp_neg(scale, negative, empty, *, neg_scale=1.0, **kwargs):
    """Perp-Neg; see `PerpNeg`."""
    return PerpNeg(scale, negative, empty, neg_scale=neg_scale, **kwargs)


def dual_cfg(cfg1, cfg2, middle, negative, *, style="regular", **kwargs):
    """Dual CFG (ComfyUI's DualCFGGuider); see `DualCFG`."""
    return DualCFG(cfg1, cfg2, middle, negative, style=style, **kwargs)


def cfg_norm(scale, uncond=None, *, strength=1.0, **kwargs):
    """CFG normalisation (ComfyUI's CFGNorm); see `CFGNorm`."""
    return CFGNorm(scale, uncond=uncond, strength=strength, **kwargs)


def dynamic_thresholding(ratio=0.995, sample_max_value=1.0, *, keep_noise=False):
    """Imagen's dynamic thresholding; see `DynamicThresholding`."""
    return DynamicThresholding(ratio, sample_max_value, keep_noise=keep_noise)
