"""Shared test helpers. Plain functions (import them with `from conftest import ...`); the diffusers stack is
imported inside them so that the core tests run without it."""
import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """benchmarks/<name>.py as a module (benchmarks/ on sys.path, for the scripts' `_common`)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_table(text, section, first_cell=None):
    """Rows (stripped cells, the header row kept, the |---| separator dropped) of the first markdown table from
    `section` on (up to the next "## " heading), or of the one whose header row starts with `first_cell`."""
    lines = text[text.index(section):].splitlines()
    lines = lines[:next((i for i, line in enumerate(lines) if i and line.startswith("## ")), len(lines))]
    head = "|" if first_cell is None else f"| {first_cell} |"
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-:") for c in cells):
            rows.append(cells)
    return rows


def tiny_sd_scheduler(**overrides):
    """Stable Diffusion's DDIM scheduler config with `overrides` (see integrations.diffusers)."""
    from diffsolve.integrations.diffusers import tiny_sd_scheduler as build

    return build(**overrides)


def tiny_sd_components(prediction_type="epsilon", **scheduler_kw):
    """(unet, scheduler, vae): diffusers' own tiny random Stable Diffusion components, built offline."""
    from diffsolve.integrations.diffusers import tiny_sd_components as build

    c = build(prediction_type, **scheduler_kw)
    return c.unet, c.scheduler, c.vae


class TinyFeatureNet(torch.nn.Module):
    """A tiny random FID feature network (float images [N, 3, H, W] in [0, 1] -> [N, features]): 4x4 average
    pooling, a fixed random linear map (`torch.manual_seed(seed)`) and a tanh. Module-level, so that
    `torch.save(module)` can pickle it."""

    def __init__(self, features=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(48, features)

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return torch.tanh(self.proj(pooled))


def tiny_feature_network(path=None, features=8, seed=0):
    """`TinyFeatureNet(features, seed)` in eval mode, saved as TorchScript to `path` when given."""
    net = TinyFeatureNet(features, seed).eval()
    if path is not None:
        torch.jit.save(torch.jit.script(net), str(path))
    return net


def tiny_clip(path, image_size=32, seed=0):
    """A tiny random CLIPModel + CLIPProcessor (letters-only BPE vocabulary, no merges; images resized to
    `image_size`), saved with save_pretrained to `path`; returns path."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def frechet_distance_scipy(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)) of two [N, d] arrays, written out with numpy /
    scipy: the independent reference for diffsolve's and torchmetrics' Fréchet distances."""
    import numpy as np
    import scipy.linalg
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))
