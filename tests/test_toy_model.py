"""The toy score network (diffsolve_studies.toy.model) and its cached, resumable training (diffsolve_studies.toy.train)."""
import math

import pytest
import torch

from diffsolve.analytic import GaussianMixture
from diffsolve_studies.toy import ToyModel, fractal_tree, kde_mixture, toy_models, train_toy_model
from diffsolve_studies.toy import train as train_mod
from diffsolve_studies.toy.model import MPLinear, MPSiLU
from diffsolve_studies.toy.train import MixtureScore, power_function_beta, std_to_exp


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def two_blobs():
    """A small anisotropic 2-component mixture in 2D."""
    means = torch.tensor([[-0.6, 0.2], [0.5, -0.3]], dtype=torch.float64)
    covs = torch.tensor([[[0.02, 0.01], [0.01, 0.03]], [[0.01, 0.0], [0.0, 0.04]]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.3, 0.7]), means, covs)


def random_model(dtype=torch.float64, hidden_dim=16, gain=0.8):
    net = ToyModel(hidden_dim=hidden_dim, num_layers=2, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        net.gain.fill_(gain)
    return net.eval()


SMALL = dict(hidden_dim=16, num_layers=2, batch=128, progress=False)


# ------------------------------------------------------------------------------------------- model
def test_parameter_count_and_init_density():
    net = ToyModel()
    assert sum(p.numel() for p in net.parameters()) == 4 * 64 + 4 * 64 ** 2 + 1 == 16641
    # gain = 0 at init: the model is N(0, (sigma_data^2 + sigma^2) I), so D = x sigma_data^2 / (sigma_data^2 + sigma^2)
    x = torch.randn(5, 2)
    torch.testing.assert_close(net(x, 0.3), x * 0.25 / (0.25 + 0.09))


@pytest.mark.parametrize("sigma", [0.37, "rows"])
def test_score_is_gradient_of_logp(sigma):
    net = random_model()
    x = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if sigma == "rows":
        sigma = torch.linspace(0.05, 2.0, 7, dtype=torch.float64)
    score = net.score(x, sigma)
    assert score.shape == x.shape and not score.requires_grad
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(net.logp(xr, sigma).sum(), xr)
    torch.testing.assert_close(score, auto)
    h = 1e-6  # central finite differences (float64)
    fd = torch.stack([(net.logp(x + h * e, sigma) - net.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], -1)
    torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6)


def test_score_create_graph_is_differentiable():
    net = random_model()
    x = torch.randn(4, 2, dtype=torch.float64)
    s = net.score(x, 0.5, create_graph=True)
    assert s.requires_grad
    (g,) = torch.autograd.grad(s.square().sum(), net.gain)
    assert torch.isfinite(g) and g != 0


def test_denoiser_under_no_grad():
    net = random_model(dtype=torch.float32)
    x = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.2, 0.5, 1.0, 3.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        d = net(x, sigma, class_labels=None)
        d_scalar = net(x.float(), 0.5)
    assert d.shape == x.shape and d.dtype == torch.float64 and not d.requires_grad
    assert d_scalar.dtype == torch.float32 and d_scalar.shape == x.shape
    expected = x + sigma[:, None] ** 2 * net.score(x, sigma.clamp_min(1e-3)).double()
    torch.testing.assert_close(d[:5], expected[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d[5], x[5])  # sigma = 0 returns x
    assert torch.isfinite(d).all()
    with torch.inference_mode():
        d_inf = net(x, sigma)
    torch.testing.assert_close(d_inf.clone(), d)


def test_bad_shapes_raise():
    net = ToyModel()
    with pytest.raises(ValueError, match="sigma"):
        net(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="x must have shape"):
        net.score(torch.zeros(3, 3), 0.5)


# ------------------------------------------------------------------------- magnitude preservation
def test_mp_layers_preserve_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 64, generator=g)
    layer = MPLinear(64, 64, generator=g)
    with torch.no_grad():
        layer.weight.mul_(17.0)  # the raw scale of W must not matter
        y = layer.eval()(x)
    rms = y.square().mean(0).sqrt()  # per output feature
    assert rms.min() > 0.9 and rms.max() < 1.1
    assert MPSiLU()(x).square().mean().sqrt().item() == pytest.approx(1.0, abs=0.03)
    # the whole hidden stack keeps unit-ish magnitude on unit input
    net = ToyModel(generator=g).eval()
    with torch.no_grad():
        h = net.layers(torch.randn(20000, 4, generator=g))
    assert 0.5 < h.square().mean().sqrt().item() < 2.0


def test_forced_weight_normalisation_in_training_mode():
    layer = MPLinear(8, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1.0, 6.0)[:, None])
    raw = layer.weight.detach().clone()
    before = layer.eval()(torch.ones(2, 8))
    assert torch.equal(layer.weight, raw)  # eval mode leaves the raw weight alone
    after = layer.train()(torch.ones(2, 8))
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.full((5,), math.sqrt(8)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- recipe
def test_power_function_ema_exponent():
    gamma = std_to_exp(0.010)
    assert gamma == pytest.approx(96.995, abs=1e-3)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.010, rel=1e-12)
    assert power_function_beta(0, gamma) == 0.0
    assert power_function_beta(999, gamma) == pytest.approx((1 - 1 / 1000) ** (gamma + 1))


@pytest.mark.parametrize("kind", ["fractal", "kde"])
def test_fast_target_score_matches_mixture_score(kind):
    g = torch.Generator().manual_seed(1)
    points = torch.rand(300, 2, generator=g, dtype=torch.float64)
    gmm = fractal_tree("AB") if kind == "fractal" else kde_mixture(points, 0.02)
    sigma = (torch.randn(700, generator=g, dtype=torch.float64) * 1.5 - 2.3).exp()
    x = gmm.sample(700, sigma, generator=g)
    fast = MixtureScore(gmm, rows=128)
    assert fast.isotropic == (kind == "kde")
    torch.testing.assert_close(fast(x, sigma), gmm.score(x, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast(x[:5], 0.3), gmm.score(x[:5], 0.3), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------- training
def test_short_training_lowers_loss_and_approaches_exact_denoiser(tmp_path):
    gmm = two_blobs()
    losses = []
    net = train_toy_model(gmm, hidden_dim=64, num_layers=4, iterations=200, batch=512, progress=False,
                          cache_dir=tmp_path, callback=lambda it, loss: losses.append(loss))
    assert len(losses) == 200 and not net.training
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:10]) / 10
    g = torch.Generator().manual_seed(5)
    x = gmm.sample(4000, 0.5, generator=g)
    exact = gmm.denoise(x, 0.5)
    init = ToyModel(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err_trained = (net(x, 0.5) - exact).square().sum(-1).mean()
        err_init = (init(x, 0.5) - exact).square().sum(-1).mean()
    assert err_trained < 0.5 * err_init
    assert net.train_seconds > 0


def test_cache_hit_loads_without_training(tmp_path, monkeypatch):
    gmm = two_blobs()
    rng_state = torch.random.get_rng_state()
    first = train_toy_model(gmm, iterations=6, cache_dir=tmp_path, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # only the explicit generator is used
    assert first.cache_path.exists() and first.cache_path.parent == tmp_path / "toy_models"

    def no_training(*a, **k):
        raise AssertionError("training ran on a cache hit")

    monkeypatch.setattr(train_mod, "MixtureScore", no_training)
    second = train_toy_model(gmm, iterations=6, cache_dir=tmp_path, **SMALL)
    assert not second.training and second.train_seconds == first.train_seconds
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(second.losses, first.losses)

    # a different config or a different mixture is a different cache entry (so it would train)
    for kw, other in [(dict(iterations=7), gmm), (dict(iterations=6, seed=1), gmm),
                      (dict(iterations=6), GaussianMixture(gmm.weights, gmm.means + 1e-9, gmm.covs))]:
        with pytest.raises(AssertionError, match="training ran"):
            train_toy_model(other, cache_dir=tmp_path, **{**SMALL, **kw})


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSOLVE_CACHE", str(tmp_path / "env"))
    net = train_toy_model(two_blobs(), iterations=2, name="a/b c", **SMALL)
    assert net.cache_path.parent == tmp_path / "env" / "toy_models"
    assert net.cache_path.name.startswith("a_b_c-")


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    gmm = two_blobs()
    kw = dict(iterations=30, checkpoint_every=10, seed=4, **SMALL)
    ref = train_toy_model(gmm, cache_dir=tmp_path / "ref", **kw)

    def stop_at_25(it, loss):
        if it == 25:
            raise Interrupt

    with pytest.raises(Interrupt), torch.inference_mode():  # training also works inside inference mode
        train_toy_model(gmm, cache_dir=tmp_path / "run", callback=stop_at_25, **kw)
    files = sorted(p.name for p in (tmp_path / "run" / "toy_models").iterdir())
    assert len(files) == 1 and files[0].endswith(".ckpt.pt")  # checkpoint of iteration 20, no final file

    seen = []
    with torch.no_grad():
        resumed = train_toy_model(gmm, cache_dir=tmp_path / "run", callback=lambda it, loss: seen.append(it), **kw)
    assert seen == list(range(21, 31))
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(ref.losses, resumed.losses)
    files = sorted(p.name for p in (tmp_path / "run" / "toy_models").iterdir())
    assert files == [resumed.cache_path.name]  # checkpoint removed once finished


@pytest.mark.parametrize("fail_at", ["checkpoint", "final"])
def test_cache_writes_are_atomic(tmp_path, monkeypatch, fail_at):
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temporary file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    every = 2 if fail_at == "checkpoint" else 100
    with pytest.raises(OSError, match="disk full"):
        train_toy_model(two_blobs(), iterations=4, checkpoint_every=every, cache_dir=tmp_path, **SMALL)
    assert list((tmp_path / "toy_models").iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    net = train_toy_model(two_blobs(), iterations=4, checkpoint_every=every, cache_dir=tmp_path, **SMALL)
    assert [p.name for p in (tmp_path / "toy_models").iterdir()] == [net.cache_path.name]


def test_toy_models_of_the_studies(tmp_path):
    models = toy_models("fractal", cache_dir=tmp_path, progress=False, iterations_scale=1 / 512)
    assert set(models) == {"main", "cfg_uncond", "autoguide"}
    assert [models[k].hidden_dim for k in ("main", "cfg_uncond", "autoguide")] == [64, 32, 32]
    assert [len(models[k].losses) for k in ("main", "cfg_uncond", "autoguide")] == [8, 1, 1]
    assert models["main"].train_config["batch"] == 4096
    again = toy_models("fractal", cache_dir=tmp_path, progress=False, iterations_scale=1 / 512)
    assert all(again[k].train_seconds == models[k].train_seconds for k in models)
    pin = toy_models("pinwheel", cache_dir=tmp_path, progress=False, iterations_scale=1 / 2048)
    assert set(pin) == {"main"} and len(pin["main"].losses) == 2
    with pytest.raises(ValueError, match="dataset"):
        toy_models("moons", cache_dir=tmp_path)
