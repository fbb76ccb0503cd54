"""The digits testbed (same as `diffsolve digits`): class-conditional diffusion on scikit-learn's digits,
and SDS / VSD / SDI / MSD at equal NFE against DDIM samples.

    python benchmarks/digits.py            # full study -> benchmarks/results/digits.json, digits.md, figures
    python benchmarks/digits.py --quick    # seconds; every method runs
"""
import sys

from diffsolve_studies.digits.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
