"""How the 2D study's metrics move with the Monte Carlo sample count N (fractal, learned column).

The full study averages N = 2 estimates per point and gradient (the paper: 10^3). This reruns SDS and
MSD at N in {1, 2, 8} on a 32 x 32 grid and writes benchmarks/results/toy2d_ablation.json.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve_studies.toy import study  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ns", default="1,2,8")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "toy2d_ablation.json"))
    a = p.parse_args(argv)
    ds = study.load_dataset("fractal", progress=False)
    model, transforms, inversion = study.column_model(ds, "learned", study.StudyConfig())
    rows = []
    for n in [int(v) for v in a.ns.split(",")]:
        cfg = replace(study.StudyConfig(), grid=a.grid, n_mc=n)
        for method in ("sds", "msd"):
            t0 = time.perf_counter()
            pts, nfe, _ = study.optimise(method, model, transforms, inversion, "learned", study.grid_points(a.grid), cfg,
                                         torch.Generator().manual_seed(0))
            rows.append({"n_mc": n, "method": method, "seconds": time.perf_counter() - t0, "nfe_per_step": nfe,
                         **study.evaluate(pts, ds)})
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()})
    write_json_atomic(a.out, {"benchmark": "toy2d_ablation", "dataset": "fractal", "column": "learned",
                              "grid": a.grid, "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
