"""How well does each chain sample the MSD product density p(y) G(x - y)? (paper §3.3, eq. 8-12)

On a 3-component 2D Gaussian mixture the product is again a mixture, so the exact mean-shift iterate
x' = D(x; lambda / sqrt(2)) is known. For several bandwidths this measures the relative bias
|E y - x'| / |x' - x| of (i) the posterior chain (reverse SDE, eta = 1, started at z = x at
sigma = lambda / sqrt(2)), and (ii) the paper's kernel-guided chain from x + sigma_max n (eta = 0 and
eta = 1; explicit "score" face and exact "split" face), at several step counts, with NFE.
Writes benchmarks/results/product_sampling.json.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve_studies.toy.datasets import three_component_mixture as mixture  # noqa: E402

X = torch.tensor([0.2, 0.6], dtype=torch.float64)


def relative_bias(y, exact):
    mean = y.mean(0)
    if not torch.isfinite(mean).all():
        return float("inf")
    return ((mean - exact).norm() / (exact - X).norm()).item()


def run(n_samples, steps_list, bandwidths, sigma_max=10.0):
    gmm, rows = mixture(), []
    for lam in bandwidths:
        s = lam / math.sqrt(2)
        exact = gmm.denoise(X[None], s)[0]
        for n in steps_list:
            z = X.expand(n_samples, 2).clone()
            y, info = ds.sample_ddim(gmm, z, ds.sigmas_karras(n, 0.002, s), eta=1.0, disable=True,
                                     noise_sampler=ds.seeded_noise(z, 0), check_finite=False, return_info=True)
            rows.append(dict(chain="posterior", bandwidth=lam, steps=n, eta=1.0, face="-", nfe=info.nfe,
                             relative_bias=relative_bias(y, exact)))
            z0 = X + sigma_max * torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64)
            for eta in (0.0, 1.0):
                for face in ("score", "split"):
                    kernel = ds.gaussian_kernel(X.expand(n_samples, 2), lam, face=face)
                    y, info = ds.sample_ddim(gmm, z0, ds.sigmas_karras(n, 0.002, sigma_max), eta=eta,
                                             transforms=[kernel], disable=True, check_finite=False,
                                             noise_sampler=ds.seeded_noise(z0, 1), return_info=True)
                    rows.append(dict(chain="kernel-guided", bandwidth=lam, steps=n, eta=eta, face=face,
                                     nfe=info.nfe, relative_bias=relative_bias(y, exact)))
            print(f"lambda {lam} steps {n}: " + ", ".join(
                f"{r['chain']}/{r['face']}/eta{r['eta']:g}={r['relative_bias']:.3g}" for r in rows[-5:]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "product_sampling.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    n_samples, steps = (2000, [16]) if a.quick else (20000, [16, 64, 256])
    t0 = time.perf_counter()
    rows = run(n_samples, steps, [0.1, 0.3, 1.0, 3.0])
    write_json_atomic(a.out, {"benchmark": "product_sampling", "samples": n_samples, "x": X.tolist(),
                              "sigma_max": 10.0, "rows": rows, "seconds": time.perf_counter() - t0,
                              "machine": machine_info()})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
