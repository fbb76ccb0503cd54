"""The paper's 2D studies: Tables 1-3 and Figures 1-3 (same as `diffsolve toy`, which writes to ./outputs/toy).

    python benchmarks/toy2d.py            # full study -> benchmarks/results/toy2d.{json,md}, docs/figures/
    python benchmarks/toy2d.py --quick    # tiny settings -> ./outputs/toy/quick (see --help for the time)

Only the full study regenerates the committed results, so only it gets their paths (an explicit --out or
--figures wins). Trained models are cached (DIFFSOLVE_CACHE or ~/.cache/diffsolve); runs resume from the
output folder (diffsolve_studies.toy.run).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import committed_paths  # noqa: E402
from diffsolve_studies.toy.run import main  # noqa: E402

if __name__ == "__main__":
    main(committed_paths(sys.argv[1:]))
