"""The paper's 2D studies: Tables 1-3 and Figures 1-3 (same as `diffsolve toy`, which writes to ./outputs/toy).

    python benchmarks/toy2d.py            # full study -> benchmarks/results/toy2d.{json,md}, docs/figures/
    python benchmarks/toy2d.py --quick    # tiny settings -> ./outputs/toy/quick (see --help for the time)

Only the full study regenerates the committed results, so only it gets their paths (an explicit --out or
--figures wins). Trained models are cached (DIFFSOLVE_CACHE or ~/.cache/diffsolve); runs resume from the
output folder (diffsolve_studies.toy.run).
"""
import sys
from pathlib import Path

from diffsolve_studies.toy.run import main

ROOT = Path(__file__).resolve().parents[1]


def committed_paths(argv):
    argv = list(argv)
    if "--quick" in argv:
        return argv
    for flag, path in (("--out", ROOT / "benchmarks" / "results"), ("--figures", ROOT / "docs" / "figures")):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, str(path)]
    return argv


if __name__ == "__main__":
    main(committed_paths(sys.argv[1:]))
