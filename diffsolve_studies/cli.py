"""Command line: `diffsolve demo`, `diffsolve toy`, `diffsolve digits`, `diffsolve t2i`. Outputs go to
./outputs/<command>/ (relative to the current folder) unless --out says otherwise; bad values are usage
errors (exit status 2, one line on stderr); options are never abbreviated."""
import sys
from pathlib import Path

import torch

from diffsolve._io import atomic_write
from diffsolve.runs import ArgumentParser, RunError, at_least, check_writable


def _save_figure(fig, path):
    """Write a matplotlib figure atomically."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))


def demo(out_dir="outputs/demo", n=2000, steps=32, seed=0):
    """Sample the fractal's class A with the ideal denoiser (paper eq. 16) by DDIM and Heun; write a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the test and bench extras
        raise SystemExit(f"the demo needs matplotlib (pip install 'diffsolve[bench]'): {e}")
    import diffsolve as ds
    from diffsolve.analytic import EmpiricalDenoiser
    from diffsolve_studies.toy import fractal_tree

    gen = torch.Generator().manual_seed(seed)
    tree = fractal_tree("A")
    data = tree.sample(10_000, generator=gen)
    ideal = EmpiricalDenoiser(data)
    sigmas = ds.sigmas_karras(steps, 0.002, 5.0)
    x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 5.0
    runs = {"DDIM (Euler), ideal denoiser": ds.sample_ddim(ideal, x0, sigmas, return_info=True),
            "Heun, ideal denoiser": ds.sample_heun(ideal, x0, sigmas, return_info=True)}
    grid = torch.linspace(-1.5, 1.5, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    logp = tree.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(200, 200)
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4 * (len(runs) + 1), 4), sharex=True, sharey=True)
    axes[0].imshow(logp.clamp(min=-10).numpy(), extent=(-1.5, 1.5, -1.5, 1.5), origin="lower", cmap="Oranges")
    axes[0].set_title("class A density (log)")
    def mode_distance(points):  # mean distance to the nearest component mean of the mixture
        return torch.cdist(points.to(torch.float64), tree.means.to(torch.float64)).min(1).values.mean().item()

    for ax, (name, (x, info)) in zip(axes[1:], runs.items()):
        nll = -tree.log_prob(x).mean().item()
        ax.scatter(x[:, 0], x[:, 1], s=1, c="tab:orange")
        ax.set_title(f"{name}\nNFE {info.nfe:.0f}, NLL {nll:.2f}")
        ax.text(0.02, 0.02, f"mode dist {mode_distance(x0):.2f} -> {mode_distance(x):.2f}", fontsize=8,
                transform=ax.transAxes)
        print(f"{name}: NFE {info.nfe:.0f}, NLL under the true density {nll:.3f}, mean distance to the nearest mode "
              f"{mode_distance(x0):.2f} -> {mode_distance(x):.2f}")
    for ax in axes:
        ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(out_dir) / "fractal_ideal.png"
    _save_figure(fig, path)
    print(f"figure: {path}")
    return path


COMMANDS = {"toy": "the paper's 2D studies (Tables 1-3, Figures 1-3); see diffsolve toy --help",
            "digits": "class-conditional diffusion on scikit-learn's digits; see diffsolve digits --help",
            "t2i": "text-to-2D with SDS/VSD/SDI/MSD through Stable Diffusion; see diffsolve t2i --help"}


def _parser():
    parser = ArgumentParser(prog="diffsolve", description=" ".join(__doc__.split()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,toy,digits,t2i}")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    p = sub.add_parser("demo", help="sample the fractal with the ideal denoiser and write a PNG (about 40 s of CPU "
                       "time)")
    p.add_argument("--out", default="outputs/demo", help="folder of the figure, relative to the current folder")
    p.add_argument("--n", type=at_least(1), default=2000, help="points sampled per sampler")
    p.add_argument("--steps", type=at_least(1), default=32, help="sampler steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial noise")
    return parser, p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["toy"]:  # the 2D studies have their own options (diffsolve toy --help)
        from .toy.run import main as toy_main
        toy_main(argv[1:])
        return 0
    if argv[:1] == ["digits"]:  # the 64-dimensional digits testbed (diffsolve digits --help)
        from .digits.run import main as digits_main
        digits_main(argv[1:])
        return 0
    if argv[:1] == ["t2i"]:  # text-to-2D through Stable Diffusion (diffsolve t2i --help)
        from diffsolve.integrations.t2i_cli import main as t2i_main
        t2i_main(argv[1:])
        return 0
    if argv[:1] == ["check"]:  # the diffsolve.testing suite on a sampler (diffsolve check --help)
        from .check import main as check_main
        return check_main(argv[1:])
    parser, demo_parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            check_writable(args.out, "--out")
        except RunError as err:
            demo_parser.error(str(err))
        demo(args.out, args.n, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
