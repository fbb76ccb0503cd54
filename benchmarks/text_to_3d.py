"""The 3-D distillation testbed's comparison (diffsolve_studies/scene3d): every distiller optimises a voxel
field per class through DistillationGuidance at equal model calls, scored against the true shapes; and the
prior check. Writes benchmarks/results/text_to_3d.json (+ .md) and docs/figures/text_to_3d_<class>.png
(turntable strips: the 12 held-out views of each method's seed-0 field, the truth on top).

    python benchmarks/text_to_3d.py               # the committed full run: full recipe, every class, budget 400
    python benchmarks/text_to_3d.py --budget 1000 --name text_to_3d_long   # the committed longer run
    python benchmarks/text_to_3d.py --equal-steps --budget 500 --methods sds,msd --name text_to_3d_steps
    python benchmarks/text_to_3d.py --reduced     # a smaller prior and budget (REDUCED_RUN), for a busy machine
    python benchmarks/text_to_3d.py --quick       # plumbing check (quick models)

The run folder (resumable: a second call reuses every finished field) is outputs/<name>[_reduced|_quick].
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffsolve._io import write_json  # noqa: E402
from diffsolve_studies._parts import jsonable, slug  # noqa: E402
from diffsolve_studies.scene3d import study  # noqa: E402
from diffsolve_studies.scene3d.distill import METHODS  # noqa: E402
from diffsolve_studies.scene3d.evaluate import heldout_cameras, true_views  # noqa: E402

# sized for a shared two-core machine (load ~15) in under an hour: the reduced recipe, 2 classes, 2 seeds
# (the first committed run used it, on the white-background world; the full run has replaced it)
REDUCED_RUN = dict(training="reduced", classes=("tower", "mushroom"), seeds=(0, 1), budget=160, views=2,
                   resolution=16, lr=0.3, msd_steps=4, sdi_inversion=2, check_per_class=24, check_steps=16)


def with_variants(cfg, variants):
    """`cfg` running exactly `variants`: distiller names, "msd+paper" (with "msd"), "<method>+autoguidance"."""
    plain = tuple(v for v in variants if v in METHODS)
    auto = tuple(v[:-len("+autoguidance")] for v in variants if v.endswith("+autoguidance"))
    known = set(METHODS) | {"msd+paper"} | {f"{m}+autoguidance" for m in METHODS}
    unknown = [v for v in variants if v not in known]
    if unknown or not plain or ("msd+paper" in variants and "msd" not in plain):
        raise SystemExit(f"--methods needs at least one distiller (and msd with msd+paper); unknown: {unknown}; "
                         f"known: {sorted(known)}")
    return replace(cfg, methods=plain, msd_paper="msd+paper" in variants, autoguidance=auto)


def _fmt(s):
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def markdown(res):
    cfg = res["config"]
    lines = [f"# text_to_3d ({res.get('label', '')})", "",
             f"training `{cfg['training']}`, classes {', '.join(cfg['classes'])}, seeds {list(cfg['seeds'])}, "
             f"budget {cfg['budget']} " + ("optimisation steps" if cfg.get("equal") == "steps" else "model calls per view")
             + f" ({cfg['views']} views a step), field {cfg['resolution']}^3, "
             f"CFG w = {cfg['scale']:g}.", "", "## Prior check (DDIM renders at the held-out cameras)", "",
             "| w | accuracy | FD | FD floor (held-out real) | FD wrong class | passes |", "|---|---|---|---|---|---|"]
    pc = res["prior_check"]
    for w in cfg["check_scales"]:
        r = pc[f"w{w:g}"]
        lines.append(f"| {w:g} | {r['accuracy']:.3f} | {r['fd']:.4f} | {r['fd_floor']:.4f} | "
                     f"{r['fd_wrong_class']:.4f} | {r['passes']} |")
    scales = [f"w{w:g}" for w in cfg["check_scales"]]
    lines += ["", "| class | " + " | ".join(f"DDIM {w}: accuracy / FD" for w in scales)
              + " | FD floor (held-out real) | FD wrong class |", "|---|" + "---|" * (len(scales) + 2)]
    for cls, r in pc["classes"].items():
        lines.append(f"| {cls} | " + " | ".join(f"{r[w]['accuracy']:.2f} / {r[w]['fd']:.1f}" for w in scales)
                     + f" | {r['fd_floor']:.1f} | {r['fd_wrong_class']:.1f} |")
    lines += ["", "## Fields (mean ± std over classes and seeds)", "",
              "| method | fields | calls / view | steps | IoU | IoU (opacity 0.1) | view error | accuracy | FD | Janus |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in sorted(res["summary"].items(), key=lambda kv: -kv[1]["iou"]["mean"]):
        lines.append(f"| {v} | {r['fields']} | {r['nfe']} | {r['steps_mean']:.0f} | {_fmt(r['iou'])} | "
                     f"{_fmt(r['iou_opacity_0.1'])} | {_fmt(r['view_error'])} | {_fmt(r['accuracy'])} | {_fmt(r['fd'])} | {_fmt(r['janus'])} |")
    lines += ["", "## Paired differences against the baseline (same class and seed)", "",
              "| difference | pairs | mean | std | beyond the spread |", "|---|---|---|---|---|"]
    for k, c in res["comparisons"].items():
        std = "n/a" if c["std"] is None else f"{c['std']:.3f}"
        lines.append(f"| {k} | {c['pairs']} | {c['mean']:+.3f} | {std} | {c['beyond_spread']} |")
    return "\n".join(lines) + "\n"


def turntables(res, out_dir, fig_dir, name, seed=0):
    """One figure per class: the truth and each method's field from the 12 held-out azimuths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    paths = []
    Path(fig_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(out_dir) / f"{name}_fields"
    for cls in res["config"]["classes"]:
        rows = [("truth", true_views(cls, heldout_cameras(), res["config"]["resolution"]).numpy())]
        for key, rec in res["runs"].items():
            r = rec["run"]
            if r["cls"] == cls and r["seed"] == seed:
                label = study.variant(r)
                rows.append((f"{label}  IoU {rec['final']['iou']:.2f}", np.load(folder / f"{slug(key)}.npy")))
        fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.1 * len(rows)))
        for ax, (label, views) in zip(np.atleast_1d(axes), rows):
            strip = np.concatenate(list(np.clip(views.astype(np.float32), 0, 1).transpose(0, 2, 3, 1)), axis=1)
            ax.imshow(strip, interpolation="nearest")
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"{cls}: azimuth -180 .. 150 (step 30), elevation 20", fontsize=9)
        fig.tight_layout()
        fig.subplots_adjust(left=0.17)
        path = Path(fig_dir) / f"{name}_{cls}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reduced", action="store_true", help="a smaller prior and budget (REDUCED_RUN)")
    mode.add_argument("--quick", action="store_true", help="quick models, tiny budget")
    p.add_argument("--out", default=None, help="run folder (default outputs/text_to_3d[_reduced|_quick])")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--classes", default=None, help="comma-separated classes (overrides the mode's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (overrides the mode's)")
    p.add_argument("--budget", type=int, default=None, help="model calls per view per field (overrides)")
    p.add_argument("--equal-steps", action="store_true",
                   help="the budget counts optimisation steps: every method takes exactly that many")
    p.add_argument("--methods", default=None,
                   help="comma-separated variants to run (overrides): distillers, msd+paper, <method>+autoguidance")
    p.add_argument("--name", default="text_to_3d",
                   help="results <name>.json / .md, figures <name>_<class>.png, run folder outputs/<name>[_mode]")
    args = p.parse_args(argv)
    if not args.name.isidentifier():
        raise SystemExit(f"--name must be a plain identifier (letters, digits, _), got {args.name!r}")
    if args.quick:
        cfg, label = study.quick_config(), "quick"
    elif args.reduced:
        cfg, label = replace(study.Text3DConfig(), **REDUCED_RUN), "reduced"
    else:
        cfg, label = study.Text3DConfig(), "full"
    if args.classes:
        cfg = replace(cfg, classes=tuple(args.classes.split(",")))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.budget:
        cfg = replace(cfg, budget=args.budget)
    if args.equal_steps:
        cfg = replace(cfg, equal="steps")
    if args.methods:
        cfg = with_variants(cfg, args.methods.split(","))
    out = Path(args.out or ROOT / "outputs" / (args.name + ("" if label == "full" else f"_{label}")))
    t0 = time.perf_counter()
    res = study.run_study(cfg, out, progress=args.progress, name=args.name)
    res["label"], res["wall_seconds_this_call"] = label, time.perf_counter() - t0
    res["wall_seconds_all_fields"] = sum(r["seconds"] for r in res["runs"].values())
    if not args.no_figures and res["runs"]:
        res["figures"] = turntables(res, out, args.figures, args.name)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{args.name}.json", res)
    (results / f"{args.name}.md").write_text(markdown(jsonable(res)))
    return res


if __name__ == "__main__":
    main()
