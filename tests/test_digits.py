"""The digits testbed: its metrics against closed forms, its networks' conventions, resumable training,
and the whole comparison in quick mode (every method runs, numbers finite, results resume)."""
import json
import math

import pytest
import torch
from conftest import frechet_distance_scipy

from diffsolve.analytic import GaussianMixture
from diffsolve_studies.digits import run, study, train
from diffsolve_studies.digits.data import LEVELS, bits_per_pixel, dequantize, load_digits_split
from diffsolve_studies.digits.evaluate import frechet_distance, log_likelihood
from diffsolve_studies.digits.images import CoordinateImages, pixel_centres
from diffsolve_studies.digits.model import NULL_CLASS, DigitsDenoiser

torch.set_num_threads(1)


def test_frechet_distance_matches_the_scipy_formula_and_its_identities():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_scipy(a.numpy(), b.numpy()), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = torch.tensor([0.5, 0, 0, 0, 0, -1.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(1.25, abs=1e-9)  # same covariance: |mean shift|^2
    with pytest.raises(ValueError, match=r"\(300, 6\), \(200, 5\)"):
        frechet_distance(a, b[:, :5])


def test_log_likelihood_of_a_64d_gaussian_converges_to_the_exact_density():
    g = torch.Generator().manual_seed(0)
    root = torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.1
    gm = GaussianMixture(torch.ones(1, dtype=torch.float64), 0.3 * torch.randn(1, 64, generator=g, dtype=torch.float64),
                         (root @ root.T + 0.05 * torch.eye(64, dtype=torch.float64))[None])
    x = gm.sample(100, generator=g)
    exact = gm.log_prob(x, 0.002)
    err = {n: float((log_likelihood(gm, x, steps=n, probes=4, generator=g) - exact).mean()) for n in (32, 128)}
    assert abs(err[128]) < 0.35 and abs(err[128]) < abs(err[32]) / 4, err  # second order in the step


def test_bits_per_pixel_of_the_uniform_model_is_log2_17():
    log_px = torch.full((3,), -64 * math.log(2.0))  # uniform on [-1, 1)^64
    assert torch.allclose(bits_per_pixel(log_px), torch.full((3,), math.log2(LEVELS)))


def test_split_is_stratified_disjoint_and_dequantisation_stays_in_its_cell():
    s = load_digits_split(0.3, seed=0)
    assert len(s.train_labels) + len(s.heldout_labels) == 1797
    for c in range(10):
        n_h, n_t = int((s.heldout_labels == c).sum()), int((s.train_labels == c).sum())
        assert abs(n_h / (n_h + n_t) - 0.3) < 0.01
    rows = {tuple(r) for r in s.train_images.tolist()}
    assert sum(tuple(r) in rows for r in s.heldout_images.tolist()) < 10  # only true duplicates in the data
    x = dequantize(s.train_images, torch.Generator().manual_seed(0))
    k = torch.floor((x + 1) * LEVELS / 2).long()
    assert torch.equal(k, s.train_images) and x.min() >= -1 and x.max() < 1
    with pytest.raises(ValueError, match="integers in 0..16"):
        dequantize(s.train_images + 1)


def test_denoiser_preconditioning_is_the_gaussian_optimum_at_initialisation():
    net = DigitsDenoiser(width=32, depth=1, emb=16, sigma_data=0.7)  # output layer zero-initialised: D = c_skip x
    x, sigma = torch.randn(5, 64), torch.tensor([0.01, 0.1, 0.7, 3.0, 80.0])
    expected = 0.49 / (sigma[:, None] ** 2 + 0.49) * x  # E[x0 | x] for x0 ~ N(0, 0.7^2 I)
    assert torch.allclose(net(x, sigma, torch.arange(5)), expected, atol=1e-6)
    for w in (net.out.weight, net.blocks[0].fc2.weight):
        torch.nn.init.normal_(w)
    assert torch.equal(net(x, sigma), net(x, sigma, torch.full((5,), NULL_CLASS)))
    assert not torch.allclose(net(x, sigma), net(x, sigma, torch.arange(5)))
    with pytest.raises(ValueError, match=r"64 pixels, got shape \(5, 63\)"):
        net(x[:, :63], sigma)


def test_coordinate_images_equal_independent_per_image_mlps():
    imgs = CoordinateImages(3, features=8, width=16, depth=3, generator=torch.Generator().manual_seed(0))
    out = imgs()
    for i in range(3):
        h = imgs.phi
        for j, (w, b) in enumerate(zip(imgs.weights, imgs.biases)):
            h = torch.nn.functional.linear(h, w[i].T, b[i, 0])
            h = torch.tanh(h) if j == 2 else torch.nn.functional.silu(h)
        assert torch.allclose(out[i], h[:, 0], atol=1e-6)
    assert pixel_centres()[1].tolist() == [0.1875, 0.0625]  # row-major: x varies fastest


def test_training_resumes_bit_identically_from_a_checkpoint(tmp_path):
    split = load_digits_split()
    cfg = dict(train.CLASSIFIER, width=16, iterations=40)
    whole = train.train_classifier(split, cfg, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.train_classifier(split, cfg, tmp_path / "b", progress=False, checkpoint_every=20, stop_after=20)
    resumed = train.train_classifier(split, cfg, tmp_path / "b", progress=False, checkpoint_every=20)
    for p, q in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    cached = train.train_classifier(split, cfg, tmp_path / "b", progress=False)
    assert cached.cache_path == resumed.cache_path


def test_run_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="'sgd'"):
        study.Run("sgd")
    with pytest.raises(ValueError, match="'rgb'"):
        study.Run("msd", param="rgb")
    with pytest.raises(ValueError, match="-1"):
        study.Run("msd", scale=-1.0)


def test_quick_study_runs_every_method_at_equal_nfe_and_resumes(tmp_path):
    cfg = study.quick_config()
    results = run.run_study(cfg, run.QUICK_TRAINING, tmp_path / "out", tmp_path / "cache", progress=False,
                            json_name="digits-quick.json")
    planned = {r.key for r in study.plan(cfg)}
    assert planned == set(results["runs"])
    methods = {(r["run"]["method"], r["run"].get("param")) for r in results["runs"].values()}
    assert {(m, p) for m in study.METHODS for p in study.PARAMETRISATIONS} <= methods
    for key, r in results["runs"].items():
        final = r["final"]
        assert final["finite"] and all(math.isfinite(final[k]) for k in ("fd", "accuracy", "nn_train", "nll_bpp")), key
        if r["run"]["method"] != "ddim":  # equal NFE: the budget, overshot by less than one step's cost
            assert cfg.budget <= r["nfe"] < cfg.budget + r["nfe_per_step"] + 1e-9, key
            assert len(r["curve"]) == cfg.evals + 1
    saved = json.loads((tmp_path / "out" / "digits-quick.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys()
    again = run.run_study(cfg, run.QUICK_TRAINING, tmp_path / "out", tmp_path / "cache", progress=False,
                          json_name="digits-quick.json")
    assert {k: r["seconds"] for k, r in again["runs"].items()} == {k: r["seconds"] for k, r in results["runs"].items()}
    from diffsolve_studies.digits.report import tables
    assert "## Equal NFE, mlp" in tables(results)


def test_docs_main_tables_quote_the_committed_runs():
    """docs/digits.md's equal-NFE tables (seed 0, then seed 1) are the committed JSON, cell by cell."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs/digits.md").read_text().splitlines()
    columns = [(p, w) for p in ("pixels", "mlp") for w in ("1", "3", "7.5")]
    checked = 0
    for table, name in enumerate(("digits.json", "digits_seed1.json")):
        runs = json.loads((root / "benchmarks/results" / name).read_text())["runs"]
        for method in study.METHODS:
            label = f"| {method.upper()}" + (" (+ heuristics) |" if method == "msd" else " |")
            line = [l for l in doc if l.startswith(label)][table]
            cells = [c.strip() for c in line.strip("|").split("|")[1:]]
            for (param, w), cell in zip(columns, cells):
                heur = "interval+inverted/loglinear" if method == "msd" else "none"
                final = runs[f"{method}/{param}/cfg/w{w}/{heur}"]["final"]
                assert float(cell.split()[0].strip("*")) == round(final["fd"], 1), (name, method, param, w)
                checked += 1
    assert checked == 48
