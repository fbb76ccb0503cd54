"""Corrections to the 2D study: Table 3's cost (efficiency independent of the number of estimates k), the
official SDI variant against its closed form on single-Gaussian data (where DDIM inversion is affine), and
VSD's variational model trained on the gradient's own sigma distribution."""
import math

import pytest
import torch

from diffsolve.analytic import GaussianMixture
from diffsolve.distill import SDI, VSD, DenoisingTrainer, OfficialSDI, make_distiller, sigma_from_uniform
from diffsolve.distill.sdi import sd_alphas_cumprod
from diffsolve_studies.toy import study
from diffsolve_studies.toy.model import ToyModel

torch.set_num_threads(1)
F64 = torch.float64


# ------------------------------------------------------------------------------------- Table 3's cost
@pytest.mark.parametrize("method", ["sds", "msd"])
def test_efficiency_does_not_depend_on_the_number_of_estimates(method):
    """k single estimates per point: cost is the model calls of one estimate, so eq. 17 does not move with k
    (dividing the cost by k again made ln(efficiency) grow by ln k)."""
    cfg = study.StudyConfig(chain_steps=8)
    density, data = study.dataset_density("fractal", 1000)
    ds = {"density": density, "data": data}
    model = density  # the exact mixture denoiser (steadier than the ideal one at k = 16)
    pts = study.grid_points(4, lim=1.0)
    oracle = study.oracle_gradient(ds, pts, cfg)
    runs = {k: study.efficiency_points(method, model, [], None, "ideal", cfg, oracle, pts, k=k, seed=1)
            for k in (16, 256)}
    calls = 1.0 if method == "sds" else runs[16]["cost"]
    assert runs[16]["cost"] == runs[256]["cost"] == calls and (method == "sds" or calls > 2)
    for kind in ("own_mean", "oracle"):
        for stat in ("log_mean_efficiency", "mean_log_efficiency"):
            assert abs(runs[16][kind][stat] - runs[256][kind][stat]) < 0.4, (kind, stat, runs)  # ln 16 = 2.77


# ------------------------------------------------------------------------------------------ official SDI
MU, S = 0.5, 0.3


def _gauss():
    return GaussianMixture.isotropic(torch.full((1, 2), MU, dtype=F64), S)


def _sd_schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def _official_closed_form(x, k, K, delta):
    """The official SDI gradient on N(MU, S^2 I) with eta = 0, written out: the optimisation step k of K
    anneals t = int(1000 (0.96 (1 - k / K) + 0.02)); the inversion runs in VP coordinates through abar_0 (the
    "timestep -99" of the leading grid), abar_1, abar_101, ... below t, then abar_{t + delta}; each DDIM step
    x_next = sqrt(a') x0_hat + sqrt(1 - a') eps_hat with the exact eps_hat of the Gaussian; then the exact
    x0_hat at timestep t of that latent, and grad = x - x0_hat."""
    acp = _sd_schedule()
    t = int(1000 * ((0.98 - 0.02) * (1 - k / K) + 0.02))
    grid = [0] + [j for j in range(1, 1000, 100) if j < t] + [min(t + delta, 999)]
    xt = x.clone()  # the VP latent at abar_0
    for lo, hi in zip(grid[:-1], grid[1:]):
        a, a2 = acp[lo], acp[hi]
        # exact x0_hat of N(MU, S^2) under the VP marginal sqrt(a) x0 + sqrt(1 - a) n
        x0 = MU + S ** 2 * math.sqrt(a) / (a * S ** 2 + 1 - a) * (xt - math.sqrt(a) * MU)
        eps = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
        xt = math.sqrt(a2) * x0 + math.sqrt(1 - a2) * eps
    a = acp[t]
    x0 = MU + S ** 2 * math.sqrt(a) / (a * S ** 2 + 1 - a) * (xt - math.sqrt(a) * MU)
    return x - x0, t


def test_sd_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(sd_alphas_cumprod(), sched.alphas_cumprod.to(F64), rtol=0, atol=2e-6)


def test_official_sdi_equals_its_closed_form_on_gaussian_data():
    x = torch.tensor([[1.2, -0.3], [0.4, 0.9], [-0.7, 0.1], [0.0, 0.0]], dtype=F64).repeat(8, 1)
    K = 10
    for k in (0, 3, 9):
        sdi = OfficialSDI(_gauss(), total_steps=K, inversion_eta=0.0)
        sdi.on_step(k)
        g = sdi.grad(x, torch.Generator().manual_seed(k))
        forms = torch.stack([_official_closed_form(x, k, K, d)[0] for d in range(100)])  # [delta, rows, 2]
        err = (forms - g[None]).abs().amax(-1)  # per delta and row
        best = err.min(0)
        assert best.values.max() < 1e-8, best.values.max()
        t = _official_closed_form(x, k, K, 0)[1]
        if t + 99 <= 999:  # (t + delta is clamped to 999)
            assert len(set(best.indices.tolist())) > 3  # the jitter delta is drawn per row, over 0..99
        assert sdi.timestep() == t
        assert sdi.last_nfe == 1 + len([j for j in range(1, 1000, 100) if j < t]) + 1  # inversion steps + 1
    # without jitter: every row at delta = 0 exactly
    sdi = OfficialSDI(_gauss(), total_steps=K, inversion_eta=0.0, jitter_steps=1)
    sdi.on_step(3)
    assert (sdi.grad(x) - _official_closed_form(x, 3, K, 0)[0]).abs().max() < 1e-8


def test_official_sdi_eta_noise_has_its_closed_form_variance():
    """eta > 0 adds eta sqrt(posterior variance) xi after every inversion step; the gradient is affine in
    those draws, so its mean is the eta = 0 closed form and its variance per dimension is
    r_t^2 sum_j (prod_{i > j} c_i)^2 std_j^2 (c: the affine DDIM factor of each later step, VE units)."""
    K, k, eta = 10, 5, 0.3
    sdi = OfficialSDI(_gauss(), total_steps=K, inversion_eta=eta, jitter_steps=1)
    sdi.on_step(k)
    x = torch.tensor([[1.2, -0.3]], dtype=F64).repeat(6000, 1)
    g = sdi.grad(x, torch.Generator().manual_seed(0))
    mean, _ = _official_closed_form(x[:1], k, K, 0)
    acp = _sd_schedule()
    t = sdi.timestep()
    grid = [0] + [j for j in range(1, 1000, 100) if j < t] + [t]
    sig = [math.sqrt((1 - acp[j]) / acp[j]) for j in grid]
    var = 0.0
    for j in range(1, len(grid)):  # noise added after step j (into level grid[j])
        a_lo, a_hi = acp[grid[j - 1]], acp[grid[j]]
        std2 = eta ** 2 * (1 - a_lo) / (1 - a_hi) * (1 - a_hi / a_lo) / a_hi
        carry = 1.0
        for i in range(j, len(grid) - 1):  # the later DDIM steps scale it by c_i
            r = S ** 2 / (S ** 2 + sig[i] ** 2)
            carry *= r + sig[i + 1] / sig[i] * (1 - r)
        var += carry ** 2 * std2
    r_t = S ** 2 / (S ** 2 + sig[-1] ** 2)
    var *= r_t ** 2
    se = math.sqrt(var / len(x))
    assert ((g.mean(0) - mean[0]).abs() < 5 * se).all(), (g.mean(0), mean, se)
    assert (g.var(0) / var - 1).abs().max() < 5 * math.sqrt(2 / len(x)), (g.var(0), var)


def test_official_sdi_differs_from_the_paper_algorithm_variant():
    x = torch.tensor([[1.2, -0.3], [0.4, 0.9]], dtype=F64)
    official = make_distiller("sdi_official", _gauss(), total_steps=10, inversion_eta=0.0, jitter_steps=1)
    paper = make_distiller("sdi", _gauss(), total_steps=10, tau_max=0.0, eta_noise=0.0, weighting="sds")
    for k in (0, 5):
        official.on_step(k), paper.on_step(k)
        assert (official.grad(x) - paper.grad(x)).abs().max() > 0.05
    assert isinstance(paper, SDI) and not isinstance(paper, OfficialSDI)


@pytest.mark.parametrize("bad", [dict(t_range=(0.5, 0.2)), dict(n_inversion=0), dict(inversion_eta=-1.0),
                                 dict(jitter_steps=0), dict(total_steps=0), dict(steps_offset=200),
                                 dict(alphas_cumprod=torch.linspace(0.1, 0.9, 10))])
def test_official_sdi_validates_its_options(bad):
    with pytest.raises(ValueError):
        OfficialSDI(_gauss(), **bad)


# ------------------------------------------------------------------------------- VSD's variational model
def test_vsd_trains_phi_on_the_gradients_sigma_distribution():
    net = ToyModel(hidden_dim=8, num_layers=1, generator=torch.Generator().manual_seed(0))
    trainer = DenoisingTrainer(net, steps_per_update=3)
    with pytest.raises(ValueError, match="sigma distribution"):
        trainer.draw_sigma(10)
    VSD(net, None, variational_update=trainer, sigma_min=0.002, sigma_max=5.0)
    s = trainer.draw_sigma(40_000, torch.Generator().manual_seed(0))
    u = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    expected = sigma_from_uniform(1 - u, 0.002, 5.0)  # quantiles of the rho-grid (u = 0 is sigma_max)
    assert torch.allclose(torch.quantile(s, u), expected, rtol=0.03)
    assert abs(float(s.median()) - 0.28) < 0.02  # the old lognormal(-2.3, 1.5) had median 0.10
    particles = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    trainer(particles, torch.Generator().manual_seed(2))
    assert all(state["step"] == 3 for state in trainer.opt.state.values())  # steps_per_update Adam steps
    lognormal = DenoisingTrainer(net, p_mean=-1.2, p_std=1.2)  # an explicit lognormal is kept
    VSD(net, None, variational_update=lognormal)
    assert abs(float(lognormal.draw_sigma(40_000, torch.Generator().manual_seed(0)).median()) - math.exp(-1.2)) < 0.01
    with pytest.raises(ValueError):
        DenoisingTrainer(net, p_mean=-1.2)
    with pytest.raises(ValueError):
        DenoisingTrainer(net, steps_per_update=0)
