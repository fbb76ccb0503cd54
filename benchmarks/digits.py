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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import committed_paths  # noqa: E402
from diffsolve_studies.digits.run import main  # noqa: E402

if __name__ == "__main__":
    main(committed_paths(sys.argv[1:]))
