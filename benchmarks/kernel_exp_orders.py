"""The kernel-exact exponential integrator (`KernelExponential`, solver "kernel_exp") on MSD's kernel product ODE:
observed orders against the chain's own converged limit (cross-checked against Heun + Strang splitting), the split
solvers at equal steps beside, the chain's bias against the closed-form product mean (what it does not fix), and
a stability sweep over sigma |dsigma| / lambda^2 where the explicit score face under Euler blows up.
Writes benchmarks/results/kernel_exp_orders.json (quoted in docs/samplers.md). About 3 minutes on one core."""
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffsolve as ds  # noqa: E402
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402
from diffsolve.solvers.kernel_exp import KernelExponential  # noqa: E402
from diffsolve.testing import log_slope  # noqa: E402
from diffsolve_studies.toy.datasets import three_component_mixture  # noqa: E402

F64 = torch.float64
GMM = three_component_mixture()
LAM, SIGMA_MIN, SIGMA_MAX = 0.5, 0.02, 5.0
NS = (16, 32, 64, 128, 256)


def points(rows=32, seed=3, spread=SIGMA_MAX):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, generator=g, dtype=F64)
    return x, x + spread * torch.randn(rows, 2, generator=g, dtype=F64)


def product_ode(solver, steps, splitting="lie"):
    """The deterministic kernel product ODE (eta = 0), centres x, from x + 5 n; log-uniform [0.02, 5], `steps`
    steps, no final 0 (tests/test_kernel_exp.py's problem)."""
    x, z0 = points()
    kernel = ds.gaussian_kernel(x, LAM, face="split", splitting=splitting)
    sigmas = ds.sigmas_log_uniform(steps + 1, SIGMA_MIN, SIGMA_MAX, append_zero_=False)
    return ds.sample(solver, GMM, z0.clone(), sigmas, transforms=[kernel], return_info=True)


def orders():
    ref, _ = product_ode(KernelExponential(3), 2048)
    heun, _ = product_ode(ds.Heun(), 4096, "strang")
    gap = float((ref - heun).norm(dim=1).mean())
    print(f"limit: order 3 at 2048 steps vs Heun + Strang at 4096: {gap:.3e}")
    rows = []
    cases = [(f"kernel_exp order {o}, weights {w}", KernelExponential(o, 0.0, w), "lie", o if w == "exact" or o < 3 else 2)
             for o in (1, 2, 3) for w in (("exact",) if o == 1 else ("exact", "kdiffusion"))]
    cases += [("split: dpmpp_2m (flow after the step, integrating-factor form)", ds.DPMpp2M(), "lie", 2),
              ("split: heun + strang", ds.Heun(), "strang", 2), ("split: ddim (Lie)", ds.DDIM(), "lie", 1)]
    for name, solver, splitting, nominal in cases:
        ns = NS + ((512, 1024) if nominal == 1 else ())
        errors, nfe = [], []
        for n in ns:
            y, info = product_ode(solver, n, splitting)
            errors.append(float((y - ref).norm(dim=1).mean()))
            nfe.append(info.nfe)
        rows.append({"solver": name, "steps": list(ns), "nfe": nfe, "errors": errors, "nominal_order": nominal,
                     "order_last3": log_slope(ns[-3:], errors[-3:]),
                     "orders_by_window": [log_slope(ns[i:i + 3], errors[i:i + 3]) for i in range(len(ns) - 2)]})
        print(f"{name}: order {rows[-1]['order_last3']:.2f}, errors {['%.2e' % e for e in errors]}")
    return {"problem": "three_component_mixture, 32 points x (centres), z0 = x + 5 n, lambda 0.5, eta 0, "
                       "log-uniform sigma grid [0.02, 5] without a final 0; error = mean |z - limit| over points",
            "limit": "kernel_exp order 3 at 2048 steps", "limit_vs_heun_strang_4096": gap, "rows": rows}


def bias():
    """|E y - x'| for the chain from x + 5 n to 0 (Karras grid, 4000 samples) against the closed-form product
    mean x' = E[p(y) G(x - y)] (GaussianMixture.product_with_gaussian), converged in the steps."""
    out = []
    n = 4000
    for x in (torch.tensor([0.2, 0.6], dtype=F64), torch.tensor([-0.8, 0.9], dtype=F64)):
        z0 = x + SIGMA_MAX * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        for lam in (0.3, 1.0, 3.0):
            product = GMM.product_with_gaussian(x, lam / math.sqrt(2))
            mean = product.mean()
            se = float((product.covariance().diagonal() / n).sqrt().norm())
            for eta in (0.0, 1.0):
                kernel = ds.gaussian_kernel(x.expand(n, 2), lam, face="split")
                runs = {steps: ds.sample(KernelExponential(2 if eta else 3, eta), GMM, z0.clone(),
                                         ds.sigmas_karras(steps, 0.002, SIGMA_MAX), transforms=[kernel],
                                         noise_sampler=ds.seeded_noise(z0, 1))
                        for steps in (128, 256)}
                y = runs[256]
                miss = float((y.mean(0) - mean).norm())
                out.append({"x": x.tolist(), "lambda": lam, "eta": eta, "steps": 256,
                            "steps_128_vs_256_mean_gap": float((runs[128].mean(0) - y.mean(0)).norm()),
                            "bias": miss, "monte_carlo_se": se,
                            "relative_bias": miss / float((mean - x).norm()), "product_mean": mean.tolist(),
                            "chain_mean": y.mean(0).tolist()})
                print(f"bias x={x.tolist()} lam={lam} eta={eta}: {miss:.4f} (se {se:.4f}), relative "
                      f"{out[-1]['relative_bias']:.3f}")
    return out


def stability():
    ratios = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
    x, z0 = points(8, spread=2.0)
    sigmas = ds.sigmas_log_uniform(9, 0.05, 2.0, append_zero_=False)  # 8 steps
    s = [float(v) for v in sigmas]
    worst = max(s[i] * (s[i] - s[i + 1]) for i in range(len(s) - 1))
    rows = []
    for r in ratios:
        lam = math.sqrt(worst / r)
        ref = ds.sample(ds.Heun(), GMM, z0.clone(), ds.sigmas_log_uniform(1025, 0.05, 2.0, append_zero_=False),
                        transforms=[ds.gaussian_kernel(x, lam, face="split", splitting="strang")])
        err = lambda y: float((y - ref).norm(dim=1).max())  # noqa: E731
        row = {"ratio_max_sigma_dsigma_over_lambda2": r, "lambda": lam}
        for o in (1, 2, 3):
            row[f"kernel_exp_{o}"] = err(ds.sample(KernelExponential(o), GMM, z0.clone(), sigmas,
                                                   transforms=[ds.gaussian_kernel(x, lam, face="split")]))
        row["split_ddim_lie"] = err(ds.sample(ds.DDIM(), GMM, z0.clone(), sigmas,
                                              transforms=[ds.gaussian_kernel(x, lam, face="split")]))
        row["score_face_euler"] = err(ds.sample(ds.Euler(), GMM, z0.clone(), sigmas,
                                                transforms=[ds.gaussian_kernel(x, lam)], check_finite=False))
        rows.append(row)
        print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()})
    return {"setup": "8 points, z0 = x + 2 n, 8 log-uniform steps 2 -> 0.05, lambda set by the largest "
                     "sigma |dsigma| / lambda^2 of the grid; max |z - reference| over points, reference 1024 "
                     "Heun + Strang steps", "rows": rows}


def main():
    torch.set_num_threads(1)
    start = time.time()
    data = {"machine": machine_info(), "orders": orders(), "bias": bias(), "stability": stability()}
    data["seconds"] = time.time() - start
    write_json_atomic(RESULTS / "kernel_exp_orders.json", data)


if __name__ == "__main__":
    main()
