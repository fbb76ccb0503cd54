"""benchmarks/msd_cost.py: its quick run writes the JSON the docs read, and docs/msd-cost.md's measured part is
the committed JSON (`msd_cost.py --markdown` prints it from benchmarks/results/msd_cost.json)."""
import json
import math
from pathlib import Path
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- msd_cost:begin -->", "<!-- msd_cost:end -->"




BENCH = load_benchmark("msd_cost")
ROW_KEYS = {"problem", "point", "lam", "estimator", "calls", "steps", "mean_error", "mean_se", "cov_error", "cov_floor"}
BETWEEN_KEYS = {"energy_distance", "energy_distance_se", "mode_masses", "exact_mode_masses", "mode_mass_error",
                "mean_error_from_mode_masses", "mean_error_within_modes"}


def check_structure(data, quick):
    est = set(BENCH.estimators())
    problems = BENCH.problems()
    assert data["quick"] is quick and set(data["estimators"]) == est
    for prob, (_, points, between, groups) in problems.items():
        rows = [r for r in data["rows"] if r["problem"] == prob]
        assert {r["estimator"] for r in rows} == est, prob
        assert {(r["point"], r["lam"]) for r in rows} == {(p, lam) for p in points for lam in data["lams"]}
        for r in rows:
            assert ROW_KEYS <= set(r) and r["calls"] <= max(data["calls"]), r
            if r["point"] == between and r["estimator"] != "one call":
                assert BETWEEN_KEYS <= set(r), r
                assert len(r["mode_masses"]) == len(groups)
                assert math.isclose(sum(r["exact_mode_masses"]), 1.0, abs_tol=1e-9)
        assert set(data["mean_summary"][prob]) == est
        assert set(data["cov_summary"][prob]) == est - {"one call"}
        for gc in data["goal_check"][prob].values():
            assert {"joint_at", "budget", "mean_and_cov", "energy_distance_within_3se", "mode_masses_within_0_02",
                    "goal"} <= set(gc)
    for info in data["identical_chains"].values():
        assert info["max_abs_difference"] < 1e-10
    assert set(data["learned_summary"]["learned fractal model"]) == est
    beside = set(data["learned_summary"]["fractal, exact denoiser (same grid)"])  # at 8 and 32 calls in a full run
    assert beside == (est if quick else est - {"one call"})
    assert data["grid_scan"] and {"solver", "rho", "sigma_min", "mean_error", "cov_error"} <= set(data["grid_scan"][0])


def test_quick_run_writes_the_json(tmp_path):
    out, fig = tmp_path / "msd_cost.json", tmp_path / "msd_cost.png"
    BENCH.main(["--quick", "--out", str(out), "--figure", str(fig)])
    data = json.loads(out.read_text())
    check_structure(data, quick=True)
    assert fig.stat().st_size > 10_000
    assert BENCH.markdown(data).count("\n|") > 20


def test_committed_json_is_a_full_run():
    data = json.loads((ROOT / "benchmarks" / "results" / "msd_cost.json").read_text())
    check_structure(data, quick=False)
    assert data["samples"] >= 4096 and data["calls"] == list(BENCH.CALLS) and data["lams"] == list(BENCH.LAMS)
    assert (ROOT / "docs" / "figures" / "msd_cost.png").stat().st_size > 10_000


def test_doc_is_the_committed_json():
    data = json.loads((ROOT / "benchmarks" / "results" / "msd_cost.json").read_text())
    text = (ROOT / "docs" / "msd-cost.md").read_text()
    assert text.count(DOC_BEGIN) == 1 and text.count(DOC_END) == 1
    got = text[text.index(DOC_BEGIN) + len(DOC_BEGIN):text.index(DOC_END)].strip().splitlines()
    want = BENCH.markdown(data).strip().splitlines()
    assert len(got) == len(want), f"docs/msd-cost.md has {len(got)} measured lines, the JSON gives {len(want)}"
    for i, (line, expected) in enumerate(zip(got, want)):
        assert line == expected, f"docs/msd-cost.md measured line {i}: {line!r} != {expected!r} (from the JSON)"
