"""The digits testbed (same as `diffsolve digits`, which writes to ./outputs/digits): class-conditional
diffusion on scikit-learn's digits, and SDS / VSD / SDI / MSD at equal NFE against DDIM samples.

    python benchmarks/digits.py            # full study -> benchmarks/results/digits.json, digits.md, docs/figures/
    python benchmarks/digits.py --seed 1   # second seed -> benchmarks/results/digits_seed1.json
    python benchmarks/digits.py --quick    # tiny settings -> ./outputs/digits/quick (see --help for the time)

Only the full study regenerates the committed results, so only it gets their paths (an explicit --out or
--figures wins).
"""
import sys
from pathlib import Path

from diffsolve_studies.digits.run import main

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
