"""ISM, CSD, NFSD and SJC beside SDS, VSD, SDI and MSD on the digits testbed, at equal model calls.

    OMP_NUM_THREADS=1 python benchmarks/digits_distillers.py          # -> benchmarks/results/digits_distillers.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/digits_distillers.py --quick  # quick testbed and budget (~1 min)

Equal model calls: the testbed's rule - every run optimises until its distiller has spent the same budget of
model evaluations per image (a guided evaluation counts 2), so a method with costlier gradients takes fewer
steps. Full run: the study's pixel parametrisation, CFG at the main scale w = 3 (paper convention), no
heuristics, 8 images per class (the study uses 16) and a budget of 1600 evaluations per image (the study:
3200), to fit ~15 minutes at OMP_NUM_THREADS=1. SDS / VSD / SDI / MSD use the study's options
(`diffsolve_studies.digits.study.study_distiller`; MSD with the paper's interval + inverted heuristics as in the
main table); the new methods get the study's noisy-sample options (sigma for Stable Diffusion's t in [20, 980],
CFG transform, class labels) with their own weightings (ISM sigma_t, SJC 1, CSD / NFSD 1 - abar) and ISM's
warm-up as 30 % of the run (the official 1500 of 5000 iterations) on the study's 1000-position step grid.
NFSD runs with the null class as the negative (delta_D = 0 above the threshold) and with the weak model as the
negative ("blurry, low quality": a worse model of the same data).
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_json_atomic  # noqa: E402
from diffsolve.distill import CSD, ISM, NFSD, SJC  # noqa: E402
from diffsolve_studies.digits import study  # noqa: E402
from diffsolve_studies.digits.run import FULL_TRAINING, QUICK_TRAINING, load_testbed  # noqa: E402

METRICS = ("fd", "fd_class", "accuracy", "nn_train", "copy_rate", "diversity")


def distillers(run, models, cfg_):
    """{label: (Run, distiller or None for the study's own)} of one guidance setting."""
    labels = study.labels_for(cfg_)
    noisy = study.distiller_options(study.Run("sds", run.param, run.scale, guidance=run.guidance), models, labels, cfg_)
    base = {k: v for k, v in noisy.items() if k != "weighting"}
    warm = round(0.3 * study.SDI_GRID)
    out = {m: (replace(run, method=m, heuristics="interval+inverted" if m == "msd" else "none"), None)
           for m in ("sds", "vsd", "sdi", "msd")}
    out["ism"] = (replace(run, method="ism"), lambda: ISM(models["main"], warmup_steps=warm, **base))
    out["csd"] = (replace(run, method="csd"), lambda: CSD(models["main"], **noisy))
    out["nfsd"] = (replace(run, method="nfsd"), lambda: NFSD(models["main"], **noisy))
    out["nfsd_weakneg"] = (replace(run, method="nfsd", label="weakneg"),
                           lambda: NFSD(models["main"], negative_model=models["weak"], **noisy))
    out["sjc"] = (replace(run, method="sjc"), lambda: SJC(models["main"], **base))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="quick testbed models, 2 images per class, budget 96")
    p.add_argument("--out", default=None, help="output path without suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        cfg_, training = study.quick_config(), QUICK_TRAINING
    else:
        cfg_, training = replace(study.DigitsConfig(), particles_per_class=8, budget=1600), FULL_TRAINING
    out = Path(args.out) if args.out else (Path("outputs/digits_distillers_quick") if args.quick
                                           else RESULTS / "digits_distillers")
    out.parent.mkdir(parents=True, exist_ok=True)
    _, models, ref = load_testbed(training, progress=False)
    base_run = study.Run("sds", "pixels", cfg_.main_scale)
    rows, t0 = [], time.time()
    for name, (run, make) in distillers(base_run, models, cfg_).items():
        start = time.time()
        _, record = study.optimise(run, models, ref, cfg_, distiller=None if make is None else make())
        final = record["final"]
        rows.append({"method": name, "key": run.key, "steps": record["steps"], "nfe": record["nfe"],
                     "seconds": round(time.time() - start, 1), **{k: final[k] for k in METRICS}})
        print(f"{name:>13} steps={record['steps']:5d} nfe={record['nfe']:7.1f} fd={final['fd']:8.2f} "
              f"acc={final['accuracy']:.3f} div={final['diversity']:.2f} ({rows[-1]['seconds']} s)", flush=True)
    result = {"benchmark": "digits_distillers", "quick": args.quick, "budget_per_image": cfg_.budget,
              "particles_per_class": cfg_.particles_per_class, "scale_w": cfg_.main_scale, "param": "pixels",
              "rows": rows, "seconds": round(time.time() - t0, 1)}
    write_json_atomic(out.with_suffix(".json"), result)
    lines = [f"Digits, pixels, CFG w = {cfg_.main_scale:g}, {cfg_.particles_per_class} images per class, "
             f"budget {cfg_.budget} model evaluations per image.", "",
             "| method | FD | FD class | acc. | NN train | copies | diversity | steps | NFE |", "|---|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['method']} | {r['fd']:.2f} | {r['fd_class']:.1f} | {r['accuracy']:.3f} | "
                     f"{r['nn_train']:.2f} | {r['copy_rate']:.3f} | {r['diversity']:.2f} | {r['steps']} | {r['nfe']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
