"""Tables (markdown) and figures (convergence curves, image grids) of a digits study's JSON."""
from pathlib import Path

import numpy as np

from diffsolve._io import atomic_write

COLS = (("fd", "FD", "{:.2f}"), ("fd_class", "FD class", "{:.1f}"), ("accuracy", "acc.", "{:.3f}"),
        ("nn_train", "NN train", "{:.2f}"), ("copy_rate", "copies", "{:.3f}"), ("diversity", "diversity", "{:.2f}"),
        ("nll_bpp", "NLL bpp", "{:.2f}"))


def _row(label, rec, extra=()):
    f = rec["final"]
    cells = [(fmt.format(f[k]) if f.get(k) is not None and np.isfinite(f[k]) else "—") for k, _, fmt in COLS]
    return "| " + " | ".join([label, *cells, *extra]) + " |"


def _header(extra=()):
    names = ["run", *[n for _, n, _ in COLS], *extra]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def tables(results):
    """The study as markdown: testbed checks, the equal-NFE table, heuristics, schedules, termination."""
    cfg, runs, tb = results["config"], results["runs"], results["testbed"]
    out = ["## Testbed", "",
           f"classifier accuracy on held-out images {tb['classifier_heldout_accuracy']:.3f}; model NLL of held-out "
           f"images {tb['heldout_nll_bpp']:.2f} bpp (uniform over 17 levels: {tb['uniform_nll_bpp']:.2f})", "",
           _header()]
    for name, label in (("unseen", "unseen real images"), ("train", "training images (= copies)")):
        if name in tb["real_images"]:
            out.append(_row(f"{label}, {cfg['particles_per_class']}/class", {"final": tb["real_images"][name]}))
    for k, r in runs.items():
        if r["run"]["method"] == "ddim":
            out.append(_row(f"DDIM {r['run']['guidance']} w={r['run']['scale']:g} ({r['nfe']:.0f} NFE)", r))
    extra = ("steps", "NFE")
    for param in ("pixels", "mlp"):
        sel = {k: r for k, r in runs.items() if r["run"].get("param") == param and r["run"]["method"] != "ddim"}
        if not sel:
            continue
        out += ["", f"## Equal NFE, {param} (budget {cfg['budget']} model evaluations per image)", "", _header(extra)]
        for k, r in sel.items():
            out.append(_row(k.split("/", 2)[0] + "/" + k.split("/", 2)[2], r, (str(r["steps"]), f"{r['nfe']:.0f}")))
        term = [(k, r) for k, r in sel.items() if r["run"]["method"] == "msd"]
        if term:
            out += ["", f"Termination (§4.5: lambda < {cfg['lam_stop']:g}), {param}:", "",
                    "| run | stops at NFE | FD there | best FD (NFE) | final FD |", "|---|---|---|---|---|"]
            for k, r in term:
                stop, curve = r.get("termination"), r["curve"]
                best = min(curve, key=lambda c: c["fd"])
                there = "—" if stop is None else f"{stop['fd']:.2f}"
                out.append(f"| {k} | {'never' if stop is None else stop['nfe']:} | {there} | "
                           f"{best['fd']:.2f} ({best['nfe']:.0f}) | {curve[-1]['fd']:.2f} |")
    return "\n".join(out) + "\n"


def write_report(results, out_dir, figures=True, fig_dir=None):
    out_dir = Path(out_dir)
    stem = results.get("name", "digits")
    atomic_write(out_dir / f"{stem}.md", lambda f: f.write(tables(results).encode()))
    if figures:
        fig_dir = Path(fig_dir) if fig_dir else out_dir / "figures"
        convergence_figure(results, fig_dir / "digits_convergence.png")
        grid_figure(results, out_dir / f"{stem}_images", fig_dir / "digits_grids.png")


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def convergence_figure(results, path):
    """FD and accuracy against model evaluations for each method at the main scale (the paper's Figure 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg, runs = results["config"], results["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for j, param in enumerate(("pixels", "mlp")):
        for k, r in runs.items():
            rr = r["run"]
            if rr["method"] == "ddim" or rr["param"] != param or rr["scale"] != cfg["main_scale"] \
                    or rr["guidance"] != "cfg" or rr.get("schedule", "loglinear") != "loglinear":
                continue
            if rr["heuristics"] not in ("none", "interval+inverted"):
                continue
            nfe = [c["nfe"] for c in r["curve"]]
            style = "-" if rr["heuristics"] != "none" or rr["method"] != "msd" else ":"
            label = rr["method"].upper() + (" (no heuristics)" if rr["method"] == "msd" and rr["heuristics"] == "none" else "")
            axes[0, j].plot(nfe, [c["fd"] for c in r["curve"]], style, label=label)
            axes[1, j].plot(nfe, [c["accuracy"] for c in r["curve"]], style, label=label)
        for k, r in runs.items():
            if r["run"]["method"] == "ddim" and r["run"]["scale"] == cfg["main_scale"] and r["run"]["guidance"] == "cfg":
                axes[0, j].axhline(r["final"]["fd"], color="k", lw=0.8, ls="--", label="DDIM")
                axes[1, j].axhline(r["final"]["accuracy"], color="k", lw=0.8, ls="--", label="DDIM")
        axes[0, j].set_title(f"{param}, CFG w = {cfg['main_scale']:g}")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("model evaluations per image")
        axes[0, j].legend(fontsize=7)
    axes[0, 0].set_ylabel("Fréchet distance (classifier features)")
    axes[1, 0].set_ylabel("target-class accuracy")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def grid_figure(results, image_dir, path, per_class=4):
    """Final images at the main scale, classes in rows: DDIM, then each method on pixels (top row of panels)
    and on the coordinate MLP (bottom row); MSD with the paper's heuristics and without."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .._parts import slug
    cfg, runs = results["config"], results["runs"]

    def shown(r):
        rr = r["run"]
        return (rr["scale"] == cfg["main_scale"] and rr["guidance"] == "cfg" and rr.get("schedule", "loglinear") == "loglinear"
                and (rr["method"] == "ddim" or rr["heuristics"] == "none"
                     or (rr["method"] == "msd" and rr["heuristics"] == "interval+inverted")))
    rows = [[k for k, r in runs.items() if shown(r) and r["run"]["method"] == "ddim"
             or shown(r) and r["run"].get("param") == p] for p in ("pixels", "mlp")]
    ncols, ppc = max(len(r) for r in rows), cfg["particles_per_class"]
    k_show = min(per_class, ppc)
    fig, axes = plt.subplots(2, ncols, figsize=(1.25 * ncols, 6.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, keys in enumerate(rows):
        for ax, key in zip(axes[i], keys):
            x = np.load(Path(image_dir) / f"{slug(key)}.npy").astype(np.float32).reshape(10, ppc, 8, 8)[:, :k_show]
            ax.imshow(np.clip(x.transpose(0, 2, 1, 3).reshape(80, 8 * k_show), -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_title(key.replace("/cfg", "").replace("/interval+inverted", "\n+heuristics").replace("/loglinear", "")
                         .replace("/none", "").replace("/pixels", "\npixels").replace("/mlp", "\nMLP"), fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
