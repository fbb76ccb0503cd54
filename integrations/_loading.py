"""Shared by the SDXL / SD3 / Flux integrations: offline folder checks before anything heavy is loaded,
module dtype / device checks, latent-size checks, and stand-in tokenizers for tiny test components.

The loading rules are integrations.diffusers's (Stable Diffusion): a local diffusers-layout folder, or a Hub
id already in the Hugging Face cache with `local_files_only=True` (the default); every missing folder, config or
weight file is a FileNotFoundError naming it, and a bad dtype / device a ValueError, before a model is built.
"""
import os

import torch

from .diffusers import _check_dtype_device, _resolve_root, check_on_module, module_dtype_device  # noqa: F401 (re-exported)

__all__ = ["StandInTokenizer", "check_layout", "check_latent_size", "check_on_module", "check_prompt_list",
           "load_text_parts", "module_dtype_device", "prepare_root"]

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


def load_text_parts(root, present, encoder_class, dtype, device, local_files_only):
    """{name: loaded part} for every tokenizer* / text_encoder* folder in `present`: tokenizers through
    AutoTokenizer, each encoder through `encoder_class(name)`, in eval mode on `device`."""
    if not present:
        return {}
    from transformers import AutoTokenizer
    parts = {}
    for name in sorted(present):
        if name.startswith("tokenizer"):
            parts[name] = AutoTokenizer.from_pretrained(root, subfolder=name, local_files_only=local_files_only)
        else:
            parts[name] = encoder_class(name).from_pretrained(root, subfolder=name, torch_dtype=dtype,
                                                              local_files_only=local_files_only).to(device).eval()
    return parts


def check_prompt_list(prompts):
    """`prompts` as a non-empty list of strings; a ValueError otherwise (a single string names the fix)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


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
