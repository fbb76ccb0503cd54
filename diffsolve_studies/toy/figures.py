"""Figures in the style of the paper's Figures 1-3: optimised points over the density, and the
reconstructed loss landscapes (needs matplotlib)."""
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import torch

from diffsolve._io import atomic_write
from . import study

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LIM = 1.5


def _log_density(density, n=160):
    t = torch.linspace(-LIM, LIM, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(t, t, indexing="xy")
    return density.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(n, n).clamp(min=-8).numpy()


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)
    return path


def study_figures(results, datasets, out_dir, figures_dir, cache_dir=None, iterations_scale=1.0, cfg=None,
                  note=None):
    """The points and landscape figures of each data set; `note`: a line printed above the points figure
    (what the run is, e.g. the quick mode's settings). Each panel gives the mean distance of the points to
    the nearest mode of the density at the start and at the end."""
    paths = []
    for name in datasets:
        density, _ = study.dataset_density(name, 2000)
        logp = _log_density(density)
        cols = study.COLUMNS[name]
        fig, axes = plt.subplots(len(cols), len(study.METHODS), figsize=(2.4 * len(study.METHODS), 2.4 * len(cols)),
                                 squeeze=False)
        for r, column in enumerate(cols):
            for c, method in enumerate(study.METHODS):
                ax = axes[r, c]
                ax.imshow(logp, extent=(-LIM, LIM, -LIM, LIM), origin="lower", cmap="Greys", alpha=0.6)
                f = Path(out_dir) / "toy2d_points" / f"{name}_{column}_{method}.npy"
                if f"{name}/{column}/{method}" in results["runs"] and f.exists():  # verified by the runner
                    pts = np.load(f)
                    ax.scatter(pts[:, 0], pts[:, 1], s=0.5, c="tab:orange")
                    run = results["runs"][f"{name}/{column}/{method}"]
                    ax.set_title(f"{method.upper()} NLL {run['metrics']['nll']:.2f}", fontsize=8)
                    if "mode_distance" in run:
                        d = run["mode_distance"]
                        ax.text(0.02, 0.02, f"mode dist {d['start']:.2f} -> {d['end']:.2f}", fontsize=6,
                                transform=ax.transAxes, color="k",
                                bbox=dict(facecolor="w", alpha=0.7, pad=1, linewidth=0))
                ax.set_xlim(-LIM, LIM), ax.set_ylim(-LIM, LIM), ax.set_xticks([]), ax.set_yticks([])
            axes[r, 0].set_ylabel(column)
        if note:
            fig.suptitle("\n".join(textwrap.wrap(note, 16 * len(study.METHODS))), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.93) if note else (0, 0, 1, 1))
        paths.append(_save(fig, Path(figures_dir) / f"toy2d_{name}_points.png"))
        lands = {k: v for k, v in results["landscapes"].items() if k.startswith(f"{name}/")}
        if lands:
            fig, axes = plt.subplots(len(lands), 4, figsize=(9.6, 2.4 * len(lands)), squeeze=False)
            for r, (key, per) in enumerate(lands.items()):
                for c, method in enumerate(study.METHODS[1:]):
                    ax = axes[r, c]
                    loss = -np.asarray(per[method])  # the integrated potential of -grad: high = preferred
                    ax.imshow(loss, extent=(-LIM, LIM, -LIM, LIM), origin="lower", cmap="viridis")
                    ax.contour(np.linspace(-LIM, LIM, logp.shape[0]), np.linspace(-LIM, LIM, logp.shape[0]), logp,
                               levels=[-2.0], colors="w", linewidths=0.5)
                    ax.set_title(f"{method.upper()}", fontsize=8)
                    ax.set_xticks([]), ax.set_yticks([])
                axes[r, 0].set_ylabel(key.split("/")[1])
            fig.tight_layout()
            paths.append(_save(fig, Path(figures_dir) / f"toy2d_{name}_landscapes.png"))
    return paths
