r"""Text-to-2D with every distiller (same as `python -m diffsolve.integrations.t2i_cli` and `diffsolve t2i`).

    python benchmarks/text2image.py --model /path/to/stable-diffusion --methods msd sds
    accelerate launch --num_processes 8 benchmarks/text2image.py --model /path/to/stable-diffusion \
        --seeds 0 1 2 --inception /path/to/inception.pth --clip /path/to/clip   # -> runs/text2image/results.json
    python benchmarks/text2image.py --dry-run --tiny   # NFE per step -> benchmarks/results/text2image_nfe.json

See docs/stable-diffusion.md for what each run writes and how the processes' results are merged.
"""
import sys

from diffsolve.integrations.t2i_cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
