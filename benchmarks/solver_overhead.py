"""Solver overhead: each registered sampler with a k-diffusion twin, against k-diffusion's and the bare model calls.

The samplers are the names in diffsolve.SOLVERS for which k_diffusion.sampling.sample_<name> exists (found at run
time, so a sampler registered later is measured without editing this file). For each denoiser and sampler three
variants run on the same model, x and sigmas (32 Karras steps; dpm_fast: 32 model evaluations on its own grid;
dpm_adaptive: its default tolerances over [sigma_min, sigma_max]), each sampler with its defaults:
  - diffsolve:   diffsolve.sample_<name>(..., disable=True)
  - k-diffusion: k_diffusion.sampling.sample_<name>(..., disable=True)
  - raw:         a loop that only calls the denoiser, once per recorded evaluation of a diffsolve run,
                 on exactly the inputs that run gave it (the floor any solver pays).
Samplers that take a noise_sampler get the same explicit one on both sides (a fresh seeded torch.Generator per
run, standard normal like x), so both draw identical noise and their outputs are checked to agree.
Denoisers: a small MLP on 2-D data (3 hidden layers of 64, Fourier sigma embedding, EDM preconditioning)
at batch 16 and 10**4 (every sampler), and diffusers' tiny Stable Diffusion UNet wrapped in diffsolve.VPDenoiser
on 16x16 latents, batch 2 (euler and heun). Single-threaded; warm-up runs first, then repetitions in rotating
order (ABC, BCA, CAB, ...) so slow drift hits every variant alike; medians are reported.

    .venv/bin/python benchmarks/solver_overhead.py              # full run, ~8 minutes on an idle machine
    .venv/bin/python benchmarks/solver_overhead.py --quick      # a few repetitions, for a smoke test
    .venv/bin/python benchmarks/solver_overhead.py --only lms --out /tmp/lms.json   # a subset
    .venv/bin/python benchmarks/solver_overhead.py --markdown   # the README table from the committed JSON
"""
import argparse
import gc
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffsolve as ds  # noqa: E402
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402
from diffsolve.integrations import kdiffusion as K  # noqa: E402

STEPS = 32
UNET_SOLVERS = ("euler", "heun")
VARIANTS = ("diffsolve", "k-diffusion", "raw")
NOISE_SEED = 1234
CASE_LABELS = {"mlp_2d_batch16": "MLP, batch 16", "mlp_2d_batch10000": "MLP, batch 10^4",
               "sd_tiny_unet_16x16_batch2": "tiny SD UNet, batch 2"}


def twins():
    """Registered diffsolve samplers with a k-diffusion twin of the same name, in registry order."""
    sampling, _ = K.load()
    return [name for name in ds.SOLVERS if hasattr(sampling, f"sample_{name}") and hasattr(ds, f"sample_{name}")]


def seeded_noise_sampler(x, seed=NOISE_SEED):
    """A fresh explicit noise sampler: standard normal like x from one seeded torch.Generator."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)


def positional(name, case):
    """The arguments after (model, x) of sample_<name>: the grid, or (sigma_min, sigma_max[, n]) for the DPM-Solver
    samplers that build their own."""
    sigmas = case["sigmas"]
    lo, hi = float(sigmas[-2]), float(sigmas[0])
    return {"dpm_fast": (lo, hi, STEPS), "dpm_adaptive": (lo, hi)}.get(name, (sigmas,))


def takes_noise_sampler(name):
    sampling, _ = K.load()
    return "noise_sampler" in inspect.signature(getattr(sampling, f"sample_{name}")).parameters


class MLPDenoiser(torch.nn.Module):
    """D(x, sigma) for 2-D data: EDM preconditioning around an MLP with 3 hidden layers of 64."""

    def __init__(self, dim=2, hidden=64, n_freq=8, sigma_data=0.5):
        super().__init__()
        self.register_buffer("freqs", torch.randn(n_freq) * 4)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 2 * n_freq, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim))
        self.sigma_data = sigma_data

    def forward(self, x, sigma):
        s = sigma[:, None]
        sd2 = self.sigma_data ** 2
        c_skip, c_out = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        emb = (s.log() / 4) * self.freqs
        out = self.net(torch.cat([x / (s ** 2 + sd2).sqrt(), emb.sin(), emb.cos()], -1))
        return c_skip * x + c_out * out


def mlp_case(batch):
    torch.manual_seed(0)
    model = MLPDenoiser().eval()
    sampling, _ = K.load()
    sigmas = sampling.get_sigmas_karras(STEPS, 0.002, 80.0)  # float32, ends at 0
    x = torch.randn(batch, 2) * sigmas[0]
    return dict(name=f"mlp_2d_batch{batch}", model=model, x=x, sigmas=sigmas, extra_args={},
                description=f"MLP denoiser, 2-D data, 3 hidden layers of 64, Fourier sigma embedding, batch {batch}")


def unet_case():
    from diffsolve.integrations.diffusers import tiny_unet

    unet = tiny_unet()

    def eps(z, t, encoder_hidden_states):
        return unet(z, t, encoder_hidden_states=encoder_hidden_states).sample

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    model = ds.VPDenoiser(eps, torch.cumprod(1 - betas, 0))
    sampling, _ = K.load()
    sigmas = sampling.get_sigmas_karras(STEPS, model.sigma_min, model.sigma_max)
    x = torch.randn(2, 4, 16, 16) * sigmas[0]
    emb = torch.randn(2, 7, 8)
    return dict(name="sd_tiny_unet_16x16_batch2", model=model, x=x, sigmas=sigmas,
                extra_args={"encoder_hidden_states": emb},
                description="diffusers tiny SD UNet2DConditionModel (block_out_channels (4, 8)) in "
                            "diffsolve.VPDenoiser (SD scaled_linear alphas_cumprod), 16x16x4 latents, batch 2")


class Counted:
    """The model, counting its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)


def caller(fn, name, case):
    """run(model) -> fn(model, x, <grid>, extra_args, disable=True[, noise_sampler=fresh seeded sampler])."""
    x, extra, args = case["x"], case["extra_args"], positional(name, case)
    if takes_noise_sampler(name):
        return lambda model: fn(model, x, *args, extra, disable=True, noise_sampler=seeded_noise_sampler(x))
    return lambda model: fn(model, x, *args, extra, disable=True)


def record_calls(case, name):
    """The (x, sigma, kwargs) of every denoiser evaluation one diffsolve run makes."""
    calls = []

    def recorder(x, sigma, **kw):
        calls.append((x.clone(), sigma.clone(), kw))
        return case["model"](x, sigma, **kw)
    caller(getattr(ds, f"sample_{name}"), name, case)(recorder)
    return calls


def make_variants(case, name):
    sampling, _ = K.load()
    model = case["model"]
    ours = caller(getattr(ds, f"sample_{name}"), name, case)
    theirs = caller(getattr(sampling, f"sample_{name}"), name, case)
    calls = record_calls(case, name)

    def run_diffsolve():
        return ours(model)

    def run_kdiffusion():
        return theirs(model)

    @torch.no_grad()
    def run_raw():
        out = None
        for xi, si, kw in calls:
            out = model(xi, si, **kw)
        return out
    return {"diffsolve": run_diffsolve, "k-diffusion": run_kdiffusion, "raw": run_raw}, len(calls)


def time_variants(fns, warmup, reps, budget_s, min_rounds=10):
    """Warm up, then time `reps` rounds (stopping early past `budget_s` once `min_rounds` are done), each
    round running every variant once, the order rotated by one per round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for r in range(reps):
            for k in range(len(names)):
                n = names[(r + k) % len(names)]
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
            if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
    finally:
        gc.enable()
    return times


def summarise(times, nfe, steps):
    ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    q = {n: [v * 1e3 for v in statistics.quantiles(t, n=4)] if len(t) >= 2 else [t[0] * 1e3] * 3
         for n, t in times.items()}
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return {
        "nfe": nfe,
        "repetitions": len(times["raw"]),
        "median_ms": {n: round(v, 4) for n, v in ms.items()},
        "iqr_ms": {n: [round(q[n][0], 4), round(q[n][2], 4)] for n in times},
        "ratio_diffsolve_over_kdiffusion": round(ms["diffsolve"] / ms["k-diffusion"], 4),
        "ratio_diffsolve_over_raw": round(ms["diffsolve"] / ms["raw"], 4),
        "ratio_kdiffusion_over_raw": round(ms["k-diffusion"] / ms["raw"], 4),
        "paired_median_ratio_diffsolve_over_kdiffusion": round(paired("diffsolve", "k-diffusion"), 4),
        "overhead_per_step_us": None if steps is None else {
            "diffsolve": round((ms["diffsolve"] - ms["raw"]) * 1e3 / steps, 2),
            "k-diffusion": round((ms["k-diffusion"] - ms["raw"]) * 1e3 / steps, 2)},
        "overhead_per_model_call_us": {
            "diffsolve": round((ms["diffsolve"] - ms["raw"]) * 1e3 / nfe, 2),
            "k-diffusion": round((ms["k-diffusion"] - ms["raw"]) * 1e3 / nfe, 2)},
    }


def grid_steps(name):
    """Loop steps of a run: STEPS on the Karras grid, dpm_fast's own count, None for dpm_adaptive (adaptive)."""
    return {"dpm_fast": len(ds.dpm_fast_orders(STEPS)), "dpm_adaptive": None}.get(name, STEPS)


def markdown_rows(data):
    """The README's "Measured" table rows (header first) from a results dict: cells as strings."""
    rows = [["model", "solver", "diffsolve / k-diffusion", "diffsolve / raw model calls",
             "k-diffusion / raw model calls"]]
    for r in data["results"]:
        rows.append([CASE_LABELS.get(r["case"], r["case"]), f"`{r['solver'].removeprefix('sample_')}`",
                     *(f"{r[k]:.3f}" for k in ("ratio_diffsolve_over_kdiffusion", "ratio_diffsolve_over_raw",
                                               "ratio_kdiffusion_over_raw"))])
    return rows


def markdown(data):
    rows = markdown_rows(data)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "solver_overhead.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per (case, solver) after warm-up (default 8, quick 1)")
    parser.add_argument("--min-rounds", type=int, default=None, help="rounds timed at least (default 16, quick 3)")
    parser.add_argument("--only", nargs="+", default=None, help="measure only these samplers (registry names)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README table from the JSON at --out and exit (no benchmark run)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return None
    torch.set_num_threads(args.threads)
    warmup, reps = (1, 3) if args.quick else (2, 400)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 8.0)
    min_rounds = args.min_rounds if args.min_rounds is not None else (3 if args.quick else 16)
    names = twins()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"no k-diffusion twin for {unknown}; twins: {names}")
        names = [n for n in names if n in args.only]
        if args.out == RESULTS / "solver_overhead.json":
            raise SystemExit("--only measures a subset: give --out so that the committed full results stay whole")

    results, load_before, start = [], machine_info()["load_average_1_5_15min"], time.perf_counter()
    for make, case_names in ((lambda: mlp_case(16), names), (lambda: mlp_case(10_000), names),
                             (unet_case, [n for n in names if n in UNET_SOLVERS])):
        if not case_names:
            continue
        case = make()
        for name in case_names:
            fns, nfe = make_variants(case, name)
            counted = Counted(case["model"])
            ours = fns["diffsolve"]()
            theirs = caller(getattr(K.load()[0], f"sample_{name}"), name, case)(counted)
            diff = (ours - theirs).abs().max().item()
            if not diff <= 1e-4 * max(1.0, theirs.abs().max().item()) or counted.calls != nfe:
                raise AssertionError(f"{case['name']} {name}: diffsolve and k-diffusion differ by {diff}, "
                                     f"model calls {nfe} vs {counted.calls}")
            t0 = time.perf_counter()
            times = time_variants(fns, warmup, reps, budget, min_rounds)
            row = {"case": case["name"], "solver": f"sample_{name}", "description": case["description"],
                   "batch": case["x"].shape[0], "shape": list(case["x"].shape), "steps": grid_steps(name),
                   "noise_sampler": "seeded torch.Generator, same on both sides" if takes_noise_sampler(name) else None,
                   "max_abs_diff_diffsolve_vs_kdiffusion": diff, **summarise(times, nfe, grid_steps(name)),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(f"{row['case']:28s} {name:18s} nfe {nfe:4d} reps {row['repetitions']:4d}  "
                  + "  ".join(f"{n} {row['median_ms'][n]:9.3f} ms" for n in VARIANTS)
                  + f"  ds/kd {row['ratio_diffsolve_over_kdiffusion']:.3f}"
                  f"  ds/raw {row['ratio_diffsolve_over_raw']:.3f}  kd/raw {row['ratio_kdiffusion_over_raw']:.3f}",
                  flush=True)
        del case
        gc.collect()

    data = {
        "benchmark": "solver_overhead",
        "description": __doc__.strip().split("\n\n")[0],
        "mode": "quick" if args.quick else "full",
        "wall_s": round(time.perf_counter() - start, 1),
        "samplers": names,
        "settings": {"steps": STEPS, "threads": torch.get_num_threads(), "warmup_rounds": warmup,
                     "max_repetitions": reps, "min_rounds": min_rounds, "timing_budget_s_per_case": budget,
                     "dpm_fast": f"n = {STEPS} model evaluations", "dpm_adaptive": "default rtol, atol",
                     "noise": "samplers with a noise_sampler parameter get a fresh seeded torch.Generator sampler "
                              "per run, the same on both sides",
                     "order": "rotating (ABC, BCA, CAB, ...)", "statistic": "median", "dtype": "float32",
                     "progress_bars": "disable=True for every solver", "sigmas": "k-diffusion get_sigmas_karras"},
        "target": "ratio_diffsolve_over_kdiffusion <= 1.05 in every case",
        "target_met": all(r["ratio_diffsolve_over_kdiffusion"] <= 1.05 for r in results),
        "machine": {**{("load_average_at_end" if k == "load_average_1_5_15min" else k): v
                       for k, v in machine_info().items()}, "load_average_at_start": load_before},
        "results": results,
    }
    write_json_atomic(args.out, data)
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
