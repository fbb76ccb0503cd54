"""Guided DDIM on the fractal (class A) at several guidance scales: NLL, precision, recall.

The study reads the paper's "CFG=4" as Karras g = 4 (and g = 3 for autoguidance). This measures how
the DDIM baseline moves with g, to compare with the paper's DDIM cells. Writes
benchmarks/results/toy2d_guidance_scale.json.
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve_studies.toy import study  # noqa: E402


def main():
    ds = study.load_dataset("fractal", progress=False)
    rows = []
    for g in (1.5, 2.0, 3.0, 4.0):
        cfg = replace(study.StudyConfig(), cfg_scale=g, autoguidance_scale=g)
        for column in ("cfg", "autoguidance"):
            model, transforms, _ = study.column_model(ds, column, cfg)
            pts, nfe = study.ddim_samples(model, transforms, cfg.grid ** 2, cfg, torch.Generator().manual_seed(0))
            rows.append({"column": column, "g": g, **study.evaluate(pts, ds)})
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()})
    write_json_atomic(RESULTS / "toy2d_guidance_scale.json", {"benchmark": "toy2d_guidance_scale", "rows": rows,
                                                             "machine": machine_info()})


if __name__ == "__main__":
    main()
