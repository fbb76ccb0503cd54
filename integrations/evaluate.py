"""Evaluation of text-to-2D runs: FID of each method's images against DDIM samples of the same prompts and
seeds, and CLIP similarity of each image with its prompt. Both run offline from weights the user points at:

* FID (torchmetrics' `FrechetInceptionDistance`) with a user-supplied feature network: a TorchScript file
  (`torch.jit.save`) that maps float images [N, 3, H, W] in [0, 1] to features [N, d] (resizing / normalising
  inside), or torch-fidelity's Inception weights file (`pt_inception-2015-12-05-6726825d.pth`, the standard
  FID network, loaded as weights into its architecture) when torch-fidelity is installed. Nothing is
  unpickled: a `torch.save`d module is refused.
* CLIP similarity: cosine of CLIP's image and text embeddings (projected), from a local folder holding
  a `CLIPModel` and its `CLIPProcessor` (`save_pretrained` output or a Hub snapshot), loaded with
  `local_files_only=True`. CLIPScore is 100 * max(cosine, 0).

Without weights each metric is recorded as skipped, with the flag that turns it on (`SKIPPED_FID`,
`SKIPPED_CLIP`). The DDIM references are diffsolve's `sample_ddim` on the SD denoiser with CFG in the
diffusers convention (what a stock `StableDiffusionPipeline(guidance_scale=7.5)` computes), then `vae_decode`.
"""
from pathlib import Path

import torch

from diffsolve._io import write_json
from diffsolve.solvers import sample_ddim
from diffsolve.transforms import cfg

from .diffusers import SDDenoiser, from_ve, sigmas_from_scheduler, to_ve, unet_dtype_device, vae_decode

SKIPPED_FID = ("skipped: pass --inception PATH (a TorchScript feature network, or "
               "torch-fidelity's Inception weights) to compute FID against DDIM samples")
SKIPPED_CLIP = "skipped: pass --clip PATH (a local folder with a CLIPModel and its CLIPProcessor) to compute it"


@torch.no_grad()
def ddim_reference(components, prompt_embeds, seed, resolution, steps=50, guidance_scale=7.5):
    """One DDIM sample [resolution, resolution, 3] in [0, 1] for (cond, uncond) = `prompt_embeds`: initial
    latents from `torch.Generator().manual_seed(seed)` (CPU, so every device draws the same), `steps` DDIM
    steps of the scheduler's grid, CFG `uncond + guidance_scale * (cond - uncond)`, then the VAE decoder."""
    cond, uncond = prompt_embeds
    unet, vae, scheduler = components.unet, components.vae, components.scheduler
    dtype, device = unet_dtype_device(unet)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(device, dtype)
    sigmas, _ = sigmas_from_scheduler(scheduler, steps)
    guidance = [cfg(guidance_scale, uncond={"encoder_hidden_states": uncond})] if guidance_scale != 1 else []
    x = sample_ddim(SDDenoiser(components), to_ve(latents, sigmas[0]), sigmas, disable=True,
                    extra_args={"encoder_hidden_states": cond}, transforms=guidance)
    return vae_decode(vae, from_ve(x, sigmas[-1]))[0].permute(1, 2, 0)


# ---------------------------------------------------------------------------------------------- loading
def _torch_fidelity_available():
    import importlib.util
    return importlib.util.find_spec("torch_fidelity") is not None


def load_feature_network(path):
    """The FID feature network at `path`, on the CPU (`fid` moves it): a TorchScript module (`torch.jit.load`),
    or the Path itself when it holds torch-fidelity's Inception weights (a state dict, read with
    `weights_only=True`) and torch-fidelity is installed. A pickled module (`torch.save(module)`) is refused
    without being unpickled: unpickling runs whatever code the file names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID feature network {str(path)!r} does not exist (pass --inception PATH to a "
                                "TorchScript module or torch-fidelity's Inception weights)")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError:
        pass  # not TorchScript: maybe a state dict
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a pickle with code, or not a torch file at all
        raise ValueError(f"FID feature network {str(path)!r} is neither TorchScript nor a file of weights (a "
                         "pickled module is not loaded, as unpickling runs code: save it with "
                         f"torch.jit.save(torch.jit.script(module), path)): {str(err).splitlines()[0]}") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not _torch_fidelity_available():
            raise ValueError(f"{str(path)!r} is a state dict (torch-fidelity's Inception weights?); reading it "
                             "needs torch-fidelity (pip install torch-fidelity), or pass a TorchScript module")
        return path
    raise ValueError(f"FID feature network {str(path)!r} holds a {type(obj).__name__}, not a TorchScript module "
                     "or a state dict")


def load_clip(path, device="cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder, offline (`local_files_only=True`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {str(path)!r} does not exist or has no config.json (pass --clip "
                                "PATH to a folder saved by CLIPModel / CLIPProcessor.save_pretrained)")
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    return model, processor


# ---------------------------------------------------------------------------------------------- metrics
def fid(feature, real, fake, batch_size=32, device="cpu"):
    """FID between image sets `real` and `fake` ([N, 3, H, W] floats in [0, 1], N >= 2 each) with torchmetrics'
    FrechetInceptionDistance over `feature` (from `load_feature_network`), run on `device`. Computed by the
    calling process alone (no cross-process sync), as the merge step runs on the main process only."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    for name, images in (("real", real), ("fake", fake)):
        if images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
            raise ValueError(f"FID needs at least 2 {name} images [N, 3, H, W], got shape {tuple(images.shape)}")
    if isinstance(feature, torch.nn.Module):  # torchmetrics probes it with a CPU image: build there, then move
        metric = FrechetInceptionDistance(feature=feature.cpu(), normalize=True,
                                          input_img_size=tuple(real.shape[1:]), sync_on_compute=False)
    else:
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(feature),
                                          sync_on_compute=False)
    metric = metric.to(device)
    for images, is_real in ((real, True), (fake, False)):
        for batch in images.split(batch_size):
            metric.update(batch.to(device), real=is_real)
    return float(metric.compute())


def _pooled(out):
    """Projected embeddings from get_*_features (a tensor, or an output with `pooler_output` in transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_similarity(model, processor, images, prompts):
    """Cosine similarity [N] of CLIP's image embedding of each PIL image with its prompt's text embedding."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    device = next(model.parameters()).device
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    image_emb = _pooled(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
    text_emb = _pooled(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                               attention_mask=inputs["attention_mask"].to(device)))
    return torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu()


# ------------------------------------------------------------------------------------- over the records
def _open(out_dir, record):
    from PIL import Image
    return Image.open(Path(out_dir) / record["dir"] / record["image"]).convert("RGB")


def _as_tensor(pil_images):
    import numpy as np
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in pil_images]).float() / 255


def _clip_per_record(records, out_dir, clip, batch_size):
    """Sets record["clip_similarity"] on each record, `batch_size` images per CLIP call."""
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        sims = clip_similarity(*clip, [_open(out_dir, r) for r in chunk], [r["prompt"] for r in chunk])
        for record, sim in zip(chunk, sims.tolist()):
            record["clip_similarity"] = sim


def _fid_of_method(records, out_dir, feature, method, reference, device):
    """FID of `method`'s images against the `reference` images of the same (prompt, seed) pairs."""
    refs = {(r["prompt_index"], r["seed"]): r for r in records if r["method"] == reference}
    fake = [r for r in records if r["method"] == method]
    pairs = [(refs[(r["prompt_index"], r["seed"])], r) for r in fake if (r["prompt_index"], r["seed"]) in refs]
    if len(pairs) < 2 or len(pairs) != len(fake):
        return (f"skipped: FID needs a {reference} reference for each of at least 2 images; {len(pairs)} of "
                f"{len(fake)} have one (use more prompts or seeds)")
    real_images = _as_tensor([_open(out_dir, ref) for ref, _ in pairs])
    fake_images = _as_tensor([_open(out_dir, r) for _, r in pairs])
    return fid(feature, real_images, fake_images, device=device)


def evaluate_records(records, out_dir, feature=None, clip=None, reference="ddim", batch_size=32, device="cpu"):
    """Metrics over the saved images of `records` (dicts with "method", "prompt", "prompt_index", "seed",
    "dir" relative to `out_dir` and "image" relative to "dir"): adds "clip_similarity" to each record when
    `clip` = (model, processor) is given, and returns {"fid": {method: value}, "clip_similarity": {method:
    mean}}, with "skipped: ..." strings for a metric without weights, or for a method with fewer than 2
    images (FID). FID's feature network runs on `device`."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    metrics = {"fid": SKIPPED_FID, "clip_similarity": SKIPPED_CLIP}
    if clip is not None:
        _clip_per_record(records, out_dir, clip, batch_size)
        metrics["clip_similarity"] = {m: float(sum(r["clip_similarity"] for r in records if r["method"] == m)
                                               / sum(r["method"] == m for r in records)) for m in methods}
    if feature is not None:
        metrics["fid"] = {m: _fid_of_method(records, out_dir, feature, m, reference, device) for m in methods
                          if m != reference}
    return metrics


def load_metrics(inception, clip, device="cpu", main_process=True):
    """(feature network, (CLIP model, processor)) for the main process, None where a path is not given
    (printing the skip message); every process checks that given paths exist, so a typo fails before
    any work."""
    for flag, path in (("--inception", inception), ("--clip", clip)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not main_process:
        return None, None
    feature = None if inception is None else load_feature_network(inception)
    model = None if clip is None else load_clip(clip, device)
    for name, path, skipped in (("FID", inception, SKIPPED_FID), ("CLIP similarity", clip, SKIPPED_CLIP)):
        if path is None:
            print(f"[t2i] {name} {skipped}")
    return feature, model


def write_results(path, records, out_dir, setup, feature=None, clip=None, methods=None, device="cpu"):
    """Write `setup` + {"assignment": {process: [job ids]}, "jobs": records, "metrics": ...} to `path`
    atomically (metrics from `evaluate_records`), print a line per method, and return the dict."""
    metrics = evaluate_records(records, out_dir, feature, clip, device=device)
    assignment = {}
    for r in records:
        assignment.setdefault(str(r["process_index"]), []).append(r["job"])
    results = {**setup, "assignment": assignment, "jobs": records, "metrics": metrics}
    write_json(path, results)
    for method in methods or dict.fromkeys(r["method"] for r in records):
        losses = [r["final_loss"] for r in records if r["method"] == method and "final_loss" in r]
        fid_m, sim = (m if isinstance(m, str) else m.get(method) for m in (metrics["fid"], metrics["clip_similarity"]))
        loss = f"mean final loss {sum(losses) / len(losses):.4g}, " if losses else ""
        print(f"[t2i] {method}: {loss}FID {fid_m}, CLIP similarity {sim}")
    print(f"[t2i] wrote {path}")
    return results
