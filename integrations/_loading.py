"""Shared by the SDXL / SD3 / Flux integrations: offline folder checks before anything heavy is loaded,
module dtype / device checks, latent-size checks, and stand-in tokenizers for tiny test components.

The loading rules are integrations.diffusers's (Stable Diffusion): a local diffusers-layout folder, or a Hub
id already in the Hugging Face cache with `local_files_only=True` (the default); every missing folder, config or
weight file is a FileNotFoundError naming it, and a bad dtype / device a ValueError, before a model is built.
"""
import os

import torch

from .diffusers import _check_dtype_device, _resolve_root

__all__ = ["StandInTokenizer", "check_layout", "check_latent_size", "check_on_module", "module_dtype_device",
           "prepare_root"]

_WEIGHTS = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def prepare_root(path_or_id, dtype, device, local_files_only):
    """(root folder, torch.device) after checking dtype and device; FileNotFoundError for a missing folder / id."""
    device = _check_dtype_device(dtype, device)
    return _resolve_root(path_or_id, local_files_only), device


def _check_one(root, name, family):
    sub = os.path.join(root, name)
    if not os.path.isdir(sub):
        return f"{name}/ (no such folder)"
    files = os.listdir(sub)
    if name.startswith("tokenizer"):
        return None if any(f in files for f in _TOKENIZER_FILES) else f"{name}/ (no tokenizer files)"
    config = "scheduler_config.json" if name == "scheduler" else "config.json"
    if config not in files:
        return f"{name}/{config}"
    if name != "scheduler" and not any(f.endswith(_WEIGHTS) or f.endswith(".index.json") for f in files):
        return f"{name}/ weights (*.safetensors or *.bin)"
    return None


def check_layout(root, required, optional, family):
    """Check `root` holds every folder of `required` (config + weights; tokenizer files for tokenizers) and
    return the set of `optional` ones present. One FileNotFoundError lists everything missing, naming `family`."""
    missing = [m for m in (_check_one(root, name, family) for name in required) if m]
    if missing:
        raise FileNotFoundError(f"{root!r} is not a complete {family} folder: missing {', '.join(missing)} "
                                f"(a diffusers layout needs {', '.join(n + '/' for n in required)})")
    present = set()
    for name in optional:
        if os.path.isdir(os.path.join(root, name)):
            problem = _check_one(root, name, family)
            if problem:
                raise FileNotFoundError(f"{root!r}: {family} folder {name}/ is incomplete: missing {problem}")
            present.add(name)
    return present


def module_dtype_device(module):
    """(dtype, device) of a module's first floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError(f"{type(module).__name__} has no floating-point parameters")


def check_on_module(tensor, name, module, dtype=True):
    """ValueError naming both sides unless `tensor` is a floating tensor on `module`'s device (and dtype)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    mod_dtype, mod_device = module_dtype_device(module)
    what = type(module).__name__
    if tensor.device != mod_device:
        raise ValueError(f"{name} is on device {tensor.device} but the {what} is on device {mod_device}; "
                         f"move it with .to({str(mod_device)!r})")
    if dtype and tensor.dtype != mod_dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but the {what} has dtype {mod_dtype}; cast it with "
                         f".to({mod_dtype}) (or build the denoiser with cast=True for mixed precision)")


def check_latent_size(height, width, factor, what):
    """ValueError unless both sides are positive multiples of `factor` (the VAE's / patch size's)."""
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(f"{what} size {height}x{width} is not a positive multiple of {factor}")


class StandInTokenizer:
    """A deterministic tokenizer for tiny test components (a real one's vocabulary files would need the Hub):
    words hashed into [2, vocab_size), 0 padding, 1 end of text, padded / truncated to `model_max_length`."""

    def __init__(self, vocab_size=99, model_max_length=8):
        self.vocab_size, self.model_max_length = int(vocab_size), int(model_max_length)

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt", **kw):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = max_length or self.model_max_length
        rows = []
        for p in prompts:
            ids = [2 + sum(ord(c) * 31 ** k for k, c in enumerate(w)) % (self.vocab_size - 2) for w in p.split()]
            ids = (ids + [1])[:length]
            rows.append(ids + [0] * (length - len(ids)))
        from transformers import BatchEncoding  # both out["input_ids"] and out.input_ids, as a real tokenizer's
        return BatchEncoding({"input_ids": torch.tensor(rows, dtype=torch.long)})

    added_tokens_encoder = {}  # no textual-inversion tokens (diffusers' pipelines look them up)

    def tokenize(self, prompt):
        return prompt.split()

    def batch_decode(self, ids, **kw):
        return [" ".join(str(int(i)) for i in row) for row in ids]
