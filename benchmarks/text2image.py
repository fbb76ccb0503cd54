"""Text-to-2D with every distiller (same as `python -m diffsolve.integrations.text2image`).

    python benchmarks/text2image.py --model /path/to/stable-diffusion --methods msd sds
    python benchmarks/text2image.py --dry-run --tiny   # NFE per step -> benchmarks/results/text2image_nfe.json
"""
import sys

from diffsolve.integrations.text2image import main

if __name__ == "__main__":
    main(sys.argv[1:])
