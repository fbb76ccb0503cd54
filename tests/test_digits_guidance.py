"""benchmarks/digits_guidance.py: the quick mode on tiny digits models (every planned run present, equal model calls
for every guidance method), its CFG rows are the study's own runs, CFG++ is refused where it does not apply, and
docs/digits.md's "Guidance methods" tables are the committed JSON, cell by cell."""
import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, markdown_table

from diffsolve_studies.digits import study
from diffsolve_studies.digits.run import load_testbed

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "digits_guidance.json"




@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = load_benchmark("digits_guidance")
    root = tmp_path_factory.mktemp("guidance")
    results = bench.main(["--quick", "--out", str(root / "g.json"), "--cache", str(root / "cache")])
    return bench, results, root


def test_quick_mode_runs_every_planned_run_at_equal_calls(quick):
    bench, results, root = quick
    cfg_ = study.quick_config()
    want = {bench.key(*p) for p in bench.plan(quick=True)}
    assert set(results["runs"]) == want and len(want) == 5 + 4 * 2 + 1  # DDIM; SDS and MSD; CFG++ with MSD
    assert json.loads((root / "g.json").read_text())["runs"].keys() == results["runs"].keys()
    assert (root / "g.md").read_text() == bench.markdown(results)
    steps = {}
    for k, rec in results["runs"].items():
        assert all(v == v for v in rec["final"].values() if isinstance(v, float)), k  # no NaN metric
        if rec["kind"] == "ddim":  # every method costs 2 calls per DDIM step
            assert rec["nfe"] == 2 * cfg_.ddim_steps, k
            continue
        # the budget is met and not overshot by more than one step, the same step count for every method
        assert cfg_.budget <= rec["nfe"] < cfg_.budget + rec["nfe_per_step"], k
        steps.setdefault((rec["distiller"], rec["param"]), set()).add(rec["steps"])
    assert all(len(s) == 1 for s in steps.values()), steps
    assert not any(k.startswith("sds/") and "cfg_pp" in k for k in results["runs"])


def test_cfg_rows_are_the_studys_own_runs(quick):
    """The benchmark's plain-CFG DDIM is `study.ddim_reference` to the bit, and its SDS distiller gives the study's
    distiller's gradient. Negative controls: CFG-Zero*'s zero-init first step moves DDIM's samples, another seed
    SDS's gradient (the tiny models' conditional and unconditional predictions nearly agree, so the other methods'
    changes are below 1e-4 here)."""
    bench, results, root = quick
    cfg_ = study.quick_config()
    _, models, _ = load_testbed(bench.TINY_TRAINING, cache_dir=root / "cache", progress=False)
    ours, nfe = bench.ddim("cfg", 3.0, models, cfg_)
    theirs, nfe_s = study.ddim_reference(study.Run("ddim", scale=3.0), models, cfg_, torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs) and nfe == nfe_s
    assert (bench.ddim("cfg_zero_star", 3.0, models, cfg_)[0] - theirs).abs().max() > 1e-3
    labels = study.labels_for(cfg_)
    r = study.Run("sds", "pixels", 3.0, "none")
    x = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(3))
    g1 = bench.distiller(r, "cfg", 3.0, models, cfg_).grad(x, torch.Generator().manual_seed(4))
    g2 = study.study_distiller(r, models, labels, cfg_).grad(x, torch.Generator().manual_seed(4))
    assert torch.equal(g1, g2)
    g3 = bench.distiller(r, "cfg", 3.0, models, cfg_).grad(x, torch.Generator().manual_seed(5))
    assert (g3 - g2).abs().max() > 1e-2


def test_cfg_pp_does_not_apply_to_sds():
    bench = load_benchmark("digits_guidance")
    with pytest.raises(ValueError, match="SDS does not renoise"):
        bench.transform("cfg_pp", 0.4, {"main": torch.nn.Identity()}, sampler="sds")
    with pytest.raises(ValueError, match="method must be one of"):
        bench.transform("pag", 3.0, {"main": torch.nn.Identity()}, sampler="ddim")


def _section_tables(text, section="## Guidance methods"):
    """Every markdown table of `section` (up to the next '## ' heading), as markdown_table reads one."""
    body = text[text.index(section):]
    end = body.find("\n## ", 1)
    body = body if end < 0 else body[:end]
    tables, pos = [], 0
    while True:
        start = body.find("\n|", pos)
        if start < 0:
            return tables
        tables.append(markdown_table(body[start:], "|"))
        stop = body.find("\n\n", start + 1)
        pos = len(body) if stop < 0 else stop


def test_docs_tables_are_the_committed_json():
    results = json.loads(COMMITTED.read_text())
    bench = load_benchmark("digits_guidance")
    got = _section_tables((ROOT / "docs" / "digits.md").read_text())
    want = [bench.ddim_rows(results)] + [rows for rows in (bench.distill_rows(results, p) for p in ("pixels", "mlp"))
                                         if rows]
    assert len(got) == len(want), f"docs have {len(got)} tables in the section, the JSON gives {len(want)}"
    for t, (rows, expect) in enumerate(zip(got, want)):
        assert rows[1:] == expect, f"table {t}: {rows[1:]} != {expect} (from the JSON)"
