"""The committed stability report: benchmarks/results/stability.json covers every registered diffsolve solver, every
k-diffusion sampler and the report's diffusers schedulers; docs/stability.md's generated sections equal what
benchmarks/stability.py renders from it, and its table matches the JSON cell by cell (re-derived here); every planted
bug is caught by its check; the kit's fast checks on every registered solver give the verdicts the JSON records
(a solver registered later runs them too); slow: rerunning samplers reproduces their JSON entries."""
import json
import math
from pathlib import Path

import pytest
import torch

import diffsolve as ds
from diffsolve.integrations.kdiffusion import load
from diffsolve.testing import DEFAULT, check_sampler, from_solver
from diffsolve.testing.suite import run_check
from conftest import load_benchmark

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DATA = json.loads((ROOT / "benchmarks/results/stability.json").read_text())
DOC = (ROOT / "docs/stability.md").read_text()
FAST = ("exactness", "determinism", "global_rng", "batch_invariance", "nfe", "purity", "declared_noise")




def test_report_covers_every_sampler():
    sampling = load()[0]
    want = {f"diffsolve/{n}" for n in ds.SOLVERS}
    want |= {f"k-diffusion/{n}" for n in dir(sampling) if n.startswith("sample_")}
    from diffsolve.integrations.scheduler_step import REPORT_SCHEDULERS
    want |= {f"diffusers/{n}" for n in REPORT_SCHEDULERS}
    missing = sorted(want - set(DATA["samplers"]))
    assert not missing, f"rerun benchmarks/stability.py: {missing} are not in the committed report"


def test_docs_generated_sections_are_rendered_from_the_json():
    assert load_benchmark("stability").render(DATA, DOC) == DOC, "docs/stability.md is stale: run benchmarks/stability.py --render"


def _doc_table():
    lines = DOC.split("<!-- stability-table:start -->")[1].split("<!-- stability-table:end -->")[0].strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, {cells[0]: dict(zip(head, cells)) for cells in
                  ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _number(cell):
    cell = cell.replace("*", "").split(" ")[0]
    return math.inf if cell == "unbounded" else float(cell)


def _figure(value):
    """A JSON figure as the table must print it: 3 significant digits, 1 below 1e-3, "unbounded" for inf."""
    if value in ("inf", math.inf):
        return "unbounded"
    return "0" if value == 0 else f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def test_docs_table_matches_the_json_cell_by_cell():
    head, rows = _doc_table()
    assert set(rows) == set(DATA["samplers"])
    mark = {True: "yes", False: "no", None: "n/a"}
    for key, entry in DATA["samplers"].items():
        row, c = rows[key], entry["checks"]
        order = c["order"]
        if order["passed"] is None:
            assert row["observed order"] == "n/a", key
        elif order["measured"] == "exact":
            assert row["observed order"] == "exact", key
        else:
            assert row["observed order"].replace("*", "") == _figure(order["measured"]), key
            assert row["observed order"].startswith("**") == (order["passed"] is False), key
        nominal = row["nominal order"]
        assert nominal == "-" if entry["order"] is None else _number(nominal) == entry["order"], key
        stiff = c["stiff_score"]
        if stiff["passed"] is None:
            assert row["stiff bound (score)"] == "n/a", key
        else:
            assert row["stiff bound (score)"] == _figure(stiff["measured"]), key
        flow = c["stiff_flow"]
        assert row["stiff (flow)"] == ("n/a" if flow["passed"] is None else "unbounded" if flow["passed"]
                                       else f"**{_figure(flow['measured'])}**"), key
        assert row["NFE / step"].split(" ")[0] == _figure(c["nfe"]["measured"]), key
        assert ("total, adaptive" in row["NFE / step"]) == bool(entry["adaptive"]), key
        assert ("miscounted" in row["NFE / step"]) == (c["nfe"]["passed"] is False), key
        for column, check in (("deterministic", "determinism"), ("threads", "thread_invariance"),
                              ("exact", "exactness"), ("agrees", "agreement"), ("finite", "finiteness")):
            assert row[column].replace("*", "") == mark[c[check]["passed"]], (key, column)
        f64, f32 = (s.strip().replace("*", "") for s in row["batch-invariant f64 / f32"].split("/"))
        assert (f64, f32) == (mark[c["batch_invariance"]["passed"]], mark[c["batch_invariance_float32"]["passed"]])
        assert ("untouched" in row["global RNG"]) == bool(c["global_rng"]["passed"]), key
        assert row["failed checks"] == (", ".join(entry["failures"]) or "-"), key
        assert entry["failures"] == [n for n, r in c.items() if r["passed"] is False], key


def test_every_planted_bug_is_caught_and_the_originals_pass():
    assert DATA["mutants"], "the report ran without the mutants"
    for key, m in DATA["mutants"].items():
        if m["designated"] is None:
            assert m["passed"], key
        else:
            assert m["designated"] in m["failures"], key


def test_every_failure_is_explained_in_the_docs():
    """docs/stability.md states, for every check a sampler fails with the default thresholds, why that is a property
    of the sampler (a bullet of the explanations section names both)."""
    notes = DOC.split("## Why each failure is a property of the sampler")[1].split("\n## ")[0]
    bullets = notes.split("\n- ")
    for key, entry in DATA["samplers"].items():
        for check in entry["failures"]:
            assert any(f"`{key}`" in b and f"**{check}**" in b for b in bullets), \
                f"{key} fails {check} with no explanation in docs/stability.md"


@pytest.mark.parametrize("name", sorted(ds.SOLVERS))
def test_fast_checks_on_every_registered_solver_give_the_recorded_verdicts(name):
    """Iterates the registry: a solver registered after the report runs the fast checks and must pass them."""
    entry = DATA["samplers"].get(f"diffsolve/{name}")
    sampler = from_solver(name)
    for check in FAST:
        got = run_check(check, sampler, DEFAULT)
        want = entry["checks"][check]["passed"] if entry else got.passed is not False
        assert got.passed == want, (name, check, got.details)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["diffsolve/heun", "diffsolve/dpmpp_2m_sde", "k-diffusion/sample_dpm_adaptive",
                                 "diffusers/UniPCMultistepScheduler"])
def test_rerun_reproduces_the_committed_entry(key):
    make = load_benchmark("stability").samplers({key})[key]
    fresh = check_sampler(make(), config=DEFAULT).to_dict()
    old = DATA["samplers"][key]
    assert fresh["failures"] == old["failures"]
    for name, check in fresh["checks"].items():
        assert check["passed"] == old["checks"][name]["passed"], (key, name)
        assert check["measured"] == old["checks"][name]["measured"], (key, name)
