"""Text-to-2D (the paper's §5.2 / Figure 2 top, Table 4 setting): a coordinate-MLP image (Fourier features
of a 2D point -> MLP -> sigmoid RGB), rendered, VAE-encoded and optimised with any distiller (SDS, VSD, SDI,
MSD) through `DistillationGuidance`.

    python benchmarks/text2image.py --model /path/to/sd-folder --methods msd sds --seeds 0 1
    accelerate launch --num_processes 4 benchmarks/text2image.py --model ... --inception ... --clip ...
    python benchmarks/text2image.py --dry-run --tiny     # NFE per optimisation step, offline

Each run writes, in its own folder `<out>/<method>/<prompt index>_<slug>/seed<seed>/`: config.json (the
`T2IConfig`), log.json (loss / grad_norm per step), strip/ (intermediate images) and strip.png, image.png
(final), checkpoint.pt (model + optimizer + step + log, written atomically every `checkpoint_every` steps; a
run resumes from it), prompt.txt and record.json. The prompt x method x seed jobs (plus, with `--inception`,
a DDIM reference sample per prompt and seed under `<out>/ddim/`) are shared out over the processes of an
`accelerate launch` / `torchrun` (integrations.scaleout); the main process then merges every job's record
and the metrics into `<out>/results.json`: FID of each method against the DDIM samples (`--inception`) and
CLIP similarity (`--clip`), each recorded as skipped, with a message, when its weights are not given
(integrations.evaluate).
"""
import argparse
import dataclasses
import functools
import io
import json
import math
import sys
from pathlib import Path

import torch

from diffsolve._io import atomic_write, write_json

from . import evaluate, scaleout
from .diffusers import (check_on_unet, encode_prompt, load_stable_diffusion, sigmas_from_scheduler,
                       tiny_sd_components)
from .threestudio import METHODS, DistillationGuidance

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
NFE_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "text2image_nfe.json"


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

    def guidance_kwargs(self):
        kw = dict(self.distiller_kwargs)
        if self.method == "msd" and self.msd_steps is not None:
            kw["steps"] = self.msd_steps
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


def _save_strip(out_dir):
    from PIL import Image
    frames = sorted((out_dir / "strip").glob("step_*.png"))
    if not frames:
        return
    ims = [Image.open(p).convert("RGB") for p in frames]
    w, h = ims[0].size
    strip = Image.new("RGB", (w * len(ims), h))
    for i, im in enumerate(ims):
        strip.paste(im, (i * w, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    atomic_write(out_dir / "strip.png", lambda f: f.write(buf.getvalue()))


def _save_checkpoint(path, model, opt, step, log):
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log}
    atomic_write(path, lambda f: torch.save(state, f))


def run_text2image(components, prompt_embeds, cfg, out_dir, progress=True, stop_after=None):
    """Optimise a `CoordinateImage` for one prompt with `cfg.method`; returns the model. `prompt_embeds` is
    (cond, uncond), on the UNet's device with its dtype (a ValueError naming both otherwise). Resumes from
    `out_dir/checkpoint.pt` when present (its config must match `cfg` except `steps`). `stop_after` ends the
    run early after that many total steps (simulates an interruption)."""
    cfg.validate()
    check_resolution(components, cfg.resolution)
    cond, uncond = prompt_embeds
    for name, emb in (("prompt embeddings (cond)", cond), ("prompt embeddings (uncond)", uncond)):
        check_on_unet(emb, name, components.unet)
    out_dir = Path(out_dir)
    ckpt_path, cfg_path = out_dir / "checkpoint.pt", out_dir / "config.json"
    if ckpt_path.exists() and cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        mine = dataclasses.asdict(cfg)
        diff = [k for k in mine if k != "steps" and saved.get(k) != mine[k]]
        if diff:
            raise ValueError(f"{out_dir} holds a checkpoint of a different config (differs in {diff}); "
                             "use another --out or delete the checkpoint")
    write_json(cfg_path, dataclasses.asdict(cfg))

    device = components.unet.device
    torch.manual_seed(cfg.seed)
    model = CoordinateImage(cfg.fourier_features, cfg.fourier_scale, cfg.mlp_width, cfg.mlp_depth).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    guidance = DistillationGuidance(components, method=cfg.method, guidance_scale=cfg.guidance_scale,
                                    trainer_max_steps=cfg.steps, seed=cfg.seed, **cfg.guidance_kwargs())
    prompt_utils = _PromptUtils(cond, uncond)
    start, log = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        if progress:
            print(f"[t2i] resuming {out_dir} from step {start}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    res = cfg.resolution
    for step in range(start, end):
        guidance.update_step(0, step)
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
                _save_png(out_dir / "strip" / f"step_{done:06d}.png", model.render(res, res)[0])
        if done % cfg.checkpoint_every == 0 or done == end:
            _save_checkpoint(ckpt_path, model, opt, done, log)
            write_json(out_dir / "log.json", log)
    if end == cfg.steps:
        with torch.no_grad():
            _save_png(out_dir / "image.png", model.render(res, res)[0])
        _save_strip(out_dir)
        write_json(out_dir / "log.json", log)
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


def _embedder(components, prompts, tiny, device, dtype):
    """prompt index -> (cond, uncond) on the UNet's device and dtype, computed once per prompt."""
    cache = {}

    def embeds(i):
        if i not in cache:
            pair = tiny_prompt_embeds(components, i) if tiny else (encode_prompt(components, [prompts[i]]),
                                                                   encode_prompt(components, [""]))
            cache[i] = tuple(e.to(device, dtype) for e in pair)
        return cache[i]
    return embeds


def run_job(job, run_dir, *, components, prompts, embeds, base, reference_kw, progress=True):
    """One scale-out job: a distillation run, or a DDIM reference sample; returns its record."""
    i = job.prompt_index
    atomic_write(run_dir / "prompt.txt", lambda f: f.write((prompts[i] + "\n").encode()))
    record = {"method": job.method, "prompt_index": i, "prompt": prompts[i], "seed": job.seed, "image": "image.png"}
    if job.method == scaleout.REFERENCE:
        img = evaluate.ddim_reference(components, embeds(i), job.seed, base.resolution, **reference_kw)
        _save_png(run_dir / "image.png", img)
        return {**record, **{f"ddim_{k}": v for k, v in reference_kw.items()}}
    cfg = dataclasses.replace(base, method=job.method, seed=job.seed)
    run_text2image(components, embeds(i), cfg, run_dir, progress=progress)
    last = json.loads((run_dir / "log.json").read_text())[-1]
    return {**record, "steps": last["step"], "final_loss": last["loss"], "final_grad_norm": last["grad_norm"]}


def _parser():
    p = argparse.ArgumentParser(prog="text2image", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local diffusers Stable Diffusion folder (or a cached Hub id)")
    p.add_argument("--tiny", action="store_true", help="tiny random components and random prompt embeddings")
    p.add_argument("--prompts", nargs="*", default=list(PAPER_PROMPTS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=T2IConfig.steps)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (32 with --tiny)")
    p.add_argument("--msd-steps", type=int, default=None)
    p.add_argument("--out", default="runs/text2image")
    p.add_argument("--dry-run", action="store_true", help="report NFE per optimisation step; no optimisation")
    p.add_argument("--nfe-out", default=str(NFE_JSON))
    p.add_argument("--device", default=None, help="default: this process's accelerate device (cuda:<local "
                   "rank> when launched on GPUs, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--inception", help="FID feature network (TorchScript / torch.save'd module, or "
                   "torch-fidelity's Inception weights); also samples the DDIM references")
    p.add_argument("--clip", help="local CLIP folder (CLIPModel + CLIPProcessor) for CLIP similarity")
    p.add_argument("--ddim-steps", type=int, default=32, help="DDIM steps of the FID reference samples (the paper: 32)")
    p.add_argument("--ddim-guidance-scale", type=float, default=7.5,
                   help="CFG of the reference samples, diffusers' convention (a stock pipeline's guidance_scale)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    return p


def _dry_run(args, components, base):
    nfe = nfe_per_step(components, base, args.methods)
    sds = nfe.get("sds")
    rows = [{"method": m, "nfe_per_step": n, "relative_to_sds": (n / sds if sds else None)} for m, n in nfe.items()]
    print(f"{'method':<8}{'UNet evals / step':>20}{'x SDS':>10}")
    for r in rows:
        rel = "" if r["relative_to_sds"] is None else f"{r['relative_to_sds']:.1f}"
        print(f"{r['method']:<8}{r['nfe_per_step']:>20g}{rel:>10}")
    write_json(args.nfe_out, {
        "unit": "UNet evaluations per optimisation step (CFG counted as 2), from one guidance call",
        "components": "tiny random" if args.tiny else str(args.model),
        "msd_steps": base.msd_steps if base.msd_steps is not None else "DistillationGuidance default",
        "guidance_scale": base.guidance_scale, "methods": rows})
    print(f"wrote {args.nfe_out}")
    return rows


def merge_results(records, out, args, base, prompts, num_processes, feature, clip, device="cpu"):
    """results.json (evaluate.write_results) with this run's setup."""
    reference = None if args.inception is None else {
        "sampler": "diffsolve sample_ddim + vae_decode", "steps": args.ddim_steps,
        "guidance_scale": args.ddim_guidance_scale, "cfg": "diffusers convention: uncond + w (cond - uncond)"}
    setup = {"config": dataclasses.asdict(base), "model": "tiny random" if args.tiny else str(args.model),
             "dtype": args.dtype, "prompts": prompts, "methods": args.methods, "seeds": args.seeds,
             "reference": reference, "fid_feature_network": args.inception, "clip_model": args.clip,
             "num_processes": num_processes}
    return evaluate.write_results(out / "results.json", records, out, setup, feature, clip, args.methods, device)


def _components(args, dtype, device):
    if not args.tiny:
        return load_stable_diffusion(args.model, dtype, device)
    components = tiny_components()
    for model in (components.unet, components.vae):
        model.to(device)
        if dtype != torch.float32:  # diffusers warns on any .to(dtype)
            model.to(dtype)
    return components


def _base_config(args, components):
    resolution = args.resolution if args.resolution is not None else (32 if args.tiny else T2IConfig.resolution)
    check_resolution(components, resolution)
    base = T2IConfig(steps=args.steps, resolution=resolution, msd_steps=args.msd_steps)
    base.validate()
    if args.inception is not None:
        sigmas_from_scheduler(components.scheduler, args.ddim_steps)  # a bad --ddim-steps fails now, not at the end
    return base


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    prompts = check_prompts(args.prompts)
    if not args.tiny and not args.model:
        p.error("give --model PATH (a local diffusers Stable Diffusion folder) or --tiny")
    if args.ddim_steps < 1:
        p.error(f"--ddim-steps must be >= 1, got {args.ddim_steps}")
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        components = _components(args, dtype, args.device or "cpu")
        return _dry_run(args, components, _base_config(args, components))

    jobs = scaleout.build_jobs(len(prompts), args.methods, args.seeds, reference=args.inception is not None)
    state, device = scaleout.process_state(args.device)
    feature, clip = evaluate.load_metrics(args.inception, args.clip, device, state.is_main_process)
    components = _components(args, dtype, device)
    base = _base_config(args, components)
    out = Path(args.out)
    run = functools.partial(run_job, components=components, prompts=prompts, base=base, progress=not args.quiet,
                            embeds=_embedder(components, prompts, args.tiny, device, dtype),
                            reference_kw={"steps": args.ddim_steps, "guidance_scale": args.ddim_guidance_scale})
    records = scaleout.run_sharded(jobs, scaleout.job_folders(prompts), run, out, state)
    results = None
    if records is not None:
        results = merge_results(records, out, args, base, prompts, state.num_processes, feature, clip, device)
    scaleout.finish(state)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
