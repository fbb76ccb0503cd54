"""Scale-out of text-to-2D (integrations/scaleout.py): the job list, the shard-list checks, and a real
`torchrun --nproc_per_node 2` run on the CPU (gloo) with the tiny random components, whose merged results
(records, images, logs, FID and CLIP similarity) equal a single-process run of the same jobs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from conftest import tiny_clip, tiny_feature_network  # noqa: E402

from diffsolve._io import write_json  # noqa: E402
from diffsolve.integrations import scaleout  # noqa: E402
from diffsolve.integrations.scaleout import Job, build_jobs, read_assignment  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a red dog"]
METHODS = ["sds", "msd"]
SEEDS = ["0", "1"]


def test_build_jobs_order_and_errors():
    jobs = build_jobs(2, ["sds", "msd"], [0, 1], reference=True)
    assert [j.id for j in jobs] == [
        "sds/00/seed0", "sds/00/seed1", "msd/00/seed0", "msd/00/seed1",
        "sds/01/seed0", "sds/01/seed1", "msd/01/seed0", "msd/01/seed1",
        "ddim/00/seed0", "ddim/00/seed1", "ddim/01/seed0", "ddim/01/seed1"]
    assert [j.kind for j in jobs].count("reference") == 4
    assert len(build_jobs(3, ["msd"], [5])) == 3
    with pytest.raises(ValueError, match="duplicates"):
        build_jobs(1, ["sds", "sds"], [0])
    with pytest.raises(ValueError, match="seeds is empty"):
        build_jobs(1, ["sds"], [])
    with pytest.raises(ValueError, match="n_prompts"):
        build_jobs(0, ["sds"], [0])
    with pytest.raises(ValueError, match="reference"):
        build_jobs(1, ["ddim"], [0])


def test_read_assignment_catches_duplicate_and_missing_jobs(tmp_path):
    ids = [Job(0, "sds", s).id for s in range(3)]
    write_json(scaleout.shard_path(tmp_path, 0, 2), {"jobs": ids[:2]})
    write_json(scaleout.shard_path(tmp_path, 1, 2), {"jobs": ids[2:]})
    assert read_assignment(ids, tmp_path, 2) == {ids[0]: 0, ids[1]: 0, ids[2]: 1}
    write_json(scaleout.shard_path(tmp_path, 1, 2), {"jobs": ids[1:]})
    with pytest.raises(RuntimeError, match="ran twice"):
        read_assignment(ids, tmp_path, 2)
    write_json(scaleout.shard_path(tmp_path, 1, 2), {"jobs": []})
    with pytest.raises(RuntimeError, match="missing"):
        read_assignment(ids, tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="process 0 of 3"):
        read_assignment(ids, tmp_path, 3)


def test_run_sharded_single_process_records_each_job_once(tmp_path):
    state, _ = scaleout.process_state("cpu")
    jobs = build_jobs(2, ["sds"], [0, 1], reference=True)
    folders = scaleout.job_folders(["a cat", "A Dog!"])
    calls = []

    def run(job, run_dir):
        calls.append((job.id, run_dir))
        return {"method": job.method, "value": 10 * job.prompt_index + job.seed}

    records = scaleout.run_sharded(jobs, folders, run, tmp_path, state)
    assert [c[0] for c in calls] == [j.id for j in jobs]
    assert calls[2][1] == tmp_path / "sds" / "01_a_dog" / "seed0" and calls[-1][1].parent.parent.name == "ddim"
    assert [r["job"] for r in records] == [j.id for j in jobs]
    assert [r["value"] for r in records] == [0, 1, 10, 11, 0, 1, 10, 11]
    assert all(r["process_index"] == 0 for r in records) and records[-1]["kind"] == "reference"
    # a record left by another run (another process) is caught, not merged
    write_json(tmp_path / records[0]["dir"] / "record.json", {**records[0], "process_index": 1})
    with pytest.raises(RuntimeError, match="not this run's record"):
        scaleout.collect_records(jobs, folders, tmp_path, 1)


def test_single_process_state_and_device_checks():
    state, device = scaleout.process_state("cpu")
    assert state.num_processes == 1 and state.is_main_process and device == torch.device("cpu")

    class Two:  # a stand-in for a 2-process PartialState
        num_processes, device = 2, torch.device("cpu")

    # the device rule, through the same code path: several processes and one explicit GPU is refused
    from unittest import mock
    seen = []
    with mock.patch("accelerate.PartialState", lambda cpu, **kw: seen.append(kw) or Two()):
        with pytest.raises(ValueError, match="cuda:0 with 2 processes"):
            scaleout.process_state("cuda:0")
        assert scaleout.process_state(None)[1] == torch.device("cpu")
    # a process done early waits hours at the barrier: the group timeout is far above torch's default
    assert all(kw["timeout"].total_seconds() >= 24 * 3600 for kw in seen) and len(seen) == 2


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun():
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run(launcher, out, weights):
    args = ["--tiny", "--prompts", *PROMPTS, "--methods", *METHODS, "--seeds", *SEEDS, "--steps", "2",
            "--msd-steps", "2", "--ddim-steps", "2", "--device", "cpu", "--quiet", "--out", str(out),
            "--inception", str(weights / "features.pt"), "--clip", str(weights / "clip")]
    proc = subprocess.run([*launcher, str(ROOT / "benchmarks" / "text2image.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("scaleout")
    weights = base / "weights"
    weights.mkdir()
    tiny_feature_network(weights / "features.pt")
    tiny_clip(weights / "clip")
    two, _ = _run([*_torchrun(), "--standalone", "--nproc_per_node", "2"], base / "two", weights)
    one, _ = _run([sys.executable], base / "one", weights)
    return base, one, two


def test_torchrun_two_processes_each_job_once(runs):
    base, _, two = runs
    out = base / "two"
    ids = [j.id for j in build_jobs(len(PROMPTS), METHODS, [int(s) for s in SEEDS], reference=True)]
    assert two["num_processes"] == 2
    assert [r["job"] for r in two["jobs"]] == ids  # every job once, in job order
    # split_between_processes hands out contiguous halves; each process recorded exactly its share
    assert two["assignment"] == {"0": ids[:6], "1": ids[6:]}
    for i in range(2):
        shard = json.loads(scaleout.shard_path(out, i, 2).read_text())
        assert shard["jobs"] == two["assignment"][str(i)]
    assert {r["process_index"] for r in two["jobs"]} == {0, 1}
    for r in two["jobs"]:
        run_dir = out / r["dir"]
        assert json.loads((run_dir / "record.json").read_text())["process_index"] == r["process_index"]
        assert (run_dir / "image.png").is_file()
        if r["kind"] == "distill":  # each run did its 2 steps once: no repeated or missing log rows
            assert [row["step"] for row in json.loads((run_dir / "log.json").read_text())] == [1, 2]
            assert [p.name for p in (run_dir / "strip").glob("*.png")] == ["step_000002.png"]
    assert sorted(p.name for p in out.iterdir()) == ["ddim", "msd", "results.json", "sds", "shards", "t2i.run.json"]


def test_merged_results_equal_single_process_run(runs):
    base, one, two = runs
    assert one["num_processes"] == 1 and one["assignment"] == {"0": [r["job"] for r in one["jobs"]]}
    strip = ("process_index",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in one["jobs"]] == \
           [{k: v for k, v in r.items() if k not in strip} for r in two["jobs"]]
    assert one["metrics"] == two["metrics"]
    for key in ("config", "prompts", "methods", "seeds", "reference"):
        assert one[key] == two[key], key
    # not vacuous: real numbers that differ between methods and images that differ between jobs
    fid = two["metrics"]["fid"]
    assert set(fid) == set(METHODS) and all(isinstance(v, float) and v >= 0 for v in fid.values())
    assert set(two["metrics"]["clip_similarity"]) == {*METHODS, "ddim"}
    assert len({r["final_loss"] for r in two["jobs"] if r["kind"] == "distill"}) == 8
    images = {}
    for r in one["jobs"]:
        a, b = (base / run / r["dir"] / "image.png" for run in ("one", "two"))
        assert a.read_bytes() == b.read_bytes(), r["job"]
        images[r["job"]] = a.read_bytes()
        if r["kind"] == "distill":
            assert (a.parent / "log.json").read_text() == (b.parent / "log.json").read_text()
    assert len(set(images.values())) == len(images)


def test_rerun_resumes_and_keeps_results(runs, tmp_path):
    """A finished output folder run again (single process) does no steps and merges the same results."""
    base, one, _ = runs
    copy = tmp_path / "again"
    shutil.copytree(base / "one", copy)
    again, stdout = _run([sys.executable], copy, base / "weights")
    assert "resuming" not in stdout  # --quiet
    assert [r["final_loss"] for r in again["jobs"] if "final_loss" in r] == \
           [r["final_loss"] for r in one["jobs"] if "final_loss" in r]
    assert again["metrics"] == one["metrics"]
