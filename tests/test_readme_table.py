"""The README's "Measured" overhead table is the committed benchmark JSON, cell by cell
(`benchmarks/solver_overhead.py --markdown` prints it from benchmarks/results/solver_overhead.json)."""
import json
from pathlib import Path

from conftest import load_benchmark, markdown_table

ROOT = Path(__file__).resolve().parents[1]




def test_readme_table_is_the_committed_json():
    data = json.loads((ROOT / "benchmarks" / "results" / "solver_overhead.json").read_text())
    expected = load_benchmark("solver_overhead").markdown_rows(data)
    got = markdown_table((ROOT / "README.md").read_text(), "## Measured")
    assert len(got) == len(expected), f"README has {len(got)} rows, the JSON {len(expected)}"
    for i, (row, want) in enumerate(zip(got, expected)):
        assert row == want, f"README table row {i}: {row} != {want} (from the JSON)"


def test_every_measured_sampler_is_in_the_json():
    """Every sampler the benchmark would measure (registry names with a k-diffusion twin) has a row per MLP case."""
    data = json.loads((ROOT / "benchmarks" / "results" / "solver_overhead.json").read_text())
    rows = {(r["case"], r["solver"]) for r in data["results"]}
    for name in load_benchmark("solver_overhead").twins():
        for case in ("mlp_2d_batch16", "mlp_2d_batch10000"):
            assert (case, f"sample_{name}") in rows, f"{name} has no {case} row: rerun benchmarks/solver_overhead.py"
