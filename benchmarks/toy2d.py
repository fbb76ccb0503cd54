"""The paper's 2D studies: Tables 1-3 and Figures 1-3 (same as `diffsolve toy`).

    python benchmarks/toy2d.py            # full study -> benchmarks/results/toy2d.{json,md}, docs/figures/
    python benchmarks/toy2d.py --quick    # under a minute, for tests

Trained models are cached (DIFFSOLVE_CACHE or ~/.cache/diffsolve); runs resume from the JSON.
"""
import sys

from diffsolve_studies.toy.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
