"""Runner of the digits testbed (benchmarks/digits.py, `diffsolve digits`): trains (or loads) the models,
checks the testbed, runs the comparison; resumable, into an output folder that one run owns
(`diffsolve.runs.RunFolder`: a lock, the options it was started with, the sha256 of every artifact).

    diffsolve digits                 # full study -> outputs/digits/digits.json, .md, figures/
    diffsolve digits --quick         # tiny models and budget: every method runs -> outputs/digits/quick/

Layout: <name>.run.json and <name>.manifest.jsonl (options, checksums), <name>_images/<run>.npy (final
images) with <run>.json (the run's record) beside it, <name>_images/_testbed.json, and the derived
<name>.json / <name>.md, rebuilt on every call from the parts that verify.
"""
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsolve._io import write_json
from diffsolve.runs import ArgumentParser, RunError, RunFolder, at_least, check_writable, environment
from .._parts import jsonable, load_runs, note_damaged, previous_config, save_run, slug
from . import study, train
from .data import dequantize, load_digits_split
from .evaluate import nll_bpp

QUICK_TRAINING = {"denoiser": dict(train.DENOISER, width=32, depth=1, iterations=60),
                  "weak": dict(train.WEAK_DENOISER, width=16, depth=1, iterations=30),
                  "classifier": dict(train.CLASSIFIER, width=32, iterations=60)}
FULL_TRAINING = {"denoiser": train.DENOISER, "weak": train.WEAK_DENOISER, "classifier": train.CLASSIFIER}
# wall times measured with OMP_NUM_THREADS=1 on a busy 2-core x86 server (its CPU time was half of it)
QUICK_TIME = "about 35 s with a cold model cache, 25 s warm"


def load_testbed(training, cache_dir=None, progress=True, seed=0):
    """The split, the three trained networks and the reference tensors the metrics use."""
    split = load_digits_split(seed=seed)
    models = {"main": train.train_denoiser(split, training["denoiser"], cache_dir, progress),
              "weak": train.train_denoiser(split, training["weak"], cache_dir, progress),
              "classifier": train.train_classifier(split, training["classifier"], cache_dir, progress)}
    g = torch.Generator().manual_seed(seed + 3)
    heldout = dequantize(split.heldout_images, g)
    # alternate held-out images of each class: the FD reference, and unseen real images for the floor
    rank = torch.zeros(len(split.heldout_labels), dtype=torch.long)
    for c in range(10):
        idx = torch.nonzero(split.heldout_labels == c).flatten()
        rank[idx] = torch.arange(len(idx))
    a, b = rank % 2 == 0, rank % 2 == 1
    ref = {"classifier": models["classifier"], "heldout_x": heldout[a], "heldout_labels": split.heldout_labels[a],
           "unseen_x": heldout[b], "unseen_labels": split.heldout_labels[b],
           "train_x": dequantize(split.train_images, g), "train_labels": split.train_labels}
    return split, models, ref


def testbed_checks(models, ref, cfg):
    """Is the testbed strong enough to judge anything? Classifier accuracy on held-out images, the model's
    held-out NLL, and real images measured like generated ones at the study's sample size: unseen
    held-out images (the floor of every metric) and training images (what memorised copies score)."""
    clf = ref["classifier"]
    with torch.no_grad():
        acc = float((clf(ref["unseen_x"]).argmax(1) == ref["unseen_labels"]).float().mean())
    labels, n = study.labels_for(cfg), cfg.particles_per_class
    rows = {}
    for name in ("unseen", "train"):
        x, y = ref[f"{name}_x"], ref[f"{name}_labels"]
        pick = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(10)])
        if len(pick) == len(labels):
            rows[name] = study.measure(x[pick], labels, ref)
            rows[name]["nll_bpp"] = study.likelihood(x[pick], labels, {"main": models["main"]}, cfg)
    nll = nll_bpp(models["main"], ref["unseen_x"], ref["unseen_labels"], steps=cfg.nll_steps,
                  sigma_max=cfg.sigma_max, probes=2, generator=torch.Generator().manual_seed(cfg.seed + 5))
    return {"classifier_heldout_accuracy": acc, "heldout_nll_bpp": nll, "real_images": rows,
            "uniform_nll_bpp": float(np.log2(17))}


def open_folder(out_dir, cfg, training, name="digits"):
    """The (unopened) RunFolder of study `name`; a <name>.json left by an older version must agree."""
    config = {**jsonable(asdict(cfg)), "training": jsonable(training), **environment()}
    return RunFolder(out_dir, name, config, previous=previous_config(Path(out_dir) / f"{name}.json", "training"))


def collect(folder, name, cfg, training):
    """The results dict (as <name>.json holds it) from the parts of `folder` that verify."""
    n = len(study.labels_for(cfg))
    results = {"name": name, "config": jsonable(asdict(cfg)), "training": jsonable(training),
               "runs": load_runs(folder, f"{name}_images", study.plan(cfg, ablations=True), (n, 64))}
    testbed = folder.read_json(f"{name}_images/_testbed.json")
    if testbed is not None:
        results["testbed"] = testbed
    return results


def run_study(cfg, training, out_dir, cache_dir=None, progress=True, json_name="digits.json", only=None,
              ablations=True, folder=None):
    """All runs of `study.plan(cfg)` (or those whose key contains `only`) in `out_dir`, resuming from the parts
    there that verify; writes each run's images (.npy) and record as it finishes, and the JSON after every run.
    `folder`: an open RunFolder of out_dir (else one is opened and held for the call)."""
    name = Path(json_name).stem
    if folder is None:
        with open_folder(out_dir, cfg, training, name) as folder:
            return run_study(cfg, training, out_dir, cache_dir, progress, json_name, only, ablations, folder)
    json_path, img_dir = folder.root / json_name, f"{name}_images"
    t0 = time.perf_counter()
    split, models, ref = load_testbed(training, cache_dir, progress)  # one split and one set of models for every seed
    results = collect(folder, name, cfg, training)
    note_damaged(json_path)
    results["training_seconds"] = {k: m.train_seconds for k, m in models.items()}
    if "testbed" not in results:
        results["testbed"] = testbed_checks(models, ref, cfg)
        folder.write_json(f"{img_dir}/_testbed.json", results["testbed"])
        write_json(json_path, results)
    runs = [r for r in study.plan(cfg, ablations=ablations) if only is None or only in r.key]
    for r in tqdm(runs, desc="digits runs", disable=not progress):
        if r.key in results["runs"]:
            continue
        start = time.perf_counter()
        labels = study.labels_for(cfg)
        if r.method == "ddim":
            x, nfe = study.ddim_reference(r, models, cfg, torch.Generator().manual_seed(cfg.seed))
            record = {"run": asdict(r), "nfe": nfe, "final": study.measure(x, labels, ref)}
        else:
            with tqdm(total=cfg.budget, desc=r.key, disable=not progress, leave=False) as bar:
                x, record = study.optimise(r, models, ref, cfg, bar)
        if torch.isfinite(x).all():
            record["final"]["nll_bpp"] = study.likelihood(x, labels, models, cfg)
        record["seconds"] = time.perf_counter() - start
        save_run(folder, f"{img_dir}/{slug(r.key)}", r.key, record, x.numpy().astype(np.float16))
        results["runs"][r.key] = record
        write_json(json_path, results)
    results["study_seconds_this_call"] = time.perf_counter() - t0
    write_json(json_path, results)
    return results


def _parser():
    p = ArgumentParser(prog="diffsolve digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"tiny models, 2 images per class, budget 96: {QUICK_TIME}")
    p.add_argument("--out", default=None, help="results folder, relative to the current folder (default: "
                   "outputs/digits, with --quick outputs/digits/quick)")
    p.add_argument("--figures", default=None, help="figures folder (default: <out>/figures)")
    p.add_argument("--cache-dir", default=None, help="trained models (default: $DIFFSOLVE_CACHE or "
                   "~/.cache/diffsolve)")
    p.add_argument("--budget", type=at_least(1), default=None, help="model evaluations per image per run, >= 1 "
                   f"(default: {study.DigitsConfig.budget}, with --quick {study.quick_config().budget})")
    p.add_argument("--only", default=None, help="run only the runs whose key contains this text (default: all)")
    p.add_argument("--seed", type=at_least(0), default=0, help="another seed (initial images, noise) of the same "
                   "trained models; writes digits_seed<N>.json and no figures")
    p.add_argument("--main-grid", action="store_true", help="only the DDIM references and the main table's runs")
    p.add_argument("--no-figures", action="store_true", help="tables only, no figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    cfg = study.quick_config() if args.quick else study.DigitsConfig()
    if args.budget is not None:
        cfg = replace(cfg, budget=args.budget)
    if args.seed:
        cfg = replace(cfg, seed=args.seed)
    if args.only is not None and not any(args.only in r.key for r in study.plan(cfg, ablations=not args.main_grid)):
        p.error(f"--only {args.only!r} matches no run (keys look like {study.plan(cfg)[-1].key!r})")
    training = QUICK_TRAINING if args.quick else FULL_TRAINING
    out = Path(args.out) if args.out else Path("outputs/digits/quick" if args.quick else "outputs/digits")
    figures = not args.no_figures and not args.seed
    fig_dir = Path(args.figures) if args.figures else out / "figures"
    cache = Path(args.cache_dir) if args.cache_dir else None
    name = ("digits-quick" if args.quick else "digits") + (f"_seed{args.seed}" if args.seed else "")
    try:
        check_writable(out, "--out")
        if figures:
            check_writable(fig_dir, "--figures")
        check_writable(cache if cache is not None else train.default_cache_dir(), "--cache-dir")
        folder = open_folder(out, cfg, training, name).open()
    except RunError as err:
        p.error(str(err))
    from .report import write_report
    with folder:
        results = run_study(cfg, training, out, cache, not args.no_progress, only=args.only,
                            json_name=f"{name}.json", ablations=not args.main_grid, folder=folder)
        write_report(results, out, figures=figures, fig_dir=fig_dir)
    return results
