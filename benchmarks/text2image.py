r"""Text-to-2D with every distiller (same as `python -m diffsolve.integrations.t2i_cli` and `diffsolve t2i`,
which write to ./outputs/t2i).

    python benchmarks/text2image.py --model /path/to/stable-diffusion --methods msd sds
    accelerate launch --num_processes 8 benchmarks/text2image.py --model /path/to/stable-diffusion \
        --seeds 0 1 2 --inception /path/to/inception.pt --clip /path/to/clip   # -> runs/text2image/results.json
    python benchmarks/text2image.py --dry-run --tiny   # NFE per step -> benchmarks/results/text2image_nfe.json

This script passes `--out runs/text2image` and, for the committed NFE table, `--nfe-out
benchmarks/results/text2image_nfe.json` (explicit flags win). See docs/stable-diffusion.md for what each run
writes and how the processes' results are merged.
"""
import sys
from pathlib import Path

from diffsolve.integrations.t2i_cli import main

ROOT = Path(__file__).resolve().parents[1]


def committed_paths(argv):
    argv = list(argv)
    for flag, path in (("--out", "runs/text2image"), ("--nfe-out", ROOT / "benchmarks" / "results" /
                                                      "text2image_nfe.json")):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, str(path)]
    return argv


if __name__ == "__main__":
    main(committed_paths(sys.argv[1:]))
