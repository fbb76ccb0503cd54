"""Tests for diffsolve.metrics, each against an independent computation (scikit-learn kNN, numpy loops,
dense least squares, closed forms)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.neighbors import NearestNeighbors

from diffsolve.analytic import GaussianMixture
from diffsolve.metrics import (estimator_efficiency, integrate_gradient_field, mmd, mmd_both, nll,
                               precision_recall)

torch.set_num_threads(1)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- NLL
def test_nll_standard_normal_by_hand():
    log_prob = lambda x: -0.5 * x.square().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
    expected = 0.5 * math.log(2 * math.pi) + (0 + 1 + 4) / 6
    pts = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    assert nll(pts, log_prob) == pytest.approx(expected, rel=1e-14)
    assert nll(pts.float(), log_prob) == pytest.approx(expected, rel=1e-6)  # float32 log densities


def test_nll_with_gaussian_mixture_log_prob():
    gm = GaussianMixture.isotropic(torch.zeros(1, 2, dtype=F64), 1.0)
    pts = torch.tensor([[0.0, 0.0], [1.0, -1.0], [3.0, 0.5]], dtype=F64)
    expected = math.log(2 * math.pi) + (0.0 + 2.0 + 9.25) / (2 * 3)
    assert nll(pts, gm.log_prob) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------ precision / recall
def sklearn_precision_recall(real, fake, k):
    """Brute-force reference: sklearn k-th neighbour radii (self excluded by index), exact comparisons."""
    def radii(x):
        dist, _ = NearestNeighbors(algorithm="kd_tree").fit(x).kneighbors(n_neighbors=k)
        return dist[:, k - 1]

    def coverage(query, ref, r):
        d = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
        return float((d <= r[None, :]).any(1).mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@settings(max_examples=60, deadline=None)
@given(k=st.sampled_from([1, 3, 5]), extra_real=st.integers(1, 25), extra_fake=st.integers(1, 25),
       d=st.integers(1, 3), grid=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_precision_recall_matches_sklearn(k, extra_real, extra_fake, d, grid, seed):
    rng = np.random.default_rng(seed)
    if grid:  # small integer grid: many duplicate points and exact ties
        real = rng.integers(-2, 3, size=(k + extra_real, d)).astype(np.float64)
        fake = rng.integers(-2, 3, size=(k + extra_fake, d)).astype(np.float64)
    else:
        real = rng.normal(size=(k + extra_real, d))
        fake = rng.normal(0.3, 1.2, size=(k + extra_fake, d))
    p_ref, r_ref = sklearn_precision_recall(real, fake, k)
    out = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k)
    assert out == {"precision": p_ref, "recall": r_ref}
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, chunk=1) == out


def test_precision_recall_identical_and_disjoint():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 1000.0, k=3) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_mode_collapse_and_large_run():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(10_000, 2, generator=g)
    collapsed = real[:1].repeat(10_000, 1)  # all fake points coincide: zero radii
    out = precision_recall(real, collapsed)
    assert out["precision"] == 1.0 and out["recall"] == 1 / 10_000


def test_precision_recall_validation():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)
    with pytest.raises(ValueError, match="same dimension"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))


# ------------------------------------------------------------------------------------------------ MMD
def loop_mmd(x, y, h):
    """Direct double loops over all pairs (numpy scalars)."""
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    uxx, uyy = (sxx - n) / (n * (n - 1)), (syy - m) / (m * (m - 1))
    return {"biased": sxx / n ** 2 + syy / m ** 2 - 2 * sxy / (n * m), "unbiased": uxx + uyy - 2 * sxy / (n * m),
            "uxx": uxx, "uyy": uyy}


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(2, 12), d=st.integers(1, 3), h=st.floats(0.2, 3.0),
       seed=st.integers(0, 2 ** 31 - 1))
def test_mmd_matches_double_loop_and_chunking(n, m, d, h, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(0.5, 1.0, size=(m, d))
    ref = loop_mmd(x, y, h)
    out = mmd_both(torch.from_numpy(x), torch.from_numpy(y), bandwidth=h)
    assert out["biased"] == pytest.approx(ref["biased"], rel=1e-10, abs=1e-13)
    assert out["unbiased"] == pytest.approx(ref["unbiased"], rel=1e-10, abs=1e-13)
    # biased = unbiased + diagonal correction (1 - U_xx)/n + (1 - U_yy)/m
    corr = (1 - ref["uxx"]) / n + (1 - ref["uyy"]) / m
    assert out["biased"] == pytest.approx(out["unbiased"] + corr, rel=1e-10, abs=1e-13)
    chunked = mmd_both(torch.from_numpy(x), torch.from_numpy(y), bandwidth=h, chunk=1)
    assert chunked["biased"] == pytest.approx(out["biased"], rel=1e-12, abs=1e-14)
    assert chunked["unbiased"] == pytest.approx(out["unbiased"], rel=1e-12, abs=1e-14)
    assert mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidth=h) == out["biased"]
    assert mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidth=h, unbiased=True) == out["unbiased"]


def test_mmd_full_matrix_float32_input():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(500, 2, generator=g), torch.randn(400, 2, generator=g) * 1.3
    xn, yn = x.double().numpy(), y.double().numpy()
    K = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 0.5 ** 2))
    expected = K(xn, xn).mean() + K(yn, yn).mean() - 2 * K(xn, yn).mean()
    assert mmd(x, y, chunk=1000) == pytest.approx(expected, rel=1e-10)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)


def test_unbiased_mmd_zero_in_expectation():
    vals = {"biased": [], "unbiased": []}
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        out = mmd_both(torch.randn(150, 2, generator=g, dtype=F64), torch.randn(150, 2, generator=g, dtype=F64))
        for key in vals:
            vals[key].append(out[key])
    u, b = np.array(vals["unbiased"]), np.array(vals["biased"])
    assert abs(u.mean()) < 4 * u.std(ddof=1) / math.sqrt(len(u))
    assert b.mean() > 4 * b.std(ddof=1) / math.sqrt(len(b))  # the V-statistic has a positive floor
    # floor ~ 2 (1 - E k) / n with E k = (h^2 / (h^2 + 2))^(d/2) for N(0, I) and h = 0.5
    floor = 2 * (1 - 0.25 / 2.25) / 150
    assert (b - u).mean() == pytest.approx(floor, rel=0.05)


def test_mmd_validation():
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), bandwidth=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2), unbiased=True)
    assert mmd_both(torch.zeros(1, 2), torch.zeros(3, 2))["unbiased"] is None


# ----------------------------------------------------------------------------------------- efficiency
def numpy_efficiency(s, cost, ref=None):
    g = s.mean(0) if ref is None else ref
    mse = ((s - g[None]) ** 2).sum(-1).mean(0)
    return (g ** 2).sum(-1) / (mse * cost), mse


def test_efficiency_gaussian_noise_matches_closed_form():
    K, P, d, v, cost = 4000, 40, 2, 0.25, 3.0
    g = torch.Generator().manual_seed(0)
    mean = 1.0 + torch.rand(P, d, generator=g, dtype=F64) * 2
    samples = mean[None] + math.sqrt(v) * torch.randn(K, P, d, generator=g, dtype=F64)
    out = estimator_efficiency(samples, cost)
    truth = mean.square().sum(-1) / (d * v * cost)
    # per point: MSE has relative sd sqrt(2 / (K d)) ~ 0.016, so 0.1 is > 6 sd; the mean over P is tighter
    torch.testing.assert_close(out["efficiency"], truth, rtol=0.1, atol=0)
    assert out["log_mean_efficiency"] == pytest.approx(math.log(truth.mean()), abs=0.02)
    assert out["mean_log_efficiency"] == pytest.approx(float(truth.log().mean()), abs=0.02)
    eff_np, mse_np = numpy_efficiency(samples.numpy(), cost)
    np.testing.assert_allclose(out["efficiency"].numpy(), eff_np, rtol=1e-12)
    np.testing.assert_allclose(out["mse"].numpy(), mse_np, rtol=1e-12)
    assert out["deterministic_points"] == 0 and out["deterministic"] is False
    # a [P] cost vector divides point by point
    costs = torch.arange(1, P + 1, dtype=F64)
    torch.testing.assert_close(estimator_efficiency(samples, costs)["efficiency"],
                               out["efficiency"] * cost / costs)


def test_efficiency_deterministic_points():
    K, P = 7, 5
    const = torch.full((K, P, 2), 0.1, dtype=F64)  # the float mean of 7 x 0.1 is not exactly 0.1
    out = estimator_efficiency(const, 32)
    assert out["deterministic"] is True and out["deterministic_points"] == P
    assert out["log_mean_efficiency"] is None and out["mean_log_efficiency"] is None
    assert torch.isinf(out["efficiency"]).all() and (out["mse"] == 0).all()
    # mixed: summaries over the stochastic points only
    mixed = const.clone()
    noise = torch.randn(K, 3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    mixed[:, :3] += noise
    out = estimator_efficiency(mixed, 2.0)
    assert out["deterministic"] is False and out["deterministic_points"] == 2
    assert out["deterministic_mask"].tolist() == [False, False, False, True, True]
    eff_np, _ = numpy_efficiency(mixed[:, :3].numpy(), 2.0)
    assert out["log_mean_efficiency"] == pytest.approx(math.log(eff_np.mean()), rel=1e-12)
    assert out["mean_log_efficiency"] == pytest.approx(np.log(eff_np).mean(), rel=1e-12)
    # with a reference equal to the constant, deterministic too; with a different one, not
    assert estimator_efficiency(const, 1, reference=const[0])["deterministic"] is True
    assert estimator_efficiency(const, 1, reference=const[0] + 1)["deterministic_points"] == 0


def test_efficiency_reference_mse_includes_bias():
    K, P, d, v = 5000, 20, 2, 0.5
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(P, d, generator=g, dtype=F64) * 2
    bias = torch.tensor([0.3, -0.4], dtype=F64)  # |bias|^2 = 0.25
    samples = ref[None] + bias + math.sqrt(v) * torch.randn(K, P, d, generator=g, dtype=F64)
    own, vs_ref = estimator_efficiency(samples, 1.0), estimator_efficiency(samples, 1.0, reference=ref)
    # exact bias-variance identity: MSE_ref = MSE_own + |mean - ref|^2
    torch.testing.assert_close(vs_ref["mse"], own["mse"] + (samples.mean(0) - ref).square().sum(-1))
    assert float(vs_ref["mse"].mean()) == pytest.approx(d * v + 0.25, rel=0.02)
    eff_np, _ = numpy_efficiency(samples.numpy(), 1.0, ref.numpy())
    np.testing.assert_allclose(vs_ref["efficiency"].numpy(), eff_np, rtol=1e-12)
    torch.testing.assert_close(vs_ref["g_sq"], ref.square().sum(-1))


def test_efficiency_validation():
    with pytest.raises(ValueError, match="cost"):
        estimator_efficiency(torch.randn(4, 3, 2), 0)
    with pytest.raises(ValueError, match="K, P, d"):
        estimator_efficiency(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="reference"):
        estimator_efficiency(torch.randn(4, 3, 2), 1, reference=torch.zeros(2, 2))


# -------------------------------------------------------------------------------- gradient integration
def grid(nx, ny, xr=(-3.0, 3.0), yr=(-2.0, 2.0)):
    xs, ys = torch.linspace(*xr, nx, dtype=F64), torch.linspace(*yr, ny, dtype=F64)
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    return xs, ys, X, Y


def test_integrate_conservative_field_second_order():
    errs = []
    for n in (50, 100):
        xs, ys, X, Y = grid(n, n - 20)
        L = (X ** 2 + 2 * Y ** 2) / 2 + torch.sin(X)
        grad = torch.stack([X + torch.cos(X), 2 * Y], -1)
        rec = integrate_gradient_field(grad, xs, ys)
        assert rec.shape == L.shape and float(rec.min()) == 0.0
        errs.append(float((rec - (L - L.min())).abs().max()))
    assert errs[1] < 2e-3
    assert 3.0 < errs[0] / errs[1] < 5.0  # O(h^2) discretisation error
    rec32 = integrate_gradient_field(grad.float(), xs, ys)
    assert rec32.dtype == torch.float32


def dense_least_squares_potential(grad, hx, hy):
    """Build the finite-difference system explicitly and solve it with numpy's lstsq."""
    ny, nx, _ = grad.shape
    rows, rhs = [], []
    idx = lambda i, j: i * nx + j
    for i in range(ny):
        for j in range(nx - 1):
            r = np.zeros(ny * nx)
            r[idx(i, j + 1)], r[idx(i, j)] = 1 / hx, -1 / hx
            rows.append(r)
            rhs.append(0.5 * (grad[i, j, 0] + grad[i, j + 1, 0]))
    for i in range(ny - 1):
        for j in range(nx):
            r = np.zeros(ny * nx)
            r[idx(i + 1, j)], r[idx(i, j)] = 1 / hy, -1 / hy
            rows.append(r)
            rhs.append(0.5 * (grad[i, j, 1] + grad[i + 1, j, 1]))
    sol = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(ny, nx)
    return sol - sol.min()


def test_integrate_nonconservative_field_is_least_squares():
    xs, ys, X, Y = grid(9, 7, yr=(-1.0, 2.0))
    noise = torch.randn(7, 9, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    grad = torch.stack([-Y + X ** 2, X * Y], -1) + noise
    rec = integrate_gradient_field(grad, xs, ys)
    expected = dense_least_squares_potential(grad.numpy(), float(xs[1] - xs[0]), float(ys[1] - ys[0]))
    np.testing.assert_allclose(rec.numpy(), expected, atol=1e-10)


def test_integrate_rotational_field():
    """(-y, x) is divergence-free, so its least-squares potential is (discretely) harmonic in the interior
    and carries the field's curl-free part only; it is odd under x -> -x. It is NOT constant on a bounded
    grid: the Neumann boundary data g.n = -y on x = +a is non-zero."""
    xs, ys, X, Y = grid(60, 60, yr=(-3.0, 3.0))
    grad = torch.stack([-Y, X], -1)
    rec = integrate_gradient_field(grad, xs, ys)
    h = float(xs[1] - xs[0])
    lap = (rec[1:-1, 2:] + rec[1:-1, :-2] + rec[2:, 1:-1] + rec[:-2, 1:-1] - 4 * rec[1:-1, 1:-1]) / h ** 2
    assert float(lap.abs().max()) < 1e-9
    sym = rec + rec.flip(1)  # = constant when rec is odd in x (up to the min-normalisation shift)
    assert float(sym.max() - sym.min()) < 1e-9
    # the fitted gradient explains only a small part of the rotational field's energy
    gx, gy = (rec[:, 1:] - rec[:, :-1]) / h, (rec[1:] - rec[:-1]) / h
    fitted = float(gx.square().sum() + gy.square().sum())
    total = float((0.5 * (grad[:, 1:, 0] + grad[:, :-1, 0])).square().sum()
                  + (0.5 * (grad[1:, :, 1] + grad[:-1, :, 1])).square().sum())
    assert fitted < 0.25 * total


def test_integrate_validation():
    xs, ys, X, Y = grid(5, 4)
    with pytest.raises(ValueError, match="shape"):
        integrate_gradient_field(torch.zeros(5, 4, 2), xs, ys)
    with pytest.raises(ValueError, match="uniformly"):
        integrate_gradient_field(torch.zeros(4, 5, 2), xs ** 3, ys)
