"""The Brownian-tree noise sampler (`diffsolve.noise.BrownianTreeNoise`, issue 9).

Contract, k-diffusion's `BrownianTreeNoiseSampler`: `ns(sigma, sigma_next) = (W(t1) - W(t0)) / sqrt|t1 - t0|`
with t = transform(sigma) and W one Brownian path per element fixed by (seed, row, element). The tests
check W's law (Gaussian increments with variance |dt|, independent over disjoint intervals and across
elements, rows and seeds), that increments add up exactly (so a schedule of 2N - 1 points gives the same
noise path as its N-point sub-schedule), batch-split invariance bit for bit, independence from the
global RNG, k-diffusion's law and its samplers, speed, and the errors. Most tests undo the sampler's
normalisation: `_inc` multiplies its output back by sqrt|dt| to get W(t1) - W(t0).
"""
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import diffsolve as ds
from diffsolve.integrations import kdiffusion as K
from diffsolve.noise import BrownianTreeNoise, _mix64, _mix64_tensor, _signed64, brownian_tree_noise

torch.set_num_threads(1)
F64 = torch.float64
S_MIN, S_MAX = 0.002, 80.0
TRANSFORMS = {"identity": None, "neg_log": lambda s: s.log().neg()}


def _t(sigma, transform):
    s = torch.as_tensor(float(sigma), dtype=F64)
    return float(s if transform is None else transform(s))


def _inc(ns, a, b, transform=None):
    """W(t(b)) - W(t(a)) in float64, from the sampler's normalised output."""
    return ns(a, b).to(F64) * math.sqrt(abs(_t(b, transform) - _t(a, transform)))


def _sampler(shape=(200, 2), seed=0, transform=None, row_offset=0, dtype=F64):
    return brownian_tree_noise(torch.zeros(shape, dtype=dtype), S_MIN, S_MAX, seed, transform, row_offset)


def _grid():
    """Disjoint intervals at every scale of [S_MIN, S_MAX]: a Karras schedule plus short ones (deep in the tree)."""
    karras = ds.sigmas_karras(21, S_MIN, S_MAX, append_zero_=False).tolist()
    pairs = list(zip(karras[:-1], karras[1:]))
    for centre in (0.01, 1.0, 37.0, 79.9):
        width = 1e-5 * (S_MAX - S_MIN)
        pairs.append((centre + width, centre))
    return pairs


def _corr(a, b):
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])


# --------------------------------------------------------------------------------------- the hash
def test_tensor_hash_is_splitmix64_bit_for_bit():
    values = [0, 1, 2, 12345, 2 ** 31, 2 ** 53 + 7, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 12345, 2 ** 64 - 1,
              0xDEADBEEFCAFEBABE, 0x8000000000000001]
    got = _mix64_tensor(torch.tensor([_signed64(v) for v in values], dtype=torch.int64))
    assert [int(g) & ((1 << 64) - 1) for g in got] == [_mix64(v) for v in values]


# ------------------------------------------------------------------------------ W's law
def test_increments_are_gaussian_with_variance_dt():
    """~2.4e4 normalised increments (12 intervals at every scale, 5 seeds, 400 elements): N(0, 1) by a
    KS test, and the sample variance of each (interval, seed) group is 1 to 5 standard errors."""
    values = []
    for seed in range(5):
        ns = _sampler((200, 2), seed=seed)
        for a, b in _grid()[::2]:
            z = _inc(ns, a, b) / math.sqrt(abs(b - a))
            assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / z.numel()), (seed, a, b, float(z.var()))
            values.append(z.reshape(-1))
    values = torch.cat(values)
    assert values.numel() >= 2e4
    assert stats.kstest(values.numpy(), "norm").pvalue > 1e-3


def test_w_at_fixed_times_has_variance_t_minus_t_min():
    """W(t) itself (t_min fixed at 0) ~ N(0, t - t_min), under a transform too."""
    for name, transform in TRANSFORMS.items():
        ns = _sampler((2000, 2), seed=11, transform=transform)
        t_min = min(_t(S_MIN, transform), _t(S_MAX, transform))
        for sigma in (0.01, 0.5, 7.0, 60.0):
            t = _t(sigma, transform)
            w = ns.brownian(t)
            assert stats.kstest((w / math.sqrt(t - t_min)).numpy(), "norm").pvalue > 1e-3, (name, sigma)


def test_disjoint_increments_and_different_elements_rows_seeds_are_uncorrelated():
    n_rows, per_row = 2000, 2
    n = n_rows * per_row
    bound = 5 / math.sqrt(n)
    ns = _sampler((n_rows, per_row), seed=3)
    grid = ds.sigmas_karras(9, S_MIN, S_MAX, append_zero_=False).tolist()
    incs = [_inc(ns, a, b) for a, b in zip(grid[:-1], grid[1:])]
    for i in range(len(incs)):
        for j in range(i + 1, len(incs)):
            assert abs(_corr(incs[i], incs[j])) < bound, (i, j, _corr(incs[i], incs[j]))
    m = n // 2
    for inc in incs:
        assert abs(_corr(inc[:, 0], inc[:, 1])) < 5 / math.sqrt(n_rows)  # elements of a row
        assert abs(_corr(inc[0::2], inc[1::2])) < 5 / math.sqrt(m)  # neighbouring rows
    other = _sampler((n_rows, per_row), seed=4)
    for a, b in zip(grid[:-1], grid[1:]):
        assert abs(_corr(_inc(ns, a, b), _inc(other, a, b))) < bound  # seeds


def test_nested_increments_have_brownian_covariance():
    """Corr(W over [a, c], W over [a, b]) = sqrt(|b - a| / |c - a|): a Brownian path, not iid noise per call."""
    ns = _sampler((5000, 2), seed=5)
    n = 10_000
    for a, b, c in [(80.0, 40.0, 10.0), (5.0, 4.0, 0.5), (0.3, 0.29, 0.002)]:
        got = _corr(ns(a, c), ns(a, b))
        assert abs(got - math.sqrt((a - b) / (a - c))) < 5 / math.sqrt(n), (a, b, c, got)


# ------------------------------------------------------------------------------ exact structure
distinct_sigmas = st.lists(st.floats(S_MIN, S_MAX), min_size=3, max_size=3, unique=True)


@settings(max_examples=60, deadline=None)
@given(distinct_sigmas, st.sampled_from(sorted(TRANSFORMS)), st.integers(0, 2 ** 64 - 1))
def test_increments_add_up_exactly(sigmas, transform_name, seed):
    """inc[a, c] = inc[a, b] + inc[b, c] to 1e-12 in any order of a, b, c (three fresh samplers), and
    inc[b, a] = -inc[a, b]."""
    a, b, c = sigmas
    transform = TRANSFORMS[transform_name]
    ts = [_t(s, transform) for s in sigmas]
    if len(set(ts)) < 3:
        return
    fresh = [_sampler((6, 3), seed=seed, transform=transform) for _ in range(3)]
    whole = _inc(fresh[0], a, c, transform)
    parts = _inc(fresh[1], a, b, transform) + _inc(fresh[2], b, c, transform)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    torch.testing.assert_close(_inc(fresh[0], b, a, transform), -_inc(fresh[1], a, b, transform),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("transform_name", sorted(TRANSFORMS))
@pytest.mark.parametrize("n", [3, 10, 25])
def test_step_count_invariance_karras(n, transform_name):
    """A Karras schedule of 2n - 1 points contains the n-point one; each coarse step's increment is the sum
    of its two fine steps' increments to 1e-12 (separate samplers), so the noise path does not change."""
    transform = TRANSFORMS[transform_name]
    coarse = ds.sigmas_karras(n, S_MIN, S_MAX, append_zero_=False).tolist()
    fine = ds.sigmas_karras(2 * n - 1, S_MIN, S_MAX, append_zero_=False).tolist()
    assert fine[::2] == coarse
    ns_coarse, ns_fine = _sampler((4, 3, 5), seed=7, transform=transform), _sampler((4, 3, 5), seed=7,
                                                                                    transform=transform)
    fine_incs = [_inc(ns_fine, a, b, transform) for a, b in zip(fine[:-1], fine[1:])]
    for i, (a, b) in enumerate(zip(coarse[:-1], coarse[1:])):
        torch.testing.assert_close(_inc(ns_coarse, a, b, transform), fine_incs[2 * i] + fine_incs[2 * i + 1],
                                   rtol=0, atol=1e-12)
    total = sum(fine_incs)
    torch.testing.assert_close(_inc(ns_coarse, coarse[0], coarse[-1], transform), total, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_batch_split_invariance_bit_for_bit(dtype):
    calls = [(80.0, 20.0), (20.0, 3.0), (3.0, 0.002), (0.5, 0.7)]
    x = torch.zeros(10, 3, 4, dtype=dtype)
    full = brownian_tree_noise(x, S_MIN, S_MAX, 42)
    lower = brownian_tree_noise(x[:5], S_MIN, S_MAX, 42)
    upper = brownian_tree_noise(x[5:], S_MIN, S_MAX, 42, row_offset=5)
    bigger = brownian_tree_noise(torch.zeros(13, 3, 4, dtype=dtype), S_MIN, S_MAX, 42)
    for call in calls:
        out = full(*call)
        assert torch.equal(out[5:], upper(*call))
        assert torch.equal(out[:5], lower(*call))
        assert torch.equal(out, bigger(*call)[:10])
    single = [brownian_tree_noise(x[i:i + 1], S_MIN, S_MAX, 42, row_offset=i) for i in range(10)]
    assert torch.equal(full(*calls[0]), torch.cat([s(*calls[0]) for s in single]))


def test_deterministic_history_free_and_off_the_global_rng():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = _sampler((8, 2, 3), seed=9)
    first = [a(80.0, 10.0), a(10.0, 1.0), a(1.0, 0.01)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b = _sampler((8, 2, 3), seed=9)
    assert torch.equal(b(1.0, 0.01), first[2])  # other order, other global seed, fresh instance
    assert torch.equal(b(80.0, 10.0), first[0])
    assert torch.equal(b(10.0, 1.0), first[1])
    assert torch.equal(a(1.0, 0.01), first[2])  # asked again
    assert not torch.equal(_sampler((8, 2, 3), seed=10)(80.0, 10.0), first[0])


@pytest.mark.parametrize("shape,dtype", [((10_000, 2), torch.float32), ((1, 4, 64, 64), torch.float32),
                                         ((1, 4, 64, 64), F64), ((7,), torch.float16)])
def test_shape_dtype_and_speed(shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    ns = brownian_tree_noise(x, S_MIN, S_MAX, 0)
    times = []
    for i in range(5):  # both ends new each time: the uncached cost of one query, in CPU time (shared CI)
        start = time.process_time()
        out = ns(S_MAX - 3.0 * i, 50.0 - 7.0 * i)
        times.append(time.process_time() - start)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert torch.isfinite(out).all()
    assert min(times) < 0.05, times


# ------------------------------------------------------------------------------ k-diffusion
def test_same_law_as_k_diffusion_brownian_tree():
    """Not the same numbers (other generator) but the same law: per-call marginals (two-sample KS, mean,
    variance) and the Brownian covariance of nested intervals, for ours and k-diffusion's sampler."""
    sampling, _ = K.load()
    n = 20_000
    x = torch.zeros(n, dtype=F64)
    ours = brownian_tree_noise(x, S_MIN, S_MAX, 0)
    theirs = sampling.BrownianTreeNoiseSampler(x, S_MIN, S_MAX, seed=0)
    for a, b in [(80.0, 30.0), (2.0, 1.9), (0.05, 0.002)]:
        zo, zt = ours(a, b), theirs(a, b)
        assert stats.ks_2samp(zo.numpy(), zt.numpy()).pvalue > 1e-3
        for z in (zo, zt):
            assert abs(float(z.mean())) < 5 / math.sqrt(n)
            assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    for a, b, c in [(80.0, 40.0, 10.0), (1.0, 0.9, 0.1)]:
        expected = math.sqrt((a - b) / (a - c))
        for ns in (ours, theirs):
            assert abs(_corr(ns(a, c), ns(a, b)) - expected) < 5 / math.sqrt(n)
            assert abs(_corr(ns(a, b), ns(b, c))) < 5 / math.sqrt(n)


def _gaussian_denoiser(mu, s):
    """The exact denoiser of data N(mu, s^2 I): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    def model(x, sigma):
        sigma = ds.append_dims(sigma.to(x.dtype), x.ndim)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return model


def test_as_noise_sampler_of_k_diffusion_dpmpp_2m_sde():
    sampling, _ = K.load()
    mu, s = torch.tensor([1.0, -0.5], dtype=F64), 0.3
    model = _gaussian_denoiser(mu, s)
    n = 1024
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * S_MAX

    def run(steps, seed):
        sigmas = ds.sigmas_karras(steps, S_MIN, S_MAX)
        ns = brownian_tree_noise(x, S_MIN, S_MAX, seed)
        return sampling.sample_dpmpp_2m_sde(model, x.clone(), sigmas, noise_sampler=ns, disable=True)

    out = run(20, 1)
    assert torch.isfinite(out).all()
    assert torch.equal(out, run(20, 1))
    assert not torch.equal(out, run(20, 2))
    # The data law, to sampling error, once the discretisation is fine enough (20 steps: std +12%, the
    # same with k-diffusion's own Brownian tree or randn noise; 50 steps: +2%).
    fine = run(50, 1)
    torch.testing.assert_close(fine.mean(0), mu, rtol=0, atol=5 * s / math.sqrt(n))
    assert abs(float(fine.std(0).mean()) / s - 1) < 0.1
    # One Brownian path whatever the step count: 20 and 39 steps from the same seed end close together,
    # much closer than 39 steps from another seed.
    same, other = (run(39, 1) - out).norm(dim=1).mean(), (run(39, 2) - out).norm(dim=1).mean()
    assert same < 0.5 * other, (float(same), float(other))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("transform_name", sorted(TRANSFORMS))
def test_bad_sigmas_raise_naming_the_values(transform_name):
    ns = _sampler((2, 2), transform=TRANSFORMS[transform_name])
    with pytest.raises(ValueError, match=r"sigma=81\.0 is outside \[sigma_min, sigma_max\] = \[0\.002, 80\.0\]"):
        ns(81.0, 10.0)
    with pytest.raises(ValueError, match=r"sigma=0\.001 is outside"):
        ns(10.0, 0.001)
    with pytest.raises(ValueError, match="nan"):
        ns(float("nan"), 1.0)
    with pytest.raises(ValueError, match="sigma=3.0, sigma_next=3.0"):
        ns(3.0, 3.0)
    with pytest.raises(ValueError, match="sigma_min=5.0, sigma_max=1.0"):
        brownian_tree_noise(torch.zeros(2), 5.0, 1.0, 0)


@pytest.mark.parametrize("seed", [1.5, "3", None, True, torch.tensor(3)])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        BrownianTreeNoise(torch.zeros(2), S_MIN, S_MAX, seed)
