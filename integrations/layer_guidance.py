"""Guidance that perturbs the model's own layers, as diffsolve transforms over a diffusers UNet or transformer:
perturbed-attention guidance (PAG), skip-layer guidance (SLG), smoothed-energy guidance (SEG) and layer-skip
autoguidance.

Each evaluation makes the plain (conditional) prediction D_c, then installs diffusers' hooks on the network
(`diffusers.hooks.LayerSkipConfig` with `_apply_layer_skip_hook`, `SmoothedEnergyGuidanceConfig` with
`_apply_smoothed_energy_guidance_hook`, the same calls diffusers' guiders make in `prepare_models`), makes the
perturbed prediction D_p, and removes the hooks again in a `finally` block (`HookRegistry.remove_hook`, as in the
guiders' `cleanup_models`), after which the network's modules are exactly as before: every `_diffusers_hook`
registry and instance `forward` that the hooks created is deleted. The combinations (diffusers/guiders/
perturbed_attention_guidance.py, skip_layer_guidance.py, smoothed_energy_guidance.py `forward`;
pipelines/pag/pag_utils.py `_apply_perturbed_attention_guidance`) are, with s the perturbation scale,

    without CFG:  D = D_c + s (D_c - D_p)
    with CFG:     D = D_u + g (D_c - D_u) + s (D_c - D_p)       (g in diffusers' convention; paper: g = 1 + w)

which is `StableDiffusionPAGPipeline`'s formula (pag_scale = s) in both cases, and the guiders' formula with CFG.
Without CFG the guiders' default (`use_original_formulation=False`) is D_p + s' (D_c - D_p): s' = s + 1.
Layer-skip autoguidance (diffusers/guiders/auto_guidance.py) uses the perturbed model in the unconditional's
place: D = D_p + g (D_c - D_p). Guidance is linear, so combining denoisers equals combining noise predictions.
diffusers' `guidance_rescale` is not linear and is left to a rescale transform stacked on top.

Costs per evaluation, counted by the run: 2 model calls (D_c, D_p), 3 with CFG (D_u and D_c in one batched call of
twice the batch, D_p alone: hooks act on the whole batch). `sigma_range` restricts the perturbed term to
sigma_lo < sigma <= sigma_hi (diffusers' guiders restrict it to a fraction of the steps, `*_guidance_start` /
`*_guidance_stop`); outside it the perturbed call is skipped.

Layers are given as diffusers' PAG pipeline names them (strings: regular expressions searched in each transformer
block's module path, e.g. "mid" for a UNet's mid block, "down_blocks.1") or as the guiders do (integers: indices
into the block stack `fqn`, "auto" for DiT-style transformers). This module is part of the integrations and
imports diffusers lazily; the core package never imports it.
"""
import contextlib
import copy
import itertools
import math
import re

import torch

from diffsolve.denoisers import append_dims, sigma_rows
from diffsolve.transforms import CONVENTIONS, Transform, predict_under

__all__ = ["KINDS", "LayerPerturbation", "LayerSkipAutoguidance", "PerturbedGuidance", "block_stacks",
           "layer_skip_autoguidance", "perturbed", "perturbed_attention_guidance", "skip_layer_guidance",
           "smoothed_energy_guidance"]

KINDS = ("pag", "slg", "seg", "skip")
_BLOCK_STACK = re.compile(r"(^|\.)(transformer_blocks|single_transformer_blocks|blocks|layers)$")
_names = itertools.count()


def block_stacks(module):
    """{fqn: number of blocks} of every `torch.nn.ModuleList` of transformer blocks in `module` (named like
    diffusers' `_ALL_TRANSFORMER_BLOCK_IDENTIFIERS`: transformer_blocks, single_transformer_blocks, blocks, layers)."""
    return {name: len(m) for name, m in module.named_modules()
            if isinstance(m, torch.nn.ModuleList) and _BLOCK_STACK.search(name)}


def _select(module, layers, fqn):
    """[(fqn, indices)] of the blocks `layers` names: integers index the stack `fqn` ("auto": the first of
    diffusers' identifiers the module has), strings are regular expressions searched in "fqn.index"."""
    if isinstance(layers, (int, str)):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one block (an index or a module-path pattern)")
    stacks = block_stacks(module)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        if fqn == "auto":
            top = [n for n in ("transformer_blocks", "single_transformer_blocks", "blocks", "layers") if n in stacks]
            if not top:
                raise ValueError(f"fqn='auto' finds no top-level block stack in {type(module).__name__} (its stacks: "
                                 f"{sorted(stacks)}); give fqn= or name the layers by pattern, e.g. 'mid'")
            fqn = top[0]
        if fqn not in stacks:
            raise ValueError(f"fqn {fqn!r} is not a block stack of {type(module).__name__}; stacks: {sorted(stacks)}")
        bad = [i for i in layers if not 0 <= i < stacks[fqn]]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for {fqn!r} ({stacks[fqn]} blocks)")
        return [(fqn, sorted(set(layers)))]
    if not all(isinstance(v, str) for v in layers):
        raise ValueError(f"layers must be all integers or all strings (patterns), got {layers!r}")
    chosen = {}
    for pattern in layers:
        hits = [(name, i) for name, n in stacks.items() for i in range(n) if re.search(pattern, f"{name}.{i}")]
        if not hits:
            raise ValueError(f"layer pattern {pattern!r} matches no transformer block of {type(module).__name__}; "
                             f"blocks live in {sorted(stacks)}")
        for name, i in hits:
            chosen.setdefault(name, set()).add(i)
    return [(name, sorted(idx)) for name, idx in chosen.items()]


class LayerPerturbation:
    """Which blocks of a diffusers network to perturb and how (diffusers' hook configurations):

    - "pag": self-attention scores replaced by the identity (attention output = value projection;
      `LayerSkipConfig(skip_attention=False, skip_attention_scores=True, skip_ff=False)`, PAG, Ahn et al. 2024);
    - "slg": the whole block skipped (`LayerSkipConfig(skip_attention=True, skip_ff=True)`, SD 3.5's SLG);
    - "seg": self-attention queries blurred by a Gaussian of `blur_sigma` tokens, above 9999 the mean
      (`SmoothedEnergyGuidanceConfig`, Hong 2024);
    - "skip": blocks skipped with `dropout` (1: skipped outright; below 1 the block output goes through
      torch's dropout, drawn from the global RNG) for layer-skip autoguidance.
    The blocks are checked on the module once, here (a hook install and removal), before any work.
    """

    def __init__(self, module, kind, layers, *, fqn="auto", blur_sigma=9999999.0, dropout=1.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module must be the diffusers network (a torch.nn.Module), got {type(module).__name__}")
        if not (isinstance(blur_sigma, (int, float)) and blur_sigma > 0):
            raise ValueError(f"blur_sigma must be a positive number, got {blur_sigma!r}")
        if not (isinstance(dropout, (int, float)) and 0 < dropout <= 1):
            raise ValueError(f"dropout must be in (0, 1], got {dropout!r}")
        from diffusers.hooks import LayerSkipConfig
        from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig

        self.module, self.kind, self.blur_sigma = module, kind, float(blur_sigma)
        self.blocks = _select(module, layers, fqn)
        if kind == "seg":
            self.configs = [SmoothedEnergyGuidanceConfig(indices=i, fqn=f) for f, i in self.blocks]
        else:
            flags = {"pag": dict(skip_attention=False, skip_attention_scores=True, skip_ff=False),
                     "slg": dict(skip_attention=True, skip_ff=True),
                     "skip": dict(skip_attention=True, skip_ff=True, dropout=float(dropout))}[kind]
            self.configs = [LayerSkipConfig(indices=i, fqn=f, **flags) for f, i in self.blocks]
        with perturbed(self):  # the hooks install on these blocks (diffusers raises naming what it misses)
            pass

    def install(self, name, names):
        """Install the hooks, one name per configuration (`name` + an index), appending each name to `names`
        before its hooks go in (so that a failure halfway leaves a list to remove); diffusers' private appliers,
        called as its guiders call them."""
        from diffusers.hooks.layer_skip import _apply_layer_skip_hook
        from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

        for k, config in enumerate(self.configs):
            names.append(f"{name}_{k}")
            if self.kind == "seg":
                _apply_smoothed_energy_guidance_hook(self.module, copy.copy(config), self.blur_sigma, name=names[-1])
            else:
                _apply_layer_skip_hook(self.module, copy.copy(config), name=names[-1])

    def __repr__(self):
        return f"LayerPerturbation({self.kind!r}, blocks={self.blocks})"


def _hook_state(module):
    """Per submodule: (had a HookRegistry, had an instance-level forward)."""
    return {id(m): ("_diffusers_hook" in vars(m), "forward" in vars(m)) for m in module.modules()}


@contextlib.contextmanager
def perturbed(perturbation):
    """Within the block, `perturbation.module` runs with the perturbation's hooks; on leaving (normally or by an
    exception) the hooks are removed and what they added to the modules (registries, instance forwards) deleted."""
    from diffusers.hooks import HookRegistry

    module = perturbation.module
    before = _hook_state(module)
    names = []
    try:
        perturbation.install(f"diffsolve_{perturbation.kind}_{next(_names)}", names)
        yield
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in names:
            registry.remove_hook(name, recurse=True)
        for m in module.modules():
            had_registry, had_forward = before.get(id(m), (False, False))
            reg = vars(m).get("_diffusers_hook")
            if reg is None or had_registry:
                continue
            if reg.hooks:  # a hook someone else installed meanwhile: leave it
                continue
            del m._diffusers_hook
            if not had_forward and "forward" in vars(m):
                del m.forward
        if before[id(module)][0]:
            registry.invalidate_child_registries_cache()


def _scale(value, name):
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_range(sigma_range):
    if sigma_range is None:
        return None
    lo, hi = sigma_range
    if not 0 <= lo < hi:
        raise ValueError(f"sigma_range must be (lo, hi) with 0 <= lo < hi, got {sigma_range!r}")
    return float(lo), float(hi)


class PerturbedGuidance(Transform):
    """D = D_c + s (D_c - D_p), or with CFG D_u + g (D_c - D_u) + s (D_c - D_p) (see the module docstring).

    `perturbation`: a `LayerPerturbation` of the network the wrapped denoiser runs. `cfg_scale` (None: no CFG)
    and `uncond` (condition overrides of the unconditional branch, e.g. {"encoder_hidden_states": negative})
    add CFG in `convention` ("diffusers": g as given; "paper": g = 1 + w). `sigma_range=(lo, hi)`: the perturbed
    term only where lo < sigma <= hi. `batched`: D_u and D_c in one call of twice the batch.
    """

    def __init__(self, perturbation, scale, *, cfg_scale=None, uncond=None, convention="diffusers",
                 sigma_range=None, batched=True):
        if not isinstance(perturbation, LayerPerturbation):
            raise ValueError(f"perturbation must be a LayerPerturbation, got {perturbation!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if (cfg_scale is None) != (uncond is None):
            raise ValueError("CFG needs both cfg_scale and uncond (the unconditional condition overrides), or neither")
        self.perturbation, self.s = perturbation, _scale(scale, "scale")
        self.g = None
        if cfg_scale is not None:
            g = _scale(cfg_scale, "cfg_scale")
            self.g = g if convention == "diffusers" else 1.0 + g
        self.uncond, self.range, self.batched = uncond, _check_range(sigma_range), batched

    def _active(self, sigma, x):
        """Per-row mask of the perturbed term (None: every row)."""
        if self.range is None:
            return None
        s = sigma_rows(sigma, x)
        return (s > self.range[0]) & (s <= self.range[1])

    def _plain(self, model, x, sigma, cond):
        """(D_u or None, D_c): one call of twice the batch when batched (diffusers' [uncond, cond] order)."""
        if self.g is None:
            return None, model(x, sigma, **cond)
        return tuple(predict_under(model, x, sigma, cond, [self.uncond, {}], self.batched))

    def wrap(self, model, run):
        def guided(x, sigma, **cond):
            d_u, d_c = self._plain(model, x, sigma, cond)
            out = d_c if d_u is None else d_u + self.g * (d_c - d_u)
            if d_u is not None:
                run.uncond = d_u
            mask = self._active(sigma, x)
            if mask is not None and not mask.any():
                return out
            with perturbed(self.perturbation):
                d_p = model(x, sigma, **cond)
            term = self.s * (d_c - d_p)
            if mask is not None:
                term = term * append_dims(mask, x.ndim).to(term.dtype)
            return out + term
        return guided


class LayerSkipAutoguidance(Transform):
    """D = D_p + g (D_c - D_p): the layer-skipped model as the guide (diffusers/guiders/auto_guidance.py;
    autoguidance, Karras et al. 2024, with a perturbed rather than a separately trained weak model). g in
    `convention` ("paper": g = 1 + w). The guide's prediction is the run's `uncond`."""

    def __init__(self, perturbation, scale, *, convention="diffusers"):
        if not isinstance(perturbation, LayerPerturbation):
            raise ValueError(f"perturbation must be a LayerPerturbation, got {perturbation!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        g = _scale(scale, "scale")
        self.perturbation, self.g = perturbation, g if convention == "diffusers" else 1.0 + g

    def wrap(self, model, run):
        def guided(x, sigma, **cond):
            d_c = model(x, sigma, **cond)
            with perturbed(self.perturbation):
                d_p = model(x, sigma, **cond)
            run.uncond = d_p
            return d_p + self.g * (d_c - d_p)
        return guided


def perturbed_attention_guidance(module, scale=3.0, layers="mid", *, fqn="auto", **options):
    """PAG (Ahn et al. 2024): identity self-attention in `layers`; `scale` is the PAG pipeline's `pag_scale`
    (default 3.0; its default layers "mid"). `options`: cfg_scale, uncond, convention, sigma_range, batched."""
    return PerturbedGuidance(LayerPerturbation(module, "pag", layers, fqn=fqn), scale, **options)


def skip_layer_guidance(module, scale=2.8, layers=(7, 8, 9), *, fqn="auto", **options):
    """SLG (Stability AI, SD 3.5): `layers` skipped; defaults are diffusers' guider's (2.8, SD 3.5 Medium's
    blocks 7-9, which its guider applies on steps 1 % - 20 %: pass `sigma_range` for that)."""
    return PerturbedGuidance(LayerPerturbation(module, "slg", layers, fqn=fqn), scale, **options)


def smoothed_energy_guidance(module, scale=2.8, layers=(7, 8, 9), *, fqn="auto", blur_sigma=9999999.0, **options):
    """SEG (Hong 2024): self-attention queries blurred with `blur_sigma` (above 9999: replaced by their mean, the
    infinite-blur limit); defaults are diffusers' guider's (scale 2.8, blur 9999999)."""
    return PerturbedGuidance(LayerPerturbation(module, "seg", layers, fqn=fqn, blur_sigma=blur_sigma), scale,
                             **options)


def layer_skip_autoguidance(module, scale, layers, *, dropout=1.0, fqn="auto", convention="diffusers"):
    """Autoguidance with the layer-skipped model as the guide (diffusers' AutoGuidance guider)."""
    return LayerSkipAutoguidance(LayerPerturbation(module, "skip", layers, fqn=fqn, dropout=dropout), scale,
                                 convention=convention)
