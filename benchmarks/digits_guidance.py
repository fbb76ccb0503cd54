"""Guidance methods on the digits testbed (docs/digits.md, "Guidance methods"): DDIM samples and SDS / MSD
distillation at equal model calls under plain CFG, CFG with rescale, APG, CFG-Zero* and CFG++.

Every run goes through the testbed's own code, unchanged: DDIM as `study.ddim_reference` does it (32 Karras steps
from sigma 80, the study's seed) with the method's transform in place of CFG; distillation through
`study.optimise(run, models, ref, cfg, distiller=...)` with the study's distiller options
(`study.distiller_options`: SDS as the main table runs it, no heuristic; MSD as the paper runs it, guidance and
kernel in (0.3, 5] and the DDIM-inverted centre, log-linear bandwidth) and only the guidance transform replaced.
Every method evaluates the conditional and the unconditional model once per call (2 model calls, as CFG), so the
budget (3,200 calls per image) buys every method the same number of steps.

Settings (METHODS; w is the study's convention c + w (c - u)):
  - cfg:          the study's CFG;
  - rescale:      Lin et al. 2023, phi = 0.7 (the paper's value), eps space (diffusers' ClassifierFreeGuidance);
  - apg:          Sadat et al. 2024, eta = 0 (parallel part dropped), momentum -0.5, norm threshold 15 (diffusers'
                  default for Stable Diffusion latents of 4 x 64 x 64) scaled to the digits' 64 dimensions by the
                  root of the dimension ratio (15 sqrt(64 / 16384) = 0.94), eps space;
  - cfg_zero_star: Fan et al. 2025, optimised scale alpha*, zero-init of the first DDIM step (diffusers' default
                  zero_init_steps = 1) for DDIM; no zero-init in distillation (a fresh run per gradient restarts its
                  counter, so every SDS evaluation would be "the first": its zero eps turns the SDS gradient into the
                  drawn noise alone);
  - cfg_pp:       Chung et al. 2024, lambda in [0, 1] (LAMBDAS), renoising with the unconditional prediction. DDIM and
                  MSD's DDIM chain renoise, so it applies to both; SDS does not renoise (its noise is the drawn
                  noise, its update x - D only uses the data part), where CFG++ would be CFG at lambda <= 1 and is
                  not run.
APG's momentum and CFG-Zero*'s counter live in the run: for SDS a run is one gradient (one evaluation), so APG
acts there without momentum; along MSD's chain and DDIM's steps both act as in a sampler.

    python benchmarks/digits_guidance.py --strong # -> benchmarks/results/digits_guidance.json, .md (resumes; the
                                                  #    committed run: 41 min of runs on a 2-core server at load 9-15)
    python benchmarks/digits_guidance.py --quick --out /tmp/g.json --cache /tmp/cache   # tiny models, seconds
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.distill import MSD, make_distiller  # noqa: E402
from diffsolve.guidance import apg, cfg_pp, cfg_rescale, cfg_zero_star  # noqa: E402
from diffsolve.schedules import sigmas_karras  # noqa: E402
from diffsolve.solvers import sample_ddim  # noqa: E402
from diffsolve.transforms import cfg, limited_interval  # noqa: E402
from diffsolve_studies.digits import study  # noqa: E402
from diffsolve_studies.digits.data import PIXELS  # noqa: E402
from diffsolve_studies.digits.run import FULL_TRAINING, QUICK_TRAINING, load_testbed  # noqa: E402

METHODS = ("cfg", "rescale", "apg", "cfg_zero_star", "cfg_pp")
SCALES = (3.0, 7.5)          # w of the CFG family: the study's main scale and its strongest
LAMBDAS = (0.4, 0.8)         # CFG++'s lambda (diffusers form u + lambda (c - u)), one per row group
RESCALE_PHI = 0.7
APG = dict(eta=0.0, momentum=-0.5, norm_threshold=15.0 * math.sqrt(PIXELS / (4 * 64 * 64)))
DISTILLERS = ("sds", "msd")
TINY_TRAINING = {k: dict(v, iterations=max(5, v["iterations"] // 6)) for k, v in QUICK_TRAINING.items()}


def transform(method, scale, models, *, sampler):
    """The guidance transform of `method` at `scale` (w, or lambda for cfg_pp) over the testbed's model;
    `sampler`: "ddim", "sds" or "msd" (CFG-Zero*'s zero-init only for DDIM, see the module docstring)."""
    unc = study._Unconditional(models["main"])
    if method == "cfg":
        return cfg(scale, uncond_model=unc, convention="paper")
    if method == "rescale":
        return cfg_rescale(scale, guide=unc, convention="paper", guidance_rescale=RESCALE_PHI)
    if method == "apg":
        return apg(scale, guide=unc, convention="paper", **APG)
    if method == "cfg_zero_star":
        return cfg_zero_star(scale, guide=unc, convention="paper", zero_init_steps=1 if sampler == "ddim" else 0)
    if method == "cfg_pp":
        if sampler == "sds":
            raise ValueError("CFG++ does not apply to SDS: SDS does not renoise (see the module docstring)")
        return cfg_pp(scale, uncond_model=unc)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def settings():
    """What each method ran with (recorded in the JSON)."""
    return {"cfg": {"scales_w": list(SCALES)}, "rescale": {"scales_w": list(SCALES), "guidance_rescale": RESCALE_PHI},
            "apg": {"scales_w": list(SCALES), **APG}, "cfg_zero_star": {"scales_w": list(SCALES),
                                                                         "zero_init_steps": {"ddim": 1, "sds": 0,
                                                                                             "msd": 0}},
            "cfg_pp": {"lambdas": list(LAMBDAS), "distillers": ["msd"]}}


def grid(groups=None):
    """(method, scale, group) triples: the CFG family at each w of SCALES, CFG++ at the lambda of the group
    (`groups`: the group indices, default all)."""
    groups = range(len(SCALES)) if groups is None else groups
    return [(m, (LAMBDAS[g] if m == "cfg_pp" else SCALES[g]), g) for g in groups for m in METHODS]


def ddim(method, scale, models, cfg_):
    """`study.ddim_reference` with the method's transform: (images, model calls per image)."""
    labels = study.labels_for(cfg_)
    g = torch.Generator().manual_seed(cfg_.seed)
    sigmas = sigmas_karras(cfg_.ddim_steps, cfg_.sigma_min, cfg_.sigma_max)
    x0 = cfg_.sigma_max * torch.randn(len(labels), PIXELS, generator=g)
    x, info = sample_ddim(models["main"], x0, sigmas, {"class_labels": labels}, disable=True, return_info=True,
                          transforms=[transform(method, scale, models, sampler="ddim")])
    return x, info.nfe


def distiller(run, method, scale, models, cfg_):
    """The study's distiller for `run` (its options, its bandwidth schedule for MSD) with the method's guidance;
    MSD's guidance limited to the study's interval, as its heuristics ask (study.guidance_transforms)."""
    labels = study.labels_for(cfg_)
    opts = study.distiller_options(run, models, labels, cfg_)
    g = transform(method, scale, models, sampler=run.method)
    opts["transforms"] = [limited_interval(g, *cfg_.interval)] if run.heuristics != "none" else [g]
    d = make_distiller(run.method, models["main"], **opts)
    if isinstance(d, MSD):
        lam_of = study.bandwidth_schedule(run, cfg_)
        d.schedule = lambda step, m_norm: lam_of(d.nfe / cfg_.budget, m_norm)
    return d


def study_run(method, scale, group, dist, param, cfg_):
    """The study's Run of one distillation (its key names the method; scale is w of the row group)."""
    return study.Run(dist, param, SCALES[group], "interval+inverted" if dist == "msd" else "none",
                     label=f"{method}" + (f"_lambda{scale:g}" if method == "cfg_pp" else ""))


def plan(quick=False, mlp=False, strong=False):
    """Every (kind, method, scale, group, distiller, param): DDIM for every method and scale; SDS and MSD on pixels
    at the main scale (CFG++: MSD only); `strong`: also at w = 7.5; `mlp`: also on the coordinate MLP at the main
    scale. `quick`: the main scale only."""
    groups = [0] if quick else list(range(len(SCALES)))
    out = [("ddim", m, s, g, None, None) for m, s, g in grid(groups)]
    for g in groups if strong else [0]:
        for param in ("pixels", "mlp") if mlp and g == 0 else ("pixels",):
            out += [("distill", m, s, g, dist, param) for m, s, _ in grid([g]) for dist in DISTILLERS
                    if not (m == "cfg_pp" and dist == "sds")]
    return out


def key(kind, method, scale, group, dist, param):
    name = f"{method}/lambda{scale:g}" if method == "cfg_pp" else f"{method}/w{scale:g}"
    return f"ddim/{name}" if kind == "ddim" else f"{dist}/{param}/{name}"


def run(out, quick=False, cache=None, progress=False, mlp=False, strong=False):
    t0 = time.perf_counter()
    cfg_ = study.quick_config() if quick else study.DigitsConfig()
    training = TINY_TRAINING if quick else FULL_TRAINING
    _, models, ref = load_testbed(training, cache_dir=None if cache is None else Path(cache), progress=progress)
    labels = study.labels_for(cfg_)
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg_).items()},
               "quick": quick, "mlp": mlp, "strong": strong, "settings": settings(), "scales_w": list(SCALES),
               "lambdas": list(LAMBDAS), "runs": {}}
    previous = json.loads(out.read_text()) if out.exists() else None
    same = previous is not None and all(previous.get(k) == results[k] for k in ("config", "quick", "settings"))
    done = previous["runs"] if same else {}  # resume: runs of the same settings are kept
    for kind, method, scale, group, dist, param in plan(quick, mlp, strong):
        k = key(kind, method, scale, group, dist, param)
        if k in done:
            results["runs"][k] = done[k]
            continue
        start = time.perf_counter()
        if kind == "ddim":
            x, nfe = ddim(method, scale, models, cfg_)
            rec = {"nfe": nfe, "steps": cfg_.ddim_steps, "final": study.measure(x, labels, ref)}
        else:
            r = study_run(method, scale, group, dist, param, cfg_)
            x, rec = study.optimise(r, models, ref, cfg_, distiller=distiller(r, method, scale, models, cfg_))
            rec.pop("msd_steps", None)
            rec["study_key"] = r.key
        rec.update(kind=kind, method=method, scale=scale, group=group, distiller=dist, param=param,
                   seconds=time.perf_counter() - start)
        results["runs"][k] = rec
        write_json_atomic(out, results)  # after every run: an interrupted run keeps what it finished
        if progress:
            print(f"{k}: FD {rec['final']['fd']:.1f} ({rec['seconds']:.0f} s)", flush=True)
    results["ranking"] = ranking(results)
    results["seconds"] = time.perf_counter() - t0  # this call (runs resumed from an earlier call cost nothing)
    results["runs_seconds"] = sum(rec["seconds"] for rec in results["runs"].values())
    results["machine"] = machine_info()
    write_json_atomic(out, results)
    return results


def ranking(results):
    """Per (method, scale, param): SDS's and MSD's final FD and whether MSD's is lower (the paper's ranking)."""
    runs, rows = results["runs"], {}
    for rec in runs.values():
        if rec["kind"] != "distill":
            continue
        name = key("distill", rec["method"], rec["scale"], rec["group"], "x", rec["param"]).split("/", 1)[1]
        rows.setdefault(name, {})[rec["distiller"]] = rec["final"]["fd"]
    for row in rows.values():
        row["msd_beats_sds"] = row["msd"] < row["sds"] if "sds" in row and "msd" in row else None
    return rows


LABELS = {"cfg": "CFG", "rescale": "CFG + rescale 0.7", "apg": "APG (eta 0, momentum -0.5)",
          "cfg_zero_star": "CFG-Zero*", "cfg_pp": "CFG++"}


def _fmt(value, spec):
    return spec.format(value) if value is not None and math.isfinite(value) else "-"


def _scale_cell(rec):
    return f"lambda = {rec['scale']:g}" if rec["method"] == "cfg_pp" else f"w = {rec['scale']:g}"


def ddim_rows(results):
    """DDIM: method, scale, calls per image, FD, accuracy, copies, diversity."""
    rows = []
    for rec in results["runs"].values():
        if rec["kind"] == "ddim":
            f = rec["final"]
            rows.append([LABELS[rec["method"]], _scale_cell(rec), f"{rec['nfe']:.0f}", _fmt(f["fd"], "{:.1f}"),
                         _fmt(f["accuracy"], "{:.3f}"), _fmt(f["copy_rate"], "{:.3f}"), _fmt(f["diversity"], "{:.2f}")])
    return rows


def distill_rows(results, param):
    """SDS and MSD side by side on `param`: FD (accuracy), copies, diversity, steps, and whether MSD's FD is lower."""
    runs, rows = results["runs"], []
    for method, scale, group in grid():
        cells = {}
        for dist in DISTILLERS:
            rec = runs.get(key("distill", method, scale, group, dist, param))
            cells[dist] = rec
        if cells["msd"] is None:
            continue
        row = [LABELS[method], _scale_cell(cells["msd"])]
        for dist in DISTILLERS:
            rec = cells[dist]
            if rec is None:
                row += ["n/a", "-", "-"]
                continue
            f = rec["final"]
            fd = _fmt(f["fd"], "{:.1f}") + (f" ({f['accuracy']:.2f})" if f["accuracy"] < 0.995 else "")
            row += [fd, _fmt(f["copy_rate"], "{:.3f}"), _fmt(f["diversity"], "{:.2f}")]
        sds = cells["sds"]
        row.append("-" if sds is None else ("yes" if cells["msd"]["final"]["fd"] < sds["final"]["fd"] else "no"))
        rows.append(row)
    return rows


DISTILL_HEAD = ["method", "scale", "SDS FD (acc.)", "SDS copies", "SDS diversity", "MSD FD (acc.)", "MSD copies",
                "MSD diversity", "MSD < SDS"]


def markdown(results):
    lines = [f"DDIM ({results['config']['ddim_steps']} steps, the study's seed):", "",
             "| method | scale | calls / image | FD | accuracy | copies | diversity |", "|" + "---|" * 7]
    lines += ["| " + " | ".join(r) + " |" for r in ddim_rows(results)]
    for param in ("pixels", "mlp"):
        rows = distill_rows(results, param)
        if rows:
            lines += ["", f"SDS and MSD on {param}, {results['config']['budget']} model calls per image:", "",
                      "| " + " | ".join(DISTILL_HEAD) + " |", "|" + "---|" * len(DISTILL_HEAD)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 2 images per class, budget 96, the main scale "
                   "only: about 25 s")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/digits_guidance.json; --quick: "
                   "outputs/digits_guidance_quick.json); the markdown tables go beside it (.md)")
    p.add_argument("--cache", default=None, help="model cache (default: $DIFFSOLVE_CACHE or ~/.cache/diffsolve)")
    p.add_argument("--strong", action="store_true", help="also distil at w = 7.5")
    p.add_argument("--mlp", action="store_true", help="also distil into the coordinate MLP at the main scale")
    p.add_argument("--progress", action="store_true", help="print each run as it finishes")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else (Path("outputs/digits_guidance_quick.json") if a.quick
                                     else RESULTS / "digits_guidance.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run(out, a.quick, a.cache, a.progress, a.mlp, a.strong)
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
