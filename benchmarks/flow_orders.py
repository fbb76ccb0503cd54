"""Observed order of the split kernel product ODE under Lie / Strang for a single-step (Heun) and a multistep
(DPM++ 2M) solver, bare and inside limited_interval; and the uncarried-history DPM++ 2M on the kernel-only
problem. Writes benchmarks/results/flow_orders.json (quoted in docs/samplers.md)."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import diffsolve as ds  # noqa: E402
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402
from _models import identity_model, log_slope  # noqa: E402
from test_solver_contract import StrangHalvesDPMpp2M, UncarriedDPMpp2M, product_ode_errors  # noqa: E402


def main():
    torch.set_num_threads(1)
    ns = [32, 64, 128, 256]
    rows = []
    for interval in (None, (0.2222, 1.7777)):
        for name, solver, splitting in (("heun", ds.Heun(), "lie"), ("heun", ds.Heun(), "strang"),
                                        ("dpmpp_2m", ds.DPMpp2M(), "lie"), ("dpmpp_2m", ds.DPMpp2M(), "strang"),
                                        ("dpmpp_2m, Strang half-flows forced", StrangHalvesDPMpp2M(), "strang")):
            errors = product_ode_errors(solver, splitting, interval, ns)
            rows.append({"solver": name, "splitting": splitting, "interval": interval, "steps": ns,
                         "errors": errors, "order": log_slope(ns[-3:], errors[-3:])})
            print(rows[-1]["solver"], splitting, interval, f"{rows[-1]['order']:.2f}")
    z0, c = torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    sigmas = ds.sigmas_karras(12, 0.05, 1.5, append_zero_=False)
    exact = math.exp(-(1.5 ** 2 - 0.05 ** 2))
    kernel = [ds.gaussian_kernel(c, 1.0, face="split")]
    uncarried = UncarriedDPMpp2M()
    uncarried.last = None
    miss = {"carried": float((ds.sample(ds.DPMpp2M(), identity_model, z0, sigmas, transforms=kernel) - exact).abs().max()),
            "uncarried": float((ds.sample(uncarried, identity_model, z0, sigmas, transforms=kernel) - exact).abs().max()),
            "exact": exact, "setup": "identity denoiser, lambda 1, 12 Karras steps 1.5 -> 0.05, z0 = 1, c = 0"}
    print(miss)
    write_json_atomic(RESULTS / "flow_orders.json", {"machine": machine_info(), "orders": rows, "kernel_only": miss,
                                                     "problem": "three_component_mixture, 32 points, lambda 1, "
                                                                "Karras [0.02, 5], reference 4096 Heun + Strang"})


if __name__ == "__main__":
    main()
