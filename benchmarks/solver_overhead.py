"""Solver overhead: diffsolve's sample_euler / sample_heun against k-diffusion's and against the bare model calls.

For each denoiser and solver three variants run on the same model, x and sigmas (32 Karras steps):
  - diffsolve:   diffsolve.sample_{euler,heun}(..., disable=True)
  - k-diffusion: k_diffusion.sampling.sample_{euler,heun}(..., disable=True)
  - raw:         a loop that only calls the denoiser, once per recorded evaluation of a diffsolve run,
                 on exactly the inputs that run gave it (the floor any solver pays).
Denoisers: a small MLP on 2-D data (3 hidden layers of 64, Fourier sigma embedding, EDM preconditioning)
at batch 16 and 10**4, and diffusers' tiny Stable Diffusion UNet wrapped in diffsolve.VPDenoiser on 16x16
latents, batch 2. Single-threaded; warm-up runs first, then repetitions in rotating order (ABC, BCA, CAB,
...) so slow drift hits every variant alike; medians are reported.

    .venv/bin/python benchmarks/solver_overhead.py            # full run, ~4-5 minutes
    .venv/bin/python benchmarks/solver_overhead.py --quick    # a few repetitions, for a smoke test
"""
import argparse
import gc
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
SOLVERS = ("sample_euler", "sample_heun")
VARIANTS = ("diffsolve", "k-diffusion", "raw")


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


def record_calls(case, solver):
    """The (x, sigma, kwargs) of every denoiser evaluation one diffsolve run makes."""
    calls = []

    def recorder(x, sigma, **kw):
        calls.append((x.clone(), sigma.clone(), kw))
        return case["model"](x, sigma, **kw)
    getattr(ds, solver)(recorder, case["x"], case["sigmas"], dict(case["extra_args"]), disable=True)
    return calls


def make_variants(case, solver):
    sampling, _ = K.load()
    model, x, sigmas, extra = case["model"], case["x"], case["sigmas"], case["extra_args"]
    ours, theirs = getattr(ds, solver), getattr(sampling, solver)
    calls = record_calls(case, solver)

    def run_diffsolve():
        return ours(model, x, sigmas, extra, disable=True)

    def run_kdiffusion():
        return theirs(model, x, sigmas, extra, disable=True)

    @torch.no_grad()
    def run_raw():
        out = None
        for xi, si, kw in calls:
            out = model(xi, si, **kw)
        return out
    return {"diffsolve": run_diffsolve, "k-diffusion": run_kdiffusion, "raw": run_raw}, len(calls)


def time_variants(fns, warmup, reps, budget_s):
    """Warm up, then time `reps` rounds (stopping early past `budget_s` once 10 rounds are done), each
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
            if r + 1 >= 10 and time.perf_counter() - start > budget_s:
                break
    finally:
        gc.enable()
    return times


def summarise(times, nfe):
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
        "overhead_per_step_us": {
            "diffsolve": round((ms["diffsolve"] - ms["raw"]) * 1e3 / STEPS, 2),
            "k-diffusion": round((ms["k-diffusion"] - ms["raw"]) * 1e3 / STEPS, 2)},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "solver_overhead.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per (case, solver) after warm-up (default 30, quick 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup, reps = (1, 5) if args.quick else (3, 400)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 30.0)

    results, load_before = [], machine_info()["load_average_1_5_15min"]
    for make in (lambda: mlp_case(16), lambda: mlp_case(10_000), unet_case):
        case = make()
        for solver in SOLVERS:
            fns, nfe = make_variants(case, solver)
            ours, theirs = fns["diffsolve"](), fns["k-diffusion"]()
            diff = (ours - theirs).abs().max().item()
            if not diff <= 1e-4 * max(1.0, theirs.abs().max().item()):
                raise AssertionError(f"{case['name']} {solver}: diffsolve and k-diffusion differ by {diff}")
            t0 = time.perf_counter()
            times = time_variants(fns, warmup, reps, budget)
            row = {"case": case["name"], "solver": solver, "description": case["description"],
                   "batch": case["x"].shape[0], "shape": list(case["x"].shape), "steps": STEPS,
                   "max_abs_diff_diffsolve_vs_kdiffusion": diff, **summarise(times, nfe),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(f"{row['case']:28s} {solver:13s} reps {row['repetitions']:4d}  "
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
        "settings": {"steps": STEPS, "threads": torch.get_num_threads(), "warmup_rounds": warmup,
                     "max_repetitions": reps, "timing_budget_s_per_case": budget,
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
