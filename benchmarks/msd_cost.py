"""What MSD's product samplers cost: error of the samples against the closed-form product, per model call.

The product p(y) exp(-|x - y|^2 / lambda^2) of a Gaussian mixture p with the paper's kernel is the mixture's
posterior at noise level s = lambda / sqrt(2) (`GaussianMixture.product_with_gaussian(x, s)`): its mean (the
exact mean-shift iterate D(x; s)), covariance, component weights and exact samples are known. For every
estimator (the paper's kernel chain with matched and literal flow, the posterior chain under each reverse-SDE
solver and grid, the one-call estimate, the kernel-exact integrator where registered) and a model-call budget
C in CALLS (a model call: one network evaluation per sample), this measures on
  (a) the 2-D fractal (class A) with its exact denoiser, (b) the 3-component reference mixture of the tests,
  (c) a seeded 5-D mixture of 3 anisotropic Gaussians (eigenvalues 0.5 ... 0.002 in random rotations),
at three points each (near a mode, between modes, off the data) and lambda in LAMS:
  - the relative mean error |mean(y) - m| / |m - x| (m the exact iterate) and its standard error,
  - the relative Frobenius covariance error |Cov(y) - C|_F / |C|_F and its sampling floor,
  - at the between-modes point: the energy distance to exact product samples (unbiased, in blocks, with its
    standard error) and the mass of each mode (mean responsibility, whose exact value is the product's weight),
and (d) on the learned 2-D fractal model (`toy_models("fractal")["main"]`), the relative bias of the gradient
against the analytic truth on msd_variants.py's 8 x 8 grid at lambda 0.316 (with the exact denoiser beside it).
Every estimator has one setting for all problems. Writes benchmarks/results/msd_cost.json and
docs/figures/msd_cost.png; `--quick` is a seconds-long smoke run of the same code into --out / --figures.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, machine_info, write_json_atomic  # noqa: E402

from diffsolve.analytic import GaussianMixture  # noqa: E402
from diffsolve.distill import MSD, mean_shift_oracle  # noqa: E402
from diffsolve.solvers import SOLVERS  # noqa: E402
from diffsolve_studies.toy.datasets import fractal_tree, three_component_mixture  # noqa: E402

F64 = torch.float64
CALLS = (1, 2, 4, 8, 16, 32, 64)
LAMS = (0.1, 0.3, 1.0)
MEAN_GOAL, COV_GOAL, GOAL_CALLS = 0.02, 0.05, 8
JVP_FIRST = "jvp_first"
# chains that are the same recursion as another (checked sample for sample at startup: `identical_chains`)
SAME_AS = {"posterior euler_ancestral": "posterior ddim", "posterior kernel_exp order 1": "posterior ddim",
           "posterior kernel_exp order 2": "posterior dpmpp_2m_sde_heun"}


def estimators():
    """name -> MSD options; one setting each, the same for every problem (the kernel-exact integrator's rows
    appear when diffsolve.solvers registers "kernel_exp")."""
    post = lambda solver, **kw: dict(sampler="posterior", solver=solver, **kw)  # noqa: E731
    out = {
        "paper chain, matched flow": dict(sampler="kernel", face="split", flow="matched", solver="ddim", eta=1.0),
        "paper chain, literal flow": dict(sampler="kernel", face="split", flow="literal", solver="ddim", eta=1.0),
        "posterior ddim": post("ddim"),
        "posterior euler_ancestral": post("euler_ancestral"),
        "posterior dpmpp_sde": post("dpmpp_sde"),
        "posterior dpmpp_2m_sde": post("dpmpp_2m_sde"),
        "posterior dpmpp_2m_sde_heun": post("dpmpp_2m_sde_heun"),
        "posterior dpmpp_3m_sde": post("dpmpp_3m_sde"),
        # the grid: where the calls sit (rho = 1: uniform in sigma, more steps near s; a larger sigma_min
        # spends none below the data's finest scale)
        "posterior ddim, rho 1": post("ddim", rho=1.0),
        "posterior dpmpp_2m_sde, rho 1": post("dpmpp_2m_sde", rho=1.0),
        "posterior dpmpp_2m_sde, sigma_min 0.02": post("dpmpp_2m_sde", sigma_min=0.02),
        # the first step from z = x at s with the Gaussian posterior's covariance through one JVP (below)
        "posterior dpmpp_2m_sde, JVP first step": dict(sampler=JVP_FIRST, solver="dpmpp_2m_sde"),
        "one call": dict(sampler="one_call"),
    }
    if "kernel_exp" in SOLVERS:
        factory = SOLVERS["kernel_exp"]
        out["paper chain, kernel_exp"] = dict(sampler="kernel", face="split", solver=factory(order=1, eta=1.0))
        for k in (1, 2, 3):
            out[f"posterior kernel_exp order {k}"] = post(factory(order=k, eta=1.0))
    return out


# ----------------------------------------------------------------------------------------------- problems
class MixtureDenoiser:
    """The exact denoiser of a GaussianMixture, all rows at one sigma, written for many rows and components:
    D(x, s) = x - s^2 sum_k r_k(x) P_k (x - mu_k), P_k = (C_k + s^2 I)^-1, with the quadratic forms expanded,
    (x - mu)^T P (x - mu) = <x x^T, P> - 2 x . P mu + mu . P mu, so that the responsibilities r_k are a softmax of
    one matrix product over [x x^T, x, 1] and the sum over k two more (checked against GaussianMixture.denoise)."""

    def __init__(self, gmm):
        self.w, self.mu, self.covs = gmm.weights, gmm.means, gmm.covs
        self.eye = torch.eye(gmm.dim, dtype=gmm.means.dtype)
        self._cache = {}

    def _coefficients(self, s):
        if s not in self._cache:
            if len(self._cache) > 512:
                self._cache.clear()
            cov = self.covs + s * s * self.eye
            prec = torch.linalg.inv(cov)
            prec = 0.5 * (prec + prec.mT)
            self._cache[s] = (prec, torch.logdet(cov), prec.reshape(len(prec), -1), torch.einsum("kde,ke->kd", prec, self.mu))
        return self._cache[s]

    def __call__(self, x, sigma, **cond):
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        prec, logdet, flat, pmu = self._coefficients(s)
        r = log_terms(self.w, self.mu, prec, logdet, x).softmax(1)  # [B, K]
        b, d = x.shape
        px = torch.einsum("bde,be->bd", (r @ flat).reshape(b, d, d), x) - r @ pmu
        return x - (s * s) * px


def anisotropic_mixture(seed=0, dim=5):
    """3 Gaussians (weights 0.5 / 0.3 / 0.2), means ~ N(0, I), covariances Q diag(0.5, 0.2, 0.05, 0.01, 0.002) Q^T
    with Q a seeded random rotation (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, dim, generator=g, dtype=F64)
    eig = torch.tensor([0.5, 0.2, 0.05, 0.01, 0.002], dtype=F64)[:dim]
    covs = []
    for _ in range(3):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
        c = q @ torch.diag(eig) @ q.T
        covs.append(0.5 * (c + c.T))
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, torch.stack(covs))


def problems():
    """name -> (mixture, {point name: x}, between-modes point name, mode groups (component index lists))."""
    out = {}
    tree = fractal_tree("A")  # components: the trunk's 8 first, then the two sub-trees by the sign of their x
    rest = torch.arange(8, tree.num_components)
    groups = [list(range(8)), rest[tree.means[8:, 0] < 0].tolist(), rest[tree.means[8:, 0] >= 0].tolist()]
    pts = {"near": (0.0, 0.3), "between": (0.0, 0.6), "off": (0.6, 0.3)}  # on the trunk; above the fork; aside
    out["fractal (exact denoiser)"] = (tree, {k: torch.tensor(v, dtype=F64) for k, v in pts.items()}, "between",
                                       groups)
    three = three_component_mixture()
    pts = {"near": (0.3, 0.4), "between": (-0.5, 0.75), "off": (1.0, -0.5)}  # the tests' point; mid mu0-mu2; 1 below mu1
    out["3-component mixture"] = (three, {k: torch.tensor(v, dtype=F64) for k, v in pts.items()}, "between",
                                  [[0], [1], [2]])
    five = anisotropic_mixture()
    mu = five.means
    dist = torch.cdist(mu, mu) + torch.eye(3, dtype=F64) * 1e9
    i, j = divmod(int(dist.argmin()), 3)  # the two closest modes; the third is k
    k = 3 - i - j
    u = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=F64)
    u = u / u.norm()
    out["5-D anisotropic mixture"] = (five, {"near": mu[0] + 0.3 * u, "between": 0.5 * (mu[i] + mu[j]),
                                             "off": mu[k] + u}, "between", [[0], [1], [2]])
    return out


# ------------------------------------------------------------------------------------------------ metrics
def energy_distance(a, b, blocks):
    """Unbiased two-sample energy distance 2 E|A - B| - E|A - A'| - E|B - B'| in `blocks` disjoint blocks of
    equal size: (mean, standard error of the mean over blocks). Zero in expectation when A and B match."""
    n = min(a.shape[0], b.shape[0]) // blocks
    vals = []
    for t in range(blocks):
        x, y = a[t * n:(t + 1) * n], b[t * n:(t + 1) * n]
        within = lambda z: torch.cdist(z, z).sum() / (n * (n - 1))  # noqa: E731 (diagonal is zero)
        vals.append((2 * torch.cdist(x, y).mean() - within(x) - within(y)).item())
    v = torch.tensor(vals, dtype=F64)
    return v.mean().item(), (v.std() / math.sqrt(blocks)).item()


def log_terms(weights, means, precisions, logdets, x):
    """log w_k - (log det C_k + (x - mu_k)^T P_k (x - mu_k)) / 2 for every row and component, [B, K], from one
    matrix product over [x x^T, x, 1] (the quadratic form expanded; the 2 pi constant left out)."""
    k = means.shape[0]
    pmu = torch.einsum("kde,ke->kd", precisions, means)
    const = weights.clamp_min(1e-300).log() - 0.5 * (logdets + (pmu * means).sum(-1))
    coef = torch.cat([-0.5 * precisions.reshape(k, -1), pmu, const[:, None]], 1)
    b = x.shape[0]
    feats = torch.cat([(x[:, :, None] * x[:, None, :]).reshape(b, -1), x, x.new_ones(b, 1)], 1)
    return feats @ coef.T


def mode_masses(product, y, groups, x):
    """Mean responsibility w^_g of each group g of the product's components (exactly its weight w_g under the
    product: E[P(k | y)] = P(k) for y drawn from it), and the split of the mean error by the identity
    mean(y) - m = sum_g (w^_g - w_g) (m_g - m) + sum_g w^_g (m^_g - m_g) (m_g the group's exact mean, m^_g the
    responsibility-weighted sample mean): the two parts' norms relative to |m - x| (wrong mode masses; errors
    within the modes)."""
    prec = torch.linalg.inv(product.covs)
    r = log_terms(product.weights, product.means, 0.5 * (prec + prec.mT), torch.logdet(product.covs), y)
    r = r.softmax(1)
    rg = torch.stack([r[:, g].sum(1) for g in groups], 1)  # [n, G]
    w_hat = rg.mean(0)
    w = torch.stack([product.weights[g].sum() for g in groups])
    m = product.mean()
    m_g = torch.stack([(product.weights[g, None] * product.means[g]).sum(0) / product.weights[g].sum().clamp_min(1e-300)
                       for g in groups])
    m_hat = (rg.T @ y) / rg.sum(0).clamp_min(1e-300)[:, None]
    scale = (m - x).norm()
    between = ((w_hat - w)[:, None] * (m_g - m)).sum(0).norm() / scale
    within = (w_hat[:, None] * (m_hat - m_g)).sum(0).norm() / scale
    return w_hat.tolist(), between.item(), within.item()


_STEPS = {}


def steps_for(kw, lam, calls):
    """The most steps whose chain costs at most `calls` model calls per sample (counted on a free model), and
    that cost; None when even one step costs more."""
    if kw["sampler"] == JVP_FIRST:  # 2 calls for the JVP step, one per further step
        return (calls - 1, calls) if calls >= 3 else None
    key = (repr(sorted(kw.items())), lam, calls)
    if key not in _STEPS:
        def nfe(steps):  # non-decreasing in steps (counted on a free model)
            msd = MSD(lambda x, sigma, **c: 0.5 * x, lam, steps=steps, **kw)
            msd.grad(torch.zeros(1, 2, dtype=F64), torch.Generator().manual_seed(0))
            return int(msd.last_nfe)
        lo, hi = 0, 2 * calls + 2  # nfe(lo) <= calls < nfe(hi) (nfe(0) taken as 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if nfe(mid) <= calls else (lo, mid)
        _STEPS[key] = (lo, nfe(lo)) if lo else None
    return _STEPS[key]


def jvp_first_step(model, x, lam, steps, generator, solver="dpmpp_2m_sde", sigma_min=0.002, rho=7.0):
    """Product samples for the rows of x (one each): the posterior chain on MSD's grid (s = lam / sqrt 2 down to
    sigma_min, then 0) whose first step s -> s_1 draws from the Gaussian posterior step with the posterior's
    covariance, z_1 = r^2 x + (1 - r^2) (D + s J xi) + s_1 sqrt(1 - r^2) e, r = s_1 / s, J xi the Jacobian of
    D(., s) at x along xi ~ N(0, I) (a JVP, here by the forward difference (D(x + eps xi) - D(x)) / eps with
    eps = 1e-3 s, which any model allows: E[z_1] is exact; Cov[z_1] is s_1^2 (1 - r^2) I + (1 - r^2)^2 s^2 J^2,
    J^2 standing in for Cov[y | x] / s^2 = J, equal where J's eigenvalues are 0 or 1), then `solver` at eta = 1.
    Model calls per sample: 2 for the first step (D and the shifted D) + steps - 1."""
    from diffsolve.sampling import sample
    from diffsolve.schedules import sigmas_karras
    from diffsolve.solvers import get_solver
    s = lam / math.sqrt(2)
    sig = sigmas_karras(steps, sigma_min, s, rho)
    s1 = float(sig[1])
    r2 = (s1 / s) ** 2
    xi = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    e = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    st = torch.full((x.shape[0],), s, dtype=x.dtype)
    eps = 1e-3 * s
    d = model(x, st)
    jxi = (model(x + eps * xi, st) - d) / eps
    z1 = r2 * x + (1 - r2) * (d + s * jxi) + s1 * math.sqrt(1 - r2) * e
    noise = lambda a, b: torch.randn(x.shape, generator=generator, dtype=x.dtype)  # noqa: E731
    return sample(get_solver(solver, eta=1.0), model, z1.detach(), sig[1:], disable=True, noise_sampler=noise)


def sample_at(model, kw, lam, steps, x, n, seed):
    """n product samples at the point x ([d]) by the estimator `kw` with `steps` steps: [n, d]."""
    if kw["sampler"] == JVP_FIRST:
        return jvp_first_step(model, x.expand(n, -1).clone(), lam, steps, torch.Generator().manual_seed(seed),
                              kw["solver"]).detach()
    msd = MSD(model, lam, steps=steps, n_samples=n, **kw)
    y = msd.sample_product(x[None], generator=torch.Generator().manual_seed(seed))[0]
    return y


def identical_chains(est):
    """Check SAME_AS sample for sample (3-component mixture, 256 samples, 8 steps, lambda 0.3, same seed):
    {name: {same_as, max_abs_difference}} for the pairs that agree to 1e-10 (only those are copied)."""
    gmm, points, _, _ = problems()["3-component mixture"]
    model, out = MixtureDenoiser(gmm), {}
    for name, twin in SAME_AS.items():
        if name in est and twin in est:
            a = sample_at(model, est[name], 0.3, 8, points["between"], 256, 0)
            b = sample_at(model, est[twin], 0.3, 8, points["between"], 256, 0)
            diff = (a - b).abs().max().item()
            if diff < 1e-10:
                out[name] = {"same_as": twin, "max_abs_difference": diff}
    return out


def measure_closed_form(name, gmm, points, between, groups, est, calls_list, lams, n, blocks, same, seed=0):
    model = MixtureDenoiser(gmm)
    rows = []
    for lam in lams:
        s = lam / math.sqrt(2)
        for pname, x in points.items():
            product = gmm.product_with_gaussian(x, s)
            m, cov = product.mean(), product.covariance()
            exact = product.sample(n, generator=torch.Generator().manual_seed(seed + 7)) if pname == between else None
            for ename, kw in est.items():
                if ename in same:
                    continue
                for calls in calls_list:
                    if kw["sampler"] == "one_call":
                        if calls != 1:
                            continue
                        y = model(x[None], torch.tensor([s], dtype=F64))
                        rows.append(dict(problem=name, point=pname, lam=lam, estimator=ename, calls=1, steps=1,
                                         mean_error=((y[0] - m).norm() / (m - x).norm()).item(), mean_se=0.0,
                                         cov_error=None, cov_floor=None))
                        continue
                    found = steps_for(kw, lam, calls)
                    if found is None:
                        continue
                    steps, nfe = found
                    if rows and rows[-1]["estimator"] == ename and rows[-1]["point"] == pname \
                            and rows[-1]["lam"] == lam and rows[-1]["steps"] == steps:
                        continue  # the same chain as the smaller budget
                    y = sample_at(model, kw, lam, steps, x, n, seed)
                    ok = bool(torch.isfinite(y).all())
                    c = torch.cov(y.T) if ok else None
                    row = dict(problem=name, point=pname, lam=lam, estimator=ename, calls=nfe, steps=steps,
                               mean_error=((y.mean(0) - m).norm() / (m - x).norm()).item() if ok else math.inf,
                               mean_se=((c.trace() / n).sqrt() / (m - x).norm()).item() if ok else None,
                               cov_error=((c - cov).norm() / cov.norm()).item() if ok else math.inf,
                               cov_floor=(((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2).sum() / n).sqrt()
                                          / cov.norm()).item())
                    if pname == between and ok:
                        ed, ed_se = energy_distance(y, exact, blocks)
                        masses, between_part, within_part = mode_masses(product, y, groups, x)
                        want = [product.weights[g].sum().item() for g in groups]
                        row.update(energy_distance=ed, energy_distance_se=ed_se, mode_masses=masses,
                                   exact_mode_masses=want,
                                   mode_mass_error=max(abs(a - b) for a, b in zip(masses, want)),
                                   mean_error_from_mode_masses=between_part, mean_error_within_modes=within_part)
                    rows.append(row)
            print(f"{name} lam {lam} {pname}: done", flush=True)
    return rows + copies(rows, same)


def copies(rows, same):
    """The rows of each chain in `same` (name -> {same_as}), copied from its twin's."""
    return [{**r, "estimator": name, "copied_from": info["same_as"]} for name, info in same.items()
            for r in rows if r["estimator"] == info["same_as"]]


def grid_scan(gmm, points, lams, n, calls=8, seed=0):
    """Where the calls sit: the posterior chain (ddim, dpmpp_2m_sde, dpmpp_3m_sde) at `calls` model calls on the
    Karras grid for rho in (1, 2, 3, 7) and sigma_min in (0.002, 0.02), at every point and lambda: the mean and
    covariance errors (one row per setting)."""
    model, rows = MixtureDenoiser(gmm), []
    for lam in lams:
        for pname, x in points.items():
            product = gmm.product_with_gaussian(x, lam / math.sqrt(2))
            m, cov = product.mean(), product.covariance()
            for solver in ("ddim", "dpmpp_2m_sde", "dpmpp_3m_sde"):
                for rho in (1.0, 2.0, 3.0, 7.0):
                    for sigma_min in (0.002, 0.02):
                        kw = dict(sampler="posterior", solver=solver, rho=rho, sigma_min=sigma_min)
                        y = sample_at(model, kw, lam, calls, x, n, seed)
                        rows.append(dict(point=pname, lam=lam, solver=solver, rho=rho, sigma_min=sigma_min,
                                         calls=calls, mean_error=((y.mean(0) - m).norm() / (m - x).norm()).item(),
                                         cov_error=((torch.cov(y.T) - cov).norm() / cov.norm()).item()))
    return rows


def measure_learned(model, density, points, lam, est, calls_list, k, label, same, seed=0):
    """msd_variants.py's measure per call budget: relative bias mean_p |mean_k g - g*| / mean_p |g*| of K
    single-sample gradients per point against the analytic oracle g* = x - D*(x; s), with its noise floor."""
    oracle = mean_shift_oracle(density, points.double(), lam).to(points.dtype)
    scale = oracle.norm(dim=1).mean().item()
    rows = []
    for ename, kw in est.items():
        if ename in same:
            continue
        for calls in calls_list:
            if kw["sampler"] == "one_call" and calls != 1:
                continue
            found = (1, 1) if kw["sampler"] == "one_call" else steps_for(kw, lam, calls)
            if found is None or (rows and rows[-1]["estimator"] == ename and rows[-1]["steps"] == found[0]):
                continue
            steps, nfe = found
            reps = 1 if kw["sampler"] == "one_call" else k
            xs = points.repeat_interleave(reps, 0)
            if kw["sampler"] == JVP_FIRST:
                g = xs - jvp_first_step(model, xs, lam, steps, torch.Generator().manual_seed(seed), kw["solver"])
                g = g.detach()
            else:
                msd = MSD(model, lam, steps=steps, n_samples=1, **kw)
                g = msd.grad(xs, torch.Generator().manual_seed(seed))
            g = g.reshape(len(points), reps, -1).double()
            bias = (g.mean(1) - oracle.double()).norm(dim=1)
            floor = (g.var(1).sum(-1) / reps).sqrt() if reps > 1 else torch.zeros(len(points), dtype=F64)
            rows.append(dict(problem=label, estimator=ename, calls=nfe, steps=steps, estimates_per_point=reps,
                             relative_bias=(bias.mean() / scale).item(), noise_floor=(floor.mean() / scale).item(),
                             finite=bool(torch.isfinite(g).all())))
        print(f"{label}: {ename} done", flush=True)
    return rows + [{**r, "estimator": name, "copied_from": info["same_as"]} for name, info in same.items()
                   for r in rows if r["estimator"] == info["same_as"]]


# ------------------------------------------------------------------------------------------------ summary
def summarise(rows, key, goal):
    """Per problem and estimator: the smallest call budget from which `key` is <= goal at every point and lambda
    (worst case) for this and every larger budget, else None; and the closest (smallest worst-case) value and its
    budget. A one-step chain returns D(x; s) for every sample (the one-call estimate, listed as such) and is left
    out; a two-step chain is close to it (its one intermediate level is sigma_min), the exact mean with little
    spread, so a small budget can meet the mean goal that larger ones miss: "reached" asks that it stays met."""
    out = {}
    rows = [r for r in rows if r["steps"] > 1 or r["estimator"] == "one call"]  # a one-step chain is D(x; s)
    for (prob, est) in sorted({(r["problem"], r["estimator"]) for r in rows}):
        worst = {}
        for r in rows:
            if r["problem"] == prob and r["estimator"] == est and r.get(key) is not None:
                budget = _budget(r["calls"])
                worst.setdefault(budget, {})[(r["point"], r["lam"])] = r[key]
        settings = {s for w in worst.values() for s in w}
        full = {b: max(w.values()) for b, w in worst.items() if set(w) == settings}
        if not full:
            continue
        budgets = sorted(full)  # reached: from this budget on, every larger one stays within the goal (a
        reached = [b for i, b in enumerate(budgets) if all(full[c] <= goal for c in budgets[i:])]  # 1-step chain is D)
        best = min(full, key=lambda b: full[b])
        out.setdefault(prob, {})[est] = dict(reached_at=reached[0] if reached else None,
                                             closest=full[best], closest_at=best,
                                             worst_by_calls={str(b): v for b, v in sorted(full.items())})
    return out


def _budget(calls):
    return min(c for c in CALLS if c >= calls) if calls <= CALLS[-1] else calls


def add_summaries(data):
    rows = data["rows"]
    data["mean_summary"] = summarise(rows, "mean_error", MEAN_GOAL)
    data["cov_summary"] = summarise(rows, "cov_error", COV_GOAL)
    data["goal_check"] = goal_check(rows, data["mean_summary"], data["cov_summary"])
    data["learned_summary"] = summarise_learned(data["learned_rows"])


def summarise_learned(rows):
    out = {}
    for r in rows:
        e = out.setdefault(r["problem"], {}).setdefault(r["estimator"], {})
        e[str(_budget(r["calls"]))] = dict(relative_bias=r["relative_bias"], noise_floor=r["noise_floor"])
    return out


def goal_check(rows, mean_summary, cov_summary):
    """Per problem and estimator: the smallest budget at which mean and covariance are both within their goals at
    every point and lambda (`joint_at`, None if at none), whether that is <= GOAL_CALLS, and at that budget (or at
    GOAL_CALLS) whether the between-modes point's energy distance is within 3 SE of 0 at every lambda and its mode
    masses within 0.02."""
    out = {}
    for prob, ests in cov_summary.items():
        for est, cs in ests.items():
            ms = mean_summary[prob][est]
            both = [int(b) for b, v in cs["worst_by_calls"].items()
                    if v <= COV_GOAL and ms["worst_by_calls"].get(b, math.inf) <= MEAN_GOAL]
            budget = min(both, default=10 ** 9)
            at = budget if budget <= GOAL_CALLS else GOAL_CALLS
            between = [r for r in rows if r["problem"] == prob and r["estimator"] == est
                       and "energy_distance" in r and _budget(r["calls"]) == at]
            ed_ok = bool(between) and all(r["energy_distance"] <= 3 * r["energy_distance_se"] for r in between)
            mass_ok = bool(between) and all(r["mode_mass_error"] <= 0.02 for r in between)
            out.setdefault(prob, {})[est] = dict(joint_at=budget if both else None, budget=at,
                                                 mean_and_cov=budget <= GOAL_CALLS,
                                                 energy_distance_within_3se=ed_ok, mode_masses_within_0_02=mass_ok,
                                                 goal=budget <= GOAL_CALLS and ed_ok and mass_ok)
    return out


def figure(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probs = list(data["mean_summary"])
    fig, axes = plt.subplots(2, len(probs) + 1, figsize=(4.2 * (len(probs) + 1), 7.5), squeeze=False)
    names = list(data["estimators"])
    cmap = plt.get_cmap("tab20")
    style = {n: dict(color=cmap(i % 20), marker="os^vDx+*"[i % 8], lw=1.2, ms=4) for i, n in enumerate(names)}
    for col, prob in enumerate(probs):
        for row, (key, goal) in enumerate((("mean_summary", MEAN_GOAL), ("cov_summary", COV_GOAL))):
            ax = axes[row][col]
            for est, s in data[key].get(prob, {}).items():
                xs = [int(b) for b in s["worst_by_calls"]]
                ax.plot(xs, [max(v, 1e-4) for v in s["worst_by_calls"].values()], label=est, **style[est])
            ax.axhline(goal, color="k", ls="--", lw=0.8)
            ax.axvline(GOAL_CALLS, color="gray", ls=":", lw=0.8)
            ax.set(xscale="log", yscale="log", xlabel="model calls per sample",
                   ylabel=("worst relative mean error" if row == 0 else "worst relative covariance error"),
                   title=prob)
    ax = axes[0][-1]
    for prob, ests in data["learned_summary"].items():
        if "learned" not in prob:
            continue
        for est, by in ests.items():
            xs = sorted(int(b) for b in by)
            ax.plot(xs, [by[str(b)]["relative_bias"] for b in xs], label=est, **style[est])
    ax.axhline(data["learned_reference"], color="k", ls="--", lw=0.8)
    ax.axvline(GOAL_CALLS, color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="model calls per sample", ylabel="relative gradient bias",
           title="learned fractal model (vs analytic)")
    for ax in [a_ for row in axes for a_ in row]:
        ax.set_xticks(CALLS, [str(c) for c in CALLS])
        ax.minorticks_off()
    axes[1][-1].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[1][-1].legend(handles, labels, fontsize=7, loc="center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v, digits=3):
    """A number as the docs print it (3 significant digits; inf / None as words)."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def _reach(summary):
    if summary["reached_at"] is not None:
        return str(summary["reached_at"])
    return f"not reached ({_f(summary['closest'])} at {summary['closest_at']})"


def markdown(data):
    """The measured part of docs/msd-cost.md, every number from the JSON (tests/test_msd_cost.py checks it)."""
    out = []
    g = data["goal"]
    key = str(g["calls"])
    out += ["### Summary", ""]
    for prob in data["mean_summary"]:
        ok = [e for e, gc in data["goal_check"].get(prob, {}).items() if gc["goal"]]
        score = {}
        for e, cs in data["cov_summary"].get(prob, {}).items():
            mv, cv = data["mean_summary"][prob][e]["worst_by_calls"].get(key), cs["worst_by_calls"].get(key)
            if mv is not None and cv is not None:
                score[e] = (max(mv / g["mean"], cv / g["cov"]), mv, cv)
        best = min(score, key=lambda e: score[e][0]) if score else None
        line = f"- {prob}: goal met by {', '.join(ok) if ok else 'no estimator'}"
        if best:
            line += (f"; closest at {g['calls']} calls: {best} (worst mean error {_f(score[best][1])}, "
                     f"worst covariance error {_f(score[best][2])})")
        out.append(line + ".")
    learned = data["learned_summary"].get("learned fractal model", {})
    at_goal = {e: min((v["relative_bias"], int(b)) for b, v in by.items() if int(b) <= g["calls"])
               for e, by in learned.items() if any(int(b) <= g["calls"] for b in by)}
    if at_goal:
        best = min(at_goal, key=lambda e: at_goal[e][0])
        ref = learned.get("posterior ddim", {}).get("32")
        out.append(f"- learned fractal model: smallest bias at <= {g['calls']} calls {_f(at_goal[best][0])} "
                   f"({best}, {at_goal[best][1]} calls)"
                   + (f"; posterior ddim at 32 calls {_f(ref['relative_bias'])} (noise floor "
                      f"{_f(ref['noise_floor'])})" if ref else "") + ".")
    out += ["", "### Sampling error of the settings (largest over estimators at the largest budget)", "",
            "| problem | point | lambda | mean error SE | covariance error floor |", "|---|---|---|---|---|"]
    for prob in data["mean_summary"]:
        sel = [r for r in data["rows"] if r["problem"] == prob and r.get("mean_se") and r["cov_floor"] is not None]
        for pt, lam in dict.fromkeys((r["point"], r["lam"]) for r in sel):
            here = [r for r in sel if (r["point"], r["lam"]) == (pt, lam)]
            top = max(r["calls"] for r in here)
            here = [r for r in here if r["calls"] == top]
            out.append(f"| {prob} | {pt} | {lam:g} | {_f(max(r['mean_se'] for r in here))} | "
                       f"{_f(max(r['cov_floor'] for r in here))} |")
    out.append("")
    for prob in data["mean_summary"]:
        out += [f"### {prob}", "",
                f"| estimator | mean <= {g['mean']} from | covariance <= {g['cov']} from | mean at {g['calls']} | "
                f"covariance at {g['calls']} | joint at | goal at <= {g['calls']} |",
                "|---|---|---|---|---|---|---|"]
        for est, ms in data["mean_summary"][prob].items():
            cs = data["cov_summary"].get(prob, {}).get(est)
            gc = data["goal_check"].get(prob, {}).get(est)
            out.append(f"| {est} | {_reach(ms)} | {_reach(cs) if cs else '-'} | {_f(ms['worst_by_calls'].get(key))} | "
                       f"{_f(cs['worst_by_calls'].get(key)) if cs else '-'} | "
                       f"{(gc['joint_at'] if gc['joint_at'] is not None else 'none') if gc else '-'} | "
                       f"{('yes' if gc['goal'] else 'no') if gc else 'no'} |")
        out.append("")
    out += [f"### The between-modes points at {g['calls']} calls", "",
            "| problem | lambda | estimator | mean error | from mode masses | within modes | mode-mass error | "
            "energy distance (SE) | covariance error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "energy_distance" in r and _budget(r["calls"]) == g["calls"] and r["estimator"] in BETWEEN_SHOWN:
            out.append(f"| {r['problem']} | {r['lam']:g} | {r['estimator']} | {_f(r['mean_error'])} | "
                       f"{_f(r['mean_error_from_mode_masses'])} | {_f(r['mean_error_within_modes'])} | "
                       f"{_f(r['mode_mass_error'])} | {_f(r['energy_distance'])} ({_f(r['energy_distance_se'])}) | "
                       f"{_f(r['cov_error'])} |")
    out.append("")
    budgets = [str(c) for c in data["calls"]]
    for prob, ests in data["learned_summary"].items():
        shown = [b for b in budgets if any(b in by for by in ests.values())]
        out += [f"### {prob}: relative gradient bias (noise floor) by model calls", "",
                "| estimator | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for est, by in ests.items():
            out.append(f"| {est} | " + " | ".join(
                f"{_f(by[b]['relative_bias'])} ({_f(by[b]['noise_floor'])})" if b in by else "-" for b in shown) + " |")
        out.append("")
    scan = data["grid_scan"]
    if scan:
        out += [f"### Grid scan: posterior chain on the 5-D mixture at {scan[0]['calls']} calls (worst over points and "
                "lambda)", "", "| solver | rho | sigma_min | worst mean error | worst covariance error |",
                "|---|---|---|---|---|"]
        keys = sorted({(r["solver"], r["rho"], r["sigma_min"]) for r in scan})
        for solver, rho, sigma_min in keys:
            sel = [r for r in scan if (r["solver"], r["rho"], r["sigma_min"]) == (solver, rho, sigma_min)]
            out.append(f"| {solver} | {rho:g} | {sigma_min:g} | {_f(max(r['mean_error'] for r in sel))} | "
                       f"{_f(max(r['cov_error'] for r in sel))} |")
        out.append("")
    return "\n".join(out)


BETWEEN_SHOWN = ("paper chain, matched flow", "posterior ddim", "posterior dpmpp_2m_sde", "posterior dpmpp_3m_sde",
                 "posterior kernel_exp order 3", "posterior dpmpp_2m_sde, rho 1",
                 "posterior dpmpp_2m_sde, JVP first step")


def learned_model(quick):
    if not quick:
        from diffsolve_studies.toy import toy_models
        return toy_models("fractal", progress=False)["main"]
    from diffsolve_studies.toy.train import train_toy_model  # a tiny stand-in trained in seconds (smoke run)
    return train_toy_model(fractal_tree("A"), hidden_dim=16, iterations=8, batch=256, progress=False,
                           cache_dir=tempfile.mkdtemp(prefix="msd_cost_"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few samples, budgets 1-4, one lambda (seconds)")
    p.add_argument("--samples", type=int, default=None, help="product samples per setting (default 8192)")
    p.add_argument("--out", default=str(RESULTS / "msd_cost.json"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "msd_cost.png"))
    p.add_argument("--fractal-calls", type=int, default=16, help="largest budget on the fractal with its exact "
                   "denoiser (248 components: 32 and 64 calls there would take most of the run; default 16)")
    p.add_argument("--markdown", action="store_true", help="print docs/msd-cost.md's measured part from --out")
    p.add_argument("--summarise", action="store_true", help="recompute --out's summaries from its rows and redraw "
                   "--figure (no sampling)")
    a = p.parse_args(argv)
    if a.markdown or a.summarise:
        import json
        data = json.loads(Path(a.out).read_text())
        if a.markdown:
            print(markdown(data))
            return
        add_summaries(data)
        write_json_atomic(a.out, data)
        figure(data, a.figure)
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    calls = (1, 2, 4) if a.quick else CALLS
    lams = (0.3,) if a.quick else LAMS
    n = a.samples or (256 if a.quick else 4096)
    blocks = 4 if a.quick else 16
    k = 16 if a.quick else 256
    est = estimators()
    same = identical_chains(est)
    rows = []
    for name, (gmm, points, between, groups) in problems().items():
        budgets = [c for c in calls if c <= a.fractal_calls] if name.startswith("fractal") else calls
        rows += measure_closed_form(name, gmm, points, between, groups, est, budgets, lams, n, blocks, same)
    five, five_points, _, _ = problems()["5-D anisotropic mixture"]
    scan = grid_scan(five, five_points, lams, n)
    from diffsolve_studies.toy.study import grid_points
    density, grid = fractal_tree("A"), grid_points(8, lim=1.2)
    learned = measure_learned(learned_model(a.quick), density, grid, 0.316, est, calls, k, "learned fractal model",
                              same)
    exact_calls = calls if a.quick else (8, 32)  # the exact denoiser beside it: model error vs discretisation
    learned += measure_learned(MixtureDenoiser(density), density, grid.double(), 0.316, est, exact_calls, k // 4,
                               "fractal, exact denoiser (same grid)", same)
    data = {"benchmark": "msd_cost", "quick": a.quick, "samples": n, "energy_distance_blocks": blocks,
            "calls": list(calls), "fractal_calls": [c for c in calls if c <= a.fractal_calls], "lams": list(lams),
            "goal": {"mean": MEAN_GOAL, "cov": COV_GOAL, "calls": GOAL_CALLS},
            "estimators": {e: {k_: (v if isinstance(v, (int, float, str)) else repr(v)) for k_, v in kw.items()}
                           for e, kw in est.items()},
            "identical_chains": same,
            "points": {name: {k_: v.tolist() for k_, v in pts.items()} for name, (_, pts, _, _) in problems().items()},
            "learned_setting": {"grid": "8x8 on [-1.2, 1.2]^2", "lam": 0.316, "estimates_per_point": k,
                                "exact_estimates_per_point": k // 4},
            "learned_reference": 0.027,
            "rows": rows, "grid_scan": scan, "learned_rows": learned}
    add_summaries(data)
    data["seconds"] = time.perf_counter() - t0
    data["machine"] = machine_info()
    write_json_atomic(a.out, data)
    figure(data, a.figure)
    print(f"wrote {a.out} and {a.figure} in {data['seconds']:.0f} s")


if __name__ == "__main__":
    main()
