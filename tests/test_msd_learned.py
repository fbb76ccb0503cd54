"""benchmarks/msd_learned.py and benchmarks/digits_msd.py: structure of their quick runs (tiny models), the
equal-calls rule (every estimator's measured model calls per point equal the budget within one estimate's
cost), and the doc sections' numbers against the committed JSON."""
import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark, markdown_table

ROOT = Path(__file__).resolve().parents[1]




def _untrained_fractal(name, cache_dir=None, progress=True, iterations_scale=1.0, data_points=10_000):
    """The study's data set with untrained toy networks (the budgets do not depend on the weights)."""
    import torch

    from diffsolve_studies.toy import study
    from diffsolve_studies.toy.model import ToyModel
    density, data = study.dataset_density(name, data_points)
    g = torch.Generator().manual_seed(0)
    models = {"main": ToyModel(generator=g), "cfg_uncond": ToyModel(hidden_dim=32, generator=g),
              "autoguide": ToyModel(hidden_dim=32, generator=g)}
    return {"name": name, "density": density, "data": data, "models": models}


def test_2d_quick_runs_at_equal_calls(tmp_path, monkeypatch):
    m = load_benchmark("msd_learned")
    monkeypatch.setitem(m.COLUMNS, "fractal", ("learned", "cfg"))  # one unguided and one guided (2 calls) column
    monkeypatch.setattr(m.study, "load_dataset", _untrained_fractal)
    monkeypatch.setitem(m.QUICK, "budget", 16)
    monkeypatch.setitem(m.QUICK_STUDY, "data_points", 200)
    res = m.run(tmp_path / "q.json", quick=True, progress=False)
    specs, budget = res["config"]["estimators"], res["config"]["budget_evals_per_point"]
    assert {"kernel_matched_4", "kernel_literal_16", "posterior_ddim_16", "posterior_dpmpp_2m_sde_4",
            "one_call"} <= set(specs)
    assert set(res["runs"]) == {f"fractal/{c}/{e}/{s}" for c in ("learned", "cfg") for e, s in m.plan(specs)}
    for key, rec in res["runs"].items():
        factor = 2 if "/cfg/" in key else 1  # a guided evaluation is two model calls
        per_estimate = rec["calls_per_estimate"]
        assert per_estimate == pytest.approx(specs[rec["estimator"]]["evals"] * factor), key
        assert abs(rec["calls_per_point"] - budget * factor) <= per_estimate, (key, rec["calls_per_point"])
        assert rec["steps"] * specs[rec["estimator"]]["evals"] == budget
        assert rec["metrics"]["nonfinite_points"] == 0 and math.isfinite(rec["metrics"]["nll"])
        assert rec["final_lambda"] >= m.LAM_FLOOR
    assert json.loads((tmp_path / "q.json").read_text())["runs"].keys() == res["runs"].keys()
    linear = res["runs"]["fractal/learned/one_call/linear"]
    assert linear["final_lambda"] == pytest.approx(max(res["config"]["study_config"]["lam0"] / budget, m.LAM_FLOOR))
    assert len(m.markdown_rows(res)) == len(m.plan(specs))


def test_digits_quick_runs_at_equal_calls(tmp_path, monkeypatch):
    d = load_benchmark("digits_msd")
    monkeypatch.setattr(d, "PARAMS", ("pixels",))
    monkeypatch.setattr(d, "OFF_LAMBDAS", (2.0,))
    monkeypatch.setattr(d, "REF_SAMPLES", 4)
    monkeypatch.setattr(d, "REF_STEPS", 4)
    res = d.run(tmp_path / "d.json", quick=True, cache=tmp_path / "cache", progress=False)
    budget = res["config"]["study_config"]["budget"]
    specs = res["config"]["estimators"]
    assert len(res["runs"]) == len(d.plan(specs))
    for key, rec in res["runs"].items():
        assert rec["estimator"] in key and rec["run"]["label"] == rec["estimator"]
        # the loop stops at the first step that reaches the budget: overshoot below one estimate's cost
        assert budget <= rec["nfe"] < budget + rec["calls_per_estimate"], (key, rec["nfe"])
        assert {"fd", "accuracy", "nn_train", "nll_bpp"} <= set(rec["final"])
    assert set(res["off_manifold"]) == d._off_keys()
    for row in res["off_manifold"].values():
        assert row["one_call"]["draws"] == 1 and row["kernel_matched_16"]["draws"] == d.OFF_DRAWS
        assert all(math.isfinite(row[e]["vs_exact"]) for e in d.OFF_ESTIMATORS)
    assert "| pixels | one call | loglinear |" in d.markdown(res)


def test_results_md_section_is_the_committed_json():
    m = load_benchmark("msd_learned")
    data = json.loads((ROOT / "benchmarks" / "results" / "msd_learned.json").read_text())
    text, section = (ROOT / "docs" / "results.md").read_text(), "## MSD estimators on the learned models"
    assert markdown_table(text, section, "estimator")[1:] == m.markdown_rows(data)
    assert markdown_table(text, section, "estimator (exact denoiser)")[1:] == m.bias_rows(data)


def test_digits_md_section_is_the_committed_json():
    d = load_benchmark("digits_msd")
    data = json.loads((ROOT / "benchmarks" / "results" / "digits_msd.json").read_text())
    text = (ROOT / "docs" / "digits.md").read_text()
    section = "## MSD estimators and adaptive bandwidth"
    assert markdown_table(text, section, "param")[1:] == d.markdown_rows(data)
    assert markdown_table(text, section, "lambda")[1:] == d.off_rows(data)
