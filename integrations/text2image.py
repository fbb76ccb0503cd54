"""Text-to-2D (the paper's §5.2 / Figure 2 top, Table 4 setting): a coordinate-MLP image (Fourier features
of a 2D point -> MLP -> sigmoid RGB), rendered, VAE-encoded and optimised with any distiller (SDS, VSD, SDI,
MSD) through `DistillationGuidance`.

The command line (scale-out over processes, FID / CLIP, the NFE dry run) is integrations.t2i_cli.

Each run writes, in its own folder `<out>/<method>/<prompt index>_<slug>/seed<seed>/`: config.json (the
`T2IConfig`), log.json (loss / grad_norm per step), strip/ (intermediate images) and strip.png, image.png
(final), checkpoint.pt (model + optimizer + step + log, written atomically every `checkpoint_every` steps; a
run resumes from it), and termination.json when an MSD run stopped at §4.5's criterion; t2i.manifest.jsonl
holds the sha256 of each of them and .t2i.lock the lock of the process running it.
"""
import dataclasses
import io
import json
import math
import warnings

import torch

from diffsolve._io import atomic_write
from diffsolve.runs import RunFolder, RunWarning, environment

from .diffusers import check_on_unet, tiny_sd_components, unet_dtype_device
from .threestudio import METHODS, DistillationGuidance

FAMILIES = (None, "sdxl", "sd3", "flux")

PAPER_PROMPTS = (  # appendix D, "List of prompts"
    "A DSLR photo of a hamburger",
    "A blue jay standing on a large basket of rainbow macarons",
    "A DSLR photo of a squirrel dressed as a samurai weighing a katana",
    "A DSLR photo of a knight in silver armor",
    "Line drawing of a Lizard dressed up like a victorian woman, lineal color",
    "A photo of a car made out of sushi",
    "A DSLR photo of a tulip",
    "A DSLR photo of a Pumpkin head zombie, skinny, highly detailed, photorealistic",
    "A watercolor painting of a sparrow, trending on artstation",
    "Michelangelo style statue of man sitting on a chair",
)


@dataclasses.dataclass
class T2IConfig:
    """One text-to-2D run; defaults follow the paper (CFG 7.5, AdamW lr 1e-2, 400 steps, 512^2)."""
    method: str = "msd"
    guidance_scale: float = 7.5
    lr: float = 1e-2
    steps: int = 400
    resolution: int = 512
    fourier_features: int = 256
    fourier_scale: float = 10.0
    mlp_width: int = 256
    mlp_depth: int = 4
    seed: int = 0
    log_every: int = 1
    strip_every: int = 50
    checkpoint_every: int = 50
    msd_steps: int = None          # MSD chain steps; None = DistillationGuidance's / MSD's default
    guidance_interval: tuple = None  # (sigma_lo, sigma_hi): CFG only there (§4.3); None = everywhere
    msd_center: str = "iterate"    # MSD's kernel centre: "iterate", or "noised" / "inverted" (§4.3)
    kernel_interval: tuple = None  # MSD's kernel only for sigma in (lo, hi] (§3.4, §4.3)
    stop_when_converged: bool = False  # end the run when MSD's lambda < 1e-2 (§4.5), logged as "converged"
    distiller_kwargs: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("steps", "resolution", "fourier_features", "mlp_width", "mlp_depth", "log_every",
                     "strip_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.msd_center not in ("iterate", "noised", "inverted"):
            raise ValueError(f"msd_center must be 'iterate', 'noised' or 'inverted', got {self.msd_center!r}")
        for name in ("guidance_interval", "kernel_interval"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 2 and 0 <= value[0] < value[1]):
                raise ValueError(f"{name} must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {value!r}")

    def guidance_kwargs(self):
        kw = dict(self.distiller_kwargs)
        if self.guidance_interval is not None:
            kw["guidance_interval"] = tuple(self.guidance_interval)
        if self.method == "msd":
            kw["center"] = self.msd_center
            if self.msd_steps is not None:
                kw["steps"] = self.msd_steps
            if self.kernel_interval is not None:
                kw["kernel_interval"] = tuple(self.kernel_interval)
        return kw


class CoordinateImage(torch.nn.Module):
    """p in [0,1]^2 -> [sin, cos](2 pi B p) (B ~ N(0, scale^2), fixed) -> MLP -> sigmoid RGB."""

    def __init__(self, features=256, scale=10.0, width=256, depth=4):
        super().__init__()
        self.register_buffer("B", torch.randn(2, features) * scale)
        layers, d = [], 2 * features
        for _ in range(depth):
            layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
            d = width
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(d, 3))

    def forward(self, points):
        proj = 2 * math.pi * points @ self.B
        return torch.sigmoid(self.mlp(torch.cat([proj.sin(), proj.cos()], -1)))

    def render(self, h, w):
        """[1, h, w, 3] in (0, 1), pixel centres of the unit square."""
        ys = (torch.arange(h, device=self.B.device) + 0.5) / h
        xs = (torch.arange(w, device=self.B.device) + 0.5) / w
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)  # [h, w, 2]
        return self(grid.reshape(-1, 2)).reshape(1, h, w, 3)


class _PromptUtils:
    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond


def tiny_components():
    """diffusers' tiny random SD components (integrations.diffusers.tiny_sd_components)."""
    return tiny_sd_components()


def tiny_prompt_embeds(components, index, length=8):
    """Random (cond, uncond) embeddings [1, length, cross_attention_dim], seeded by the prompt's index."""
    dim = components.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1000 + index)
    return torch.randn(1, length, dim, generator=g), torch.randn(1, length, dim, generator=torch.Generator().manual_seed(0))


def vae_factor(components):
    return 2 ** (len(components.vae.config.block_out_channels) - 1)


def check_resolution(components, resolution):
    f = vae_factor(components)
    if not isinstance(resolution, int) or resolution < 1 or resolution % f:
        raise ValueError(f"resolution {resolution!r} is not a positive multiple of the VAE's downsampling "
                         f"factor {f}")


def check_prompts(prompts):
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    return prompts


def _png_bytes(img):
    from PIL import Image
    arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _save_png(path, img):
    """img [h, w, 3] in [0, 1] -> PNG, atomically."""
    data = _png_bytes(img)
    atomic_write(path, lambda f: f.write(data))


def _strip_bytes(out_dir):
    from PIL import Image
    frames = sorted((out_dir / "strip").glob("step_*.png"))
    if not frames:
        return None
    ims = [Image.open(p).convert("RGB") for p in frames]
    w, h = ims[0].size
    strip = Image.new("RGB", (w * len(ims), h))
    for i, im in enumerate(ims):
        strip.paste(im, (i * w, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


def _checkpoint_bytes(model, opt, step, log):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log}, buf)
    return buf.getvalue()


def _load_checkpoint(folder, device):
    """The checkpoint's state if its bytes match the checksum recorded when written and it loads with
    weights_only=True (nothing in it executes); else None, with a warning naming the file."""
    data = folder.read_bytes("checkpoint.pt")
    if data is None:
        return None
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "step", "log"} <= set(state):
            raise ValueError("not a text-to-2D checkpoint")
        return state
    except Exception as err:  # noqa: BLE001 - refused and recomputed, never fatal
        warnings.warn(f"{folder.path('checkpoint.pt')} does not load as weights ({err}); starting over", RunWarning)
        return None


def _denoising_network(components):
    """The components' UNet (SD 1.x / 2.x, SDXL) or transformer (SD3, Flux)."""
    for name in ("unet", "transformer"):
        net = getattr(components, name, None)
        if net is not None:
            return net
    raise ValueError(f"components {type(components).__name__} have neither a unet nor a transformer")


def run_text2image(components, prompt_embeds, cfg, out_dir, progress=True, stop_after=None, *, family=None):
    """Optimise a `CoordinateImage` for one prompt with `cfg.method`; returns the model. `prompt_embeds` is
    (cond, uncond), on the UNet's device with its dtype (a ValueError naming both otherwise).

    `family`: None for Stable Diffusion 1.x / 2.x components; "sdxl", "sd3" or "flux" for those families'
    components (integrations.sdxl / sd3 / flux), with `prompt_embeds` = (cond, uncond) dicts of the family's
    conditions (see `integrations.modern_guidance.family_guidance`), each tensor on the network's device.

    `out_dir` is a RunFolder (diffsolve.runs) held for the call: a second writer is refused (FolderBusy), and
    so is a config other than the one in `out_dir/config.json` except `steps` (RunConflict, a ValueError).
    Resumes from `out_dir/checkpoint.pt` when it matches the checksum recorded when it was written (loaded
    with weights_only=True; else a warning and a fresh start). `stop_after` ends the run early after that
    many total steps (simulates an interruption)."""
    cfg.validate()
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    check_resolution(components, cfg.resolution)
    cond, uncond = prompt_embeds
    net = _denoising_network(components)
    sides = (("cond", cond), ("uncond", uncond))
    for side, emb in sides:
        for key, t in (emb.items() if family is not None else [("", emb)]):
            check_on_unet(t, f"prompt embeddings ({side}{' ' + key if key else ''})", net, dtype=family is None)
    dtype, device = unet_dtype_device(net)
    config = {**json.loads(json.dumps(dataclasses.asdict(cfg))), **environment(device, dtype)}
    if family is not None:
        config["family"] = family
    with RunFolder(out_dir, "t2i", config, ignore=("steps",), config_file="config.json") as folder:
        return _run(folder, components, cond, uncond, cfg, device, progress, stop_after, family)


def _guidance(components, cond, uncond, cfg, family):
    """(guidance, prompt_utils) of one run."""
    kwargs = dict(method=cfg.method, guidance_scale=cfg.guidance_scale, trainer_max_steps=cfg.steps, seed=cfg.seed,
                  **cfg.guidance_kwargs())
    if family is None:
        return DistillationGuidance(components, **kwargs), _PromptUtils(cond, uncond)
    from .modern_guidance import family_guidance
    return family_guidance(family, components, cond, uncond, **kwargs)


def _run(folder, components, cond, uncond, cfg, device, progress, stop_after, family=None):
    def build():
        torch.manual_seed(cfg.seed)
        model = CoordinateImage(cfg.fourier_features, cfg.fourier_scale, cfg.mlp_width, cfg.mlp_depth).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        guidance, utils = _guidance(components, cond, uncond, cfg, family)
        return model, opt, guidance, utils

    model, opt, guidance, prompt_utils = build()
    start, log = 0, []
    state = _load_checkpoint(folder, device)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, log = int(state["step"]), list(state["log"])
            if progress:
                print(f"[t2i] resuming {folder.root} from step {start}")
        except (RuntimeError, TypeError, ValueError, KeyError) as err:
            warnings.warn(f"{folder.path('checkpoint.pt')} does not fit this run ({err}); starting over", RunWarning)
            (model, opt, guidance, prompt_utils), start, log = build(), 0, []
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    res = cfg.resolution
    converged_at = None
    for step in range(start, end):
        guidance.update_step(0, step)
        if cfg.stop_when_converged and guidance.converged:
            converged_at = step
            folder.write_json("termination.json", {"converged_at_step": step,
                                                   "terminate_below": guidance.terminate_below,
                                                   "bandwidth": guidance.distiller.bandwidth})
            folder.write_bytes("checkpoint.pt", _checkpoint_bytes(model, opt, step, log))
            break
        rgb = model.render(res, res)
        out = guidance(rgb, prompt_utils, None, None, None)
        opt.zero_grad(set_to_none=True)
        out["loss_sds"].backward()
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.append({"step": done, "loss": float(out["loss_sds"].detach()),
                        "grad_norm": float(out["grad_norm"])})
            if progress:
                print(f"[t2i] {cfg.method} step {done}/{cfg.steps} loss {log[-1]['loss']:.4g} "
                      f"grad_norm {log[-1]['grad_norm']:.4g}")
        if done % cfg.strip_every == 0 or done == cfg.steps:
            with torch.no_grad():
                folder.write_bytes(f"strip/step_{done:06d}.png", _png_bytes(model.render(res, res)[0]))
        if done % cfg.checkpoint_every == 0 or done == end:
            folder.write_bytes("checkpoint.pt", _checkpoint_bytes(model, opt, done, log))
            folder.write_json("log.json", log)
    if end == cfg.steps or converged_at is not None:
        with torch.no_grad():
            folder.write_bytes("image.png", _png_bytes(model.render(res, res)[0]))
        strip = _strip_bytes(folder.root)
        if strip is not None:
            folder.write_bytes("strip.png", strip)
        folder.write_json("log.json", log)
    return model


def nfe_per_step(components, cfg, methods=METHODS, latent_size=8):
    """{method: UNet evaluations per optimisation step} from one guidance call on a tiny random latent
    (CFG counts 2). VSD's variational (LoRA) update, when one is configured, is not counted."""
    cond, uncond = tiny_prompt_embeds(components, 0)
    result = {}
    for method in methods:
        mcfg = dataclasses.replace(cfg, method=method)
        guidance = DistillationGuidance(components, method=method, guidance_scale=mcfg.guidance_scale,
                                        trainer_max_steps=mcfg.steps, seed=mcfg.seed, **mcfg.guidance_kwargs())
        ch = components.unet.config.in_channels
        lat = torch.randn(1, latent_size, latent_size, ch, generator=torch.Generator().manual_seed(0))
        guidance.update_step(0, 0)
        guidance(lat.to(components.unet.device), _PromptUtils(cond, uncond), rgb_as_latents=True)
        result[method] = float(guidance.distiller.last_nfe)
    return result
