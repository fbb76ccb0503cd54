"""The 3-D comparison: every distiller optimises a voxel field per class through DistillationGuidance at
equal model calls (distill.py states the rule), scored against the true shapes (evaluate.field_metrics:
IoU, held-out view error, class accuracy, FD to real renders, Janus rate), over classes and seeds; and the
prior check that says whether the prior is strong enough to measure with (DDIM renders from it: class
accuracy, FD between the real-render floor and the wrong-class FD).

Resumable through `diffsolve.runs.RunFolder` as the digits runner is: each field's record (<key>.json) and its
12 held-out views (<key>.npy, the turntable) are written as it finishes; <name>.json is rebuilt from the parts
that verify on every call. `stop_after=k` ends a call after k new fields (an interruption, for the tests).
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffsolve._io import write_json
from diffsolve.runs import RunFolder, environment
from diffsolve.schedules import sigmas_karras
from diffsolve.solvers import sample_ddim
from diffsolve.transforms import cfg as cfg_transform
from .._parts import jsonable, load_runs, save_run, slug
from ..digits.evaluate import frechet_distance
from . import run as recipes
from .data import render_set
from .distill import EQUAL, METHODS, FieldRun, optimise_field
from .geometry import shape_iou
from .evaluate import HELDOUT_AZIMUTHS, field_metrics, heldout_cameras, real_features
from .model import NULL_CLASS
from .world import CLASSES

__all__ = ["METRICS", "PAIRS", "Text3DConfig", "compare", "plan", "prior_check", "quick_config", "run_study", "summarise",
           "variant"]

METRICS = ("iou", "iou_opacity_0.1", "view_error", "accuracy", "fd", "janus")


@dataclass(frozen=True)
class Text3DConfig:
    training: str = "full"          # run.TRAININGS: the prior / classifier recipe
    classes: tuple = CLASSES
    seeds: tuple = (0, 1)
    methods: tuple = METHODS
    scale: float = 3.0              # CFG w, paper convention c + w (c - u) (1 + w for u + s (c - u) methods)
    msd_paper: bool = True          # also MSD with the paper's §4.3 heuristics (interval CFG / kernel, inversion)
    autoguidance: tuple = ("sds", "msd")  # these methods also run with autoguidance (the weak prior as guide)
    budget: int = 400               # model calls per view per field (CFG counts 2), or steps (equal="steps")
    equal: str = "calls"            # distill.EQUAL: equal model calls (the rule) or equal optimisation steps
    views: int = 4                  # views rendered per step
    resolution: int = 32            # the field's voxel grid (the truth's IoU grid follows it)
    init_density: float = -2.0
    lr: float = 0.3                 # Adam on the field's logits (opacity 0.5 at 32^3 needs ~13 logit units)
    render_samples: int = 32        # ray samples while optimising (the metrics render at 32)
    elevation: tuple = (-10.0, 45.0)  # the training cameras' range
    schedule_sigma: tuple = (0.01, 20.0)  # the pixel schedule's sigma range (1000 log-uniform timesteps)
    step_percent: tuple = (0.02, 0.98)    # threestudio's min / max_step_percent
    interval: tuple = (0.3, 5.0)    # §4.3: guidance (and MSD's kernel) only for sigma in (lo, hi]
    msd_steps: int = 4              # MSD's chain: 4 steps leave it ~90 optimisation steps at budget 400
    lam_start: float = 1e3
    lam_end: float = 1e-2
    sdi_inversion: int = 4
    vsd_lr: float = 2e-4
    check_per_class: int = 24       # prior check: renders per class (2 per held-out azimuth)
    check_steps: int = 16           # prior check: DDIM steps
    check_scales: tuple = (0.0, 3.0)

    def __post_init__(self):
        if self.equal not in EQUAL:
            raise ValueError(f"equal must be one of {EQUAL}, got {self.equal!r}")
        if int(self.budget) != self.budget or self.budget < 1:
            raise ValueError(f"budget must be a positive integer, got {self.budget!r}")


def quick_config():
    """The test suite's setting: quick models, one class and seed, a few steps per method."""
    return replace(Text3DConfig(), training="quick", classes=("tower",), seeds=(0,), budget=8, views=1,
                   resolution=8, render_samples=8, msd_steps=2, sdi_inversion=1, check_per_class=4,
                   check_steps=2, check_scales=(3.0,))


def plan(cfg):
    """Every field of the study: each method (MSD also with the paper's heuristics) x class x seed."""
    runs = []
    for seed in cfg.seeds:
        for cls in cfg.classes:
            runs += [FieldRun(m, cls, seed, cfg.scale) for m in cfg.methods]
            if cfg.msd_paper and "msd" in cfg.methods:
                runs.append(FieldRun("msd", cls, seed, cfg.scale, "paper"))
            runs += [FieldRun(m, cls, seed, cfg.scale, guide="autoguidance") for m in cfg.autoguidance]
    return runs


@torch.no_grad()
def prior_check(data, models, cfg):
    """DDIM renders of the prior at the held-out cameras, per class and guidance scale: the classifier's
    accuracy and the FD of its features to the class's real (training) renders, against the floor (the same
    number of held-out real renders, other cameras) and against real renders of the next class (wrong class)."""
    clf, prior = models["classifier"], models["prior"]
    ref = real_features(clf, data)
    n = cfg.check_per_class
    heldout = render_set(n, seed=1)  # unseen cameras (data seed 0 rendered the training views)
    cams = heldout_cameras()
    reps = math.ceil(n / len(HELDOUT_AZIMUTHS))
    elev, azim = cams["elevation"].repeat(reps)[:n], cams["azimuth"].repeat(reps)[:n]
    sigmas = sigmas_karras(cfg.check_steps, 0.002, 80.0)
    out = {"per_class": n, "ddim_steps": cfg.check_steps, "classes": {}}
    g = torch.Generator().manual_seed(123)
    for k, cls in enumerate(CLASSES):
        real_x = heldout.train_images[heldout.train_labels == k]
        wrong = heldout.train_images[heldout.train_labels == (k + 1) % len(CLASSES)]
        row = {"fd_floor": frechet_distance(clf.features(real_x), ref[cls]),
               "fd_wrong_class": frechet_distance(clf.features(wrong), ref[cls]),
               "real_accuracy": float((clf(real_x)[0].argmax(-1) == k).float().mean())}
        for w in cfg.check_scales:
            labels = torch.full((n,), k, dtype=torch.long)
            transforms = [] if w == 0 else [cfg_transform(w, uncond={"class_labels": torch.full((n,), NULL_CLASS)},
                                                          convention="paper")]
            x = sample_ddim(prior, 80.0 * torch.randn(n, 3, 32, 32, generator=g), sigmas,
                            {"class_labels": labels, "elevation": elev, "azimuth": azim}, disable=True,
                            transforms=transforms).clamp(-1, 1)
            logits, _ = clf(x)
            row[f"w{w:g}"] = {"accuracy": float((logits.argmax(-1) == k).float().mean()),
                              "fd": frechet_distance(clf.features(x), ref[cls])}
        out["classes"][cls] = row
    for w in cfg.check_scales:
        rows = [r[f"w{w:g}"] for r in out["classes"].values()]
        fl = [r["fd_floor"] for r in out["classes"].values()]
        wr = [r["fd_wrong_class"] for r in out["classes"].values()]
        out[f"w{w:g}"] = {"accuracy": float(np.mean([r["accuracy"] for r in rows])),
                          "fd": float(np.mean([r["fd"] for r in rows])), "fd_floor": float(np.mean(fl)),
                          "fd_wrong_class": float(np.mean(wr))}
        out[f"w{w:g}"]["passes"] = bool(out[f"w{w:g}"]["accuracy"] >= 0.9
                                        and out[f"w{w:g}"]["fd_floor"] <= out[f"w{w:g}"]["fd"]
                                        < out[f"w{w:g}"]["fd_wrong_class"])
    return out


def open_folder(out_dir, cfg, name):
    return RunFolder(out_dir, name, {**jsonable(asdict(cfg)), "recipe": jsonable(recipes.recipe(cfg.training)),
                                     **environment()})


def collect(folder, name, cfg):
    """The results (as <name>.json holds them) from the parts of `folder` that verify."""
    results = {"name": name, "config": jsonable(asdict(cfg)),
               "runs": load_runs(folder, f"{name}_fields", plan(cfg), (len(HELDOUT_AZIMUTHS), 3, 32, 32))}
    check = folder.read_json(f"{name}_fields/_prior_check.json")
    if check is not None:
        results["prior_check"] = check
    return results


def run_study(cfg, out_dir, cache_dir=None, progress=True, name="text_to_3d", stop_after=None, folder=None):
    """Every field of `plan(cfg)` into `out_dir`, resuming from the parts there that verify; the JSON is
    rewritten after each field. Returns the results with `computed_this_call` (fields run by this call)."""
    if folder is None:
        with open_folder(out_dir, cfg, name) as folder:
            return run_study(cfg, out_dir, cache_dir, progress, name, stop_after, folder)
    t0 = time.perf_counter()
    data, models = recipes.load(cfg.training, cache_dir, progress)
    results = collect(folder, name, cfg)
    results["training_seconds"] = {k: m.train_seconds for k, m in models.items()}
    if "prior_check" not in results:
        results["prior_check"] = prior_check(data, models, cfg)
        folder.write_json(f"{name}_fields/_prior_check.json", results["prior_check"])
    ref = real_features(models["classifier"], data)
    json_path, done = Path(folder.root) / f"{name}.json", 0
    for r in plan(cfg):
        if r.key in results["runs"]:
            continue
        if stop_after is not None and done >= stop_after:
            break
        start = time.perf_counter()
        weak = models["weak"] if r.guide == "autoguidance" else None
        field, record = optimise_field(r, models["prior"], cfg, weak=weak)
        with torch.no_grad():
            density, rgb = field.fields()
            metrics = field_metrics(density, rgb, r.cls, models["classifier"], ref)
            metrics["iou_opacity_0.1"] = shape_iou(density, r.cls, opacity=0.1)  # semi-transparent fields too
        views = metrics.pop("views")
        record = {"run": asdict(r), **record, "final": metrics, "seconds": time.perf_counter() - start}
        save_run(folder, f"{name}_fields/{slug(r.key)}", r.key, record, views.numpy().astype(np.float16))
        results["runs"][r.key] = record
        done += 1
        results["summary"] = summarise(results, cfg)
        write_json(json_path, results)
        if progress:
            print(f"{r.key}: iou {metrics['iou']:.3f} janus {metrics['janus']:.2f} ({record['seconds']:.0f} s)",
                  flush=True)
    results["summary"], results["comparisons"] = summarise(results, cfg), compare(results, cfg)
    results["computed_this_call"], results["seconds_this_call"] = done, time.perf_counter() - t0
    write_json(json_path, results)
    return results


def variant(run):
    return (run["method"] + ("+paper" if run["heuristics"] == "paper" else "")
            + ("+autoguidance" if run["guide"] == "autoguidance" else ""))


def summarise(results, cfg):
    """Per method variant: mean and std of every metric over all its (class, seed) fields, and the calls."""
    groups = {}
    for rec in results["runs"].values():
        groups.setdefault(variant(rec["run"]), []).append(rec)
    out = {}
    for v, recs in groups.items():
        row = {"fields": len(recs), "nfe": [r["nfe"] for r in recs][0] if len({r["nfe"] for r in recs}) == 1
               else [r["nfe"] for r in recs], "steps_mean": float(np.mean([r["steps"] for r in recs]))}
        for m in METRICS:
            vals = np.array([r["final"][m] for r in recs], dtype=float)
            row[m] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        out[v] = row
    return out


PAIRS = (("msd", "sds"), ("msd+paper", "sds"), ("msd+autoguidance", "sds+autoguidance"))


def compare(results, cfg, pairs=PAIRS):
    """Paired differences (variant - its baseline) over (class, seed) for IoU and Janus: mean, std, and whether
    the difference lies beyond the spread (every pair has the same sign and |mean| > 2 standard errors)."""
    by = {}
    for rec in results["runs"].values():
        r = rec["run"]
        by[(variant(r), r["cls"], r["seed"])] = rec["final"]
    out = {}
    for other, baseline in pairs:
        for m in ("iou", "iou_opacity_0.1", "janus"):
            pairs_m = [by[(other, c, s)][m] - by[(baseline, c, s)][m] for (v, c, s) in by
                       if v == other and (baseline, c, s) in by]
            if not pairs_m:
                continue
            d = np.array(pairs_m)
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
            out[f"{other}-{baseline}/{m}"] = {
                "pairs": len(d), "mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else None,
                "beyond_spread": bool(len(d) > 1 and (np.all(d > 0) or np.all(d < 0)) and abs(d.mean()) > 2 * se)}
    return out
