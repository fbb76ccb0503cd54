"""The text-to-2D command line (`diffsolve t2i`, `benchmarks/text2image.py`,
`python -m diffsolve.integrations.t2i_cli`): jobs over processes, metrics, the NFE dry run.

    python benchmarks/text2image.py --model /path/to/sd-folder --methods msd sds --seeds 0 1
    accelerate launch --num_processes 4 benchmarks/text2image.py --model ... --inception ... --clip ...
    python benchmarks/text2image.py --dry-run --tiny     # NFE per optimisation step, offline
    diffsolve t2i --tiny --prompts "a cat" --methods sds  # -> outputs/t2i/ (about 30 s on one CPU thread)

The prompt x method x seed jobs (plus, with `--inception`, a DDIM reference sample per prompt and seed under
`<out>/ddim/`) are shared out over the processes of an `accelerate launch` / `torchrun`
(integrations.scaleout); each job is a `run_text2image` run in its own folder; the main process then merges
every job's record and the metrics into `<out>/results.json`: FID of each method against the DDIM samples
(`--inception`) and CLIP similarity (`--clip`), each recorded as skipped, with a message, when its weights are
not given (integrations.evaluate). Every job folder is a run folder (diffsolve.runs.RunFolder: a lock, its
config, checksums), and `<out>/t2i.run.json` holds the options of the whole output folder: a re-run with other
options (`--steps` aside) is refused before any work. Bad values are usage errors (exit status 2).
"""
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import torch

from diffsolve._io import atomic_write, write_json
from diffsolve.runs import ArgumentParser, RunError, at_least, check_config, check_writable, environment

from . import evaluate, scaleout
from .diffusers import encode_prompt, load_stable_diffusion, sigmas_from_scheduler
from .text2image import (METHODS, PAPER_PROMPTS, T2IConfig, _save_png, check_prompts, check_resolution, nfe_per_step,
                         run_text2image, tiny_components, tiny_prompt_embeds)

# wall times measured with OMP_NUM_THREADS=1 on a busy 2-core x86 server (its CPU time was about 2/3 of it)
TINY_TIME = ("at the default 400 steps about 30 s per SDS or VSD job and 2-3 minutes per SDI or MSD job on one "
             "CPU thread; --steps 2 takes seconds")


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
    stop = run_dir / "termination.json"
    converged = json.loads(stop.read_text())["converged_at_step"] if stop.exists() else None
    return {**record, "steps": last["step"], "final_loss": last["loss"], "final_grad_norm": last["grad_norm"],
            "converged_at_step": converged}


def _parser():
    p = ArgumentParser(prog="diffsolve t2i", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local diffusers Stable Diffusion folder (or a cached Hub id); needed "
                   "unless --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny random components and random prompt embeddings, "
                   f"offline: {TINY_TIME}")
    p.add_argument("--prompts", nargs="*", default=list(PAPER_PROMPTS), help="the prompts (default: the "
                   "paper's 10)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="the distillers to run")
    p.add_argument("--seeds", nargs="+", type=at_least(0), default=[0], help="one run per seed (>= 0)")
    p.add_argument("--steps", type=at_least(1), default=T2IConfig.steps, help="optimisation steps per run")
    p.add_argument("--resolution", type=at_least(1), default=None, help="image side in pixels, a multiple of "
                   "the VAE's downsampling factor (default: 512, 32 with --tiny)")
    p.add_argument("--msd-steps", type=at_least(1), default=None, help="MSD's chain steps (default: "
                   "DistillationGuidance's)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="CFG only for sigma in (LO, HI] (the paper's §4.3 heuristic; default: everywhere)")
    p.add_argument("--msd-center", default="iterate", choices=("iterate", "noised", "inverted"),
                   help="MSD's kernel centre; 'inverted' is the paper's §4.3 heuristic")
    p.add_argument("--kernel-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="MSD's kernel only for sigma in (LO, HI] (default: every sigma)")
    p.add_argument("--stop-when-converged", action="store_true",
                   help="end an MSD run when lambda < 1e-2 (the paper's §4.5 criterion)")
    p.add_argument("--out", default="outputs/t2i", help="results folder, relative to the current folder")
    p.add_argument("--dry-run", action="store_true", help="report NFE per optimisation step; no optimisation")
    p.add_argument("--nfe-out", default=None, help="the JSON --dry-run writes (default: <out>/text2image_nfe.json)")
    p.add_argument("--device", default=None, help="a device of this machine, e.g. cpu or cuda:0 (default: this "
                   "process's accelerate device: cuda:<local rank> when launched on GPUs, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the UNet and VAE")
    p.add_argument("--inception", help="FID feature network: a TorchScript file (torch.jit.save), or "
                   "torch-fidelity's Inception weights; also samples the DDIM references (default: no FID)")
    p.add_argument("--clip", help="local CLIP folder (CLIPModel + CLIPProcessor) for CLIP similarity "
                   "(default: none)")
    p.add_argument("--ddim-steps", type=at_least(1), default=32, help="DDIM steps of the FID reference samples "
                   "(the paper: 32)")
    p.add_argument("--ddim-guidance-scale", type=float, default=7.5,
                   help="CFG of the reference samples, diffusers' convention (a stock pipeline's guidance_scale)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    return p


def check_device(device):
    """`device` as a torch.device if this machine has it (parsed and checked as the diffusers loader does, then
    allocated on); else a ValueError naming it."""
    from .diffusers import _check_dtype_device
    dev = _check_dtype_device(torch.float32, device)
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {dev} does not exist on this machine ({str(err).splitlines()[0]})") from None
    return dev


def _dry_run(args, components, base, nfe_out):
    nfe = nfe_per_step(components, base, args.methods)
    sds = nfe.get("sds")
    rows = [{"method": m, "nfe_per_step": n, "relative_to_sds": (n / sds if sds else None)} for m, n in nfe.items()]
    print(f"{'method':<8}{'UNet evals / step':>20}{'x SDS':>10}")
    for r in rows:
        rel = "" if r["relative_to_sds"] is None else f"{r['relative_to_sds']:.1f}"
        print(f"{r['method']:<8}{r['nfe_per_step']:>20g}{rel:>10}")
    write_json(nfe_out, {
        "unit": "UNet evaluations per optimisation step (CFG counted as 2), from one guidance call",
        "components": "tiny random" if args.tiny else str(args.model),
        "msd_steps": base.msd_steps if base.msd_steps is not None else "DistillationGuidance default",
        "guidance_scale": base.guidance_scale, "methods": rows})
    print(f"wrote {nfe_out}")
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


def _config(args, resolution):
    return T2IConfig(steps=args.steps, resolution=resolution, msd_steps=args.msd_steps,
                     guidance_interval=args.guidance_interval, msd_center=args.msd_center,
                     kernel_interval=args.kernel_interval, stop_when_converged=args.stop_when_converged)


def _base_config(args, components):
    resolution = args.resolution if args.resolution is not None else (32 if args.tiny else T2IConfig.resolution)
    check_resolution(components, resolution)
    base = _config(args, resolution)
    base.validate()
    if args.inception is not None:
        sigmas_from_scheduler(components.scheduler, args.ddim_steps)  # a bad --ddim-steps fails now, not at the end
    return base


def _check_values(args):
    """Every value that can be checked without loading anything; a ValueError names the bad one."""
    prompts = check_prompts(args.prompts)
    if not args.tiny and not args.model:
        raise ValueError("give --model PATH (a local diffusers Stable Diffusion folder) or --tiny")
    if not math.isfinite(args.ddim_guidance_scale):
        raise ValueError(f"--ddim-guidance-scale must be finite, got {args.ddim_guidance_scale}")
    _config(args, 8).validate()
    for flag, path in (("--inception", args.inception), ("--clip", args.clip)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if args.device is not None:
        check_device(args.device)
    return prompts


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    nfe_out = Path(args.nfe_out) if args.nfe_out else out / "text2image_nfe.json"
    try:
        prompts = _check_values(args)
        if args.dry_run:
            check_writable(nfe_out.parent, "the folder of --nfe-out")
        else:
            check_writable(out, "--out")
        if args.dry_run:
            components = _components(args, dtype, args.device or "cpu")
            base = _base_config(args, components)
        else:
            jobs = scaleout.build_jobs(len(prompts), args.methods, args.seeds, reference=args.inception is not None)
            state, device = scaleout.process_state(args.device)
            components = _components(args, dtype, device)
            base = _base_config(args, components)
            feature, clip = evaluate.load_metrics(args.inception, args.clip, device, state.is_main_process)
            setup = {**json.loads(json.dumps(dataclasses.asdict(base))), "model": "tiny random" if args.tiny
                     else str(args.model), **environment(device, dtype)}
            check_config(out / "t2i.run.json", setup, ignore=("steps",), write=state.is_main_process, folder=out)
    except (ValueError, OSError, RunError) as err:  # bad values, missing files, another run's folder
        p.error(str(err))
    if args.dry_run:
        return _dry_run(args, components, base, nfe_out)
    run = functools.partial(run_job, components=components, prompts=prompts, base=base, progress=not args.quiet,
                            embeds=_embedder(components, prompts, args.tiny, device, dtype),
                            reference_kw={"steps": args.ddim_steps, "guidance_scale": args.ddim_guidance_scale})
    try:
        records = scaleout.run_sharded(jobs, scaleout.job_folders(prompts), run, out, state)
    except RunError as err:  # a job folder held by another live run
        p.exit(1, f"{p.prog}: error: {err}\n")
    results = None
    if records is not None:
        results = merge_results(records, out, args, base, prompts, state.num_processes, feature, clip, device)
    scaleout.finish(state)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
