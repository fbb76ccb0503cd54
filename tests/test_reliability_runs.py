"""Issue 15, items 1-3: run folders that cannot mix, caches with integrity, nothing executes on load. Each test
is a row of the issue's table, done as the user did it (the command line in a subprocess where it was one)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsolve_studies.digits import run as digits_run, train as digits_train
from diffsolve_studies.digits.data import load_digits_split
from diffsolve_studies.toy import fractal_tree, train_toy_model

QUICK = ["toy", "--quick", "--datasets", "fractal", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def diffsolve(args, cwd, cache, threads=1, wait=True):
    """`diffsolve ARGS` as a user runs it, from `cwd`, with the model cache `cache`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DIFFSOLVE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "diffsolve_studies.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def flip_tensor_bytes(path, n=64):
    """Invert n bytes in the middle of the largest tensor stored in a torch.save zip file (so the file still
    loads: only weights change)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(Path(path).read_bytes())
    o = info.header_offset
    start = o + 30 + int.from_bytes(raw[o + 26:o + 28], "little") + int.from_bytes(raw[o + 28:o + 30], "little")
    mid = start + info.file_size // 2 - n // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    Path(path).write_bytes(bytes(raw))


class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


@pytest.fixture(scope="module")
def toy_quick(tmp_path_factory):
    """A finished `diffsolve toy --quick --datasets fractal` folder: (base, output folder, its files)."""
    base = tmp_path_factory.mktemp("toy_quick")
    out = base / "out"
    proc = diffsolve([*QUICK, "--out", str(out), "--figures", str(out / "figures")], base, base / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, out, snapshot(out)


def test_default_output_folder_is_outputs_under_the_current_folder(toy_quick, tmp_path):
    """Row 9: `diffsolve toy --quick` without --out wrote into ./benchmarks/results and ./docs/figures."""
    proc = diffsolve([*QUICK, "--grid", "2"], tmp_path, toy_quick[0] / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "toy" / "quick"
    assert (out / "toy2d.json").is_file() and (out / "figures" / "toy2d_fractal_points.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # no benchmarks/results, no docs/figures


def test_concurrent_and_killed_runs_cannot_mix_options(toy_quick, tmp_path):
    """Row 1: `--grid 8` and `--grid 6` into one --out at once. The second is refused while the first holds the
    folder; the first, SIGKILLed, resumes at once; afterwards --grid 6 is refused naming the option."""
    base = toy_quick[0]
    out = tmp_path / "out"
    first = diffsolve([*QUICK, "--grid", "8", "--out", str(out)], tmp_path, base / "cache", wait=False)
    deadline = time.time() + 120
    while not (out / "toy2d.run.json").exists() and not (out / "toy2d.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = diffsolve([*QUICK, "--grid", "6", "--out", str(out)], tmp_path, base / "cache")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "in use by another run" in second.stderr and len(second.stderr.splitlines()) == 1
    again = diffsolve([*QUICK, "--grid", "8", "--out", str(out)], tmp_path, base / "cache")  # no wait, no cleanup
    assert again.returncode == 0, again.stderr[-2000:]
    other = diffsolve([*QUICK, "--grid", "6", "--out", str(out)], tmp_path, base / "cache")
    assert other.returncode == 2 and "grid: 8 there, 6 here" in other.stderr, other.stderr[-2000:]
    results = json.loads((out / "toy2d.json").read_text())
    assert results["config"]["grid"] == 8 and len(results["runs"]) == 20
    for npy in (out / "toy2d_points").glob("*.npy"):
        assert np.load(npy).shape == (64, 2), npy


@pytest.mark.parametrize("option, env_threads, message", [(["--n-mc", "2"], 1, "n_mc: 1 there, 2 here"),
                                                          ([], 2, "torch_threads: 1 there, 2 here")])
def test_rerun_with_other_options_is_refused_and_changes_nothing(toy_quick, tmp_path, option, env_threads, message):
    """Row 2 (`--n-mc 2` into a finished folder) and row 11 (the same run at another thread count)."""
    base, out, files = toy_quick
    shutil.copytree(out, tmp_path / "out")
    proc = diffsolve([*QUICK, *option, "--out", str(tmp_path / "out")], tmp_path, base / "cache", threads=env_threads)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert snapshot(tmp_path / "out") == files


def test_damaged_results_are_rebuilt_from_the_parts_that_verify(toy_quick, tmp_path):
    """Rows 1 and 5: a truncated results JSON, a truncated .npy and a .npy holding 36 points instead of 64. The
    re-run keeps every intact run, warns naming each damaged file, recomputes only those, and rebuilds the JSON."""
    base, out, files = toy_quick
    work = tmp_path / "out"
    shutil.copytree(out, work)
    points = work / "toy2d_points"
    (work / "toy2d.json").write_text(files["toy2d.json"].decode()[:500])
    (points / "fractal_cfg_msd.npy").write_bytes(files["toy2d_points/fractal_cfg_msd.npy"][:100])
    np.save(points / "fractal_learned_sds.npy", np.zeros((36, 2), np.float32))
    stamps = {p.name: p.stat().st_mtime_ns for p in points.glob("*.npy")}
    proc = diffsolve([*QUICK, "--out", str(work)], tmp_path, base / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("fractal_cfg_msd.npy", "fractal_learned_sds.npy", "toy2d.json"):
        assert name in proc.stderr, name
    after = snapshot(work)
    for rel, data in files.items():
        if rel.endswith(".npy"):
            assert after[rel] == data, rel  # recomputed from the same seeds: the same bytes
    changed = {p.name for p in points.glob("*.npy") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"fractal_cfg_msd.npy", "fractal_learned_sds.npy"}
    old, new = json.loads(files["toy2d.json"]), json.loads(after["toy2d.json"])
    assert {k: r["metrics"] for k, r in new["runs"].items()} == {k: r["metrics"] for k, r in old["runs"].items()}


def test_flipped_bytes_in_a_cached_toy_model_are_retrained_not_used(toy_quick, tmp_path):
    """Row 3 (toy): 64 bytes flipped inside a cached model. The study warns naming the file, retrains it and
    writes the same results as with the intact cache."""
    base, _, files = toy_quick
    shutil.copytree(base / "cache", tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "toy_models").glob("fractal-A-main-*.pt")
    flip_tensor_bytes(path)
    proc = diffsolve([*QUICK, "--out", str(tmp_path / "out")], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(path) in proc.stderr and "checksum" in proc.stderr
    after = snapshot(tmp_path / "out")
    for rel, data in files.items():
        if rel.endswith(".npy"):
            assert after[rel] == data, rel


def _classifier(tmp_path, **kw):
    cfg = dict(digits_train.CLASSIFIER, width=16, iterations=20)
    return digits_train.train_classifier(load_digits_split(), cfg, tmp_path, progress=False, **kw)


def _toy(tmp_path):
    return train_toy_model(fractal_tree("A"), hidden_dim=16, num_layers=2, iterations=4, batch=64,
                           cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("train", [_toy, _classifier])
def test_flipped_bytes_in_any_cached_model_are_detected(tmp_path, train):
    """Row 3 (the digits classifier's FD 3.7e44): a model file that still loads, with damaged weights."""
    fresh = train(tmp_path)
    flip_tensor_bytes(fresh.cache_path)
    with pytest.warns(UserWarning, match=fresh.cache_path.name):
        again = train(tmp_path)
    for (k, a), b in zip(fresh.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("train", [_toy, _classifier])
def test_cache_file_with_wrong_keys_is_retrained(tmp_path, train):
    """Row 4: a readable cache file with other keys: a warning naming it and a retrain, no KeyError."""
    fresh = train(tmp_path)
    torch.save({"ema": {"weight": torch.zeros(3)}}, fresh.cache_path)
    with pytest.warns(UserWarning, match=fresh.cache_path.name):
        again = train(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("train", [_toy, _classifier])
def test_cache_file_with_wrong_shapes_and_a_valid_checksum_is_retrained(tmp_path, train):
    """Row 4, shapes: the file passes its checksum (written by the same code) but its weights do not fit."""
    from diffsolve.runs import save_checked
    fresh = train(tmp_path)
    data = torch.load(fresh.cache_path, weights_only=True)
    data.pop("sha256", None)
    weights = "ema" if "ema" in data else "state"
    data[weights] = {k: torch.zeros(2, 2) for k in data[weights]}
    save_checked(data, fresh.cache_path)
    with pytest.warns(UserWarning, match="do not fit"):
        again = train(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))


def test_thread_count_is_part_of_the_cache_key(tmp_path):
    """Row 11: a model trained at 2 threads is another cache entry than at 1 (their bits differ)."""
    one = _classifier(tmp_path)
    torch.set_num_threads(2)
    two = _classifier(tmp_path)
    toy_two = _toy(tmp_path)
    torch.set_num_threads(1)
    assert one.cache_path != two.cache_path and toy_two.cache_path != _toy(tmp_path).cache_path


def test_digits_run_folder_rebuilds_damaged_results_and_refuses_other_options(tmp_path, capsys):
    """Rows 2 and 5 for the digits runner: a truncated JSON and .npy are rebuilt / recomputed (warning naming
    the .npy); other options, or a second writer, are refused before any work."""
    from diffsolve.runs import RunFolder
    from diffsolve_studies.digits import study
    cfg, out, cache = study.quick_config(), tmp_path / "out", tmp_path / "cache"
    first = digits_run.run_study(cfg, digits_run.QUICK_TRAINING, out, cache, progress=False,
                                 json_name="digits-quick.json", only="ddim/cfg")
    npy = out / "digits-quick_images" / "ddim_cfg_w3.npy"
    intact = npy.read_bytes()
    npy.write_bytes(intact[:60])
    json_path = out / "digits-quick.json"
    json_path.write_text(json_path.read_text()[:200])
    with pytest.warns(UserWarning) as record:
        again = digits_run.run_study(cfg, digits_run.QUICK_TRAINING, out, cache, progress=False,
                                     json_name="digits-quick.json", only="ddim/cfg")
    messages = " ".join(str(w.message) for w in record)
    assert "ddim_cfg_w3.npy is damaged" in messages and "digits-quick.json is damaged" in messages
    assert npy.read_bytes() == intact and json.loads(json_path.read_text())["runs"].keys() == first["runs"].keys()
    assert again["runs"]["ddim/cfg/w3"]["final"] == first["runs"]["ddim/cfg/w3"]["final"]
    args = ["--quick", "--only", "ddim/cfg", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        digits_run.main([*args, "--budget", "50"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "budget: 96 there, 50 here" in err and len(err.splitlines()) == 1, err
    with RunFolder(out, "digits-quick", None):  # another process holding the folder
        with pytest.raises(SystemExit) as exit_:
            digits_run.main(args)
    assert exit_.value.code == 2 and "in use by another run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ text-to-2D
SMALL = dict(steps=2, resolution=32, fourier_features=16, mlp_width=16, mlp_depth=2, strip_every=1,
             checkpoint_every=1, method="sds")


@pytest.fixture(scope="module")
def t2i():
    return pytest.importorskip("diffsolve.integrations.text2image")


@pytest.fixture(scope="module")
def components(t2i):
    return t2i.tiny_components()


def _weights(model):
    return [v.clone() for v in model.state_dict().values()]


@pytest.mark.parametrize("forged_checksum", [False, True])
def test_pickle_payload_in_a_t2i_checkpoint_never_runs(t2i, components, tmp_path, forged_checksum):
    """Row 6: checkpoint.pt replaced by a pickle payload. Its checksum does not match (or, forged to match, it
    does not load as weights): the run warns naming it and starts over; the payload never runs."""
    from diffsolve.runs import RunFolder
    cfg, embeds, marker = t2i.T2IConfig(**SMALL), t2i.tiny_prompt_embeds(components, 0), tmp_path / "marker"
    full = _weights(t2i.run_text2image(components, embeds, cfg, tmp_path / "full", progress=False))
    t2i.run_text2image(components, embeds, cfg, tmp_path / "run", progress=False, stop_after=1)
    torch.save({"model": Payload(marker)}, tmp_path / "run" / "checkpoint.pt")
    if forged_checksum:
        with RunFolder(tmp_path / "run", "t2i", None, config_file="config.json") as folder:
            folder.write_bytes("checkpoint.pt", (tmp_path / "run" / "checkpoint.pt").read_bytes())
    with pytest.warns(UserWarning, match="checkpoint.pt"):
        resumed = _weights(t2i.run_text2image(components, embeds, cfg, tmp_path / "run", progress=False))
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_t2i_job_folder_is_locked_and_its_checkpoint_checked(t2i, components, tmp_path):
    """Item 1 for text-to-2D: a second writer is refused; a truncated checkpoint is not trusted."""
    from diffsolve.runs import FolderBusy, RunFolder
    cfg, embeds = t2i.T2IConfig(**SMALL), t2i.tiny_prompt_embeds(components, 0)
    t2i.run_text2image(components, embeds, cfg, tmp_path, progress=False, stop_after=1)
    with RunFolder(tmp_path, "t2i", None, config_file="config.json"):
        with pytest.raises(FolderBusy):
            t2i.run_text2image(components, embeds, cfg, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(UserWarning, match="checkpoint.pt is damaged"):
        t2i.run_text2image(components, embeds, cfg, tmp_path, progress=False)
    assert [r["step"] for r in json.loads((tmp_path / "log.json").read_text())] == [1, 2]


def test_t2i_rerun_with_other_options_is_a_usage_error(t2i, tmp_path, capsys):
    from diffsolve.integrations.t2i_cli import main
    common = ["--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "1", "--quiet", "--out", str(tmp_path)]
    main(common)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--guidance-interval", "0.1", "5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "guidance_interval" in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_pickled_fid_feature_network_is_refused_unexecuted(t2i, tmp_path, capsys):
    """Row 6, the FID network path: a torch.save'd pickle is refused, by the loader and on the command line."""
    evaluate = pytest.importorskip("diffsolve.integrations.evaluate")
    from diffsolve.integrations.t2i_cli import main
    marker, path = tmp_path / "marker", tmp_path / "features.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(ValueError, match="TorchScript"):
        evaluate.load_feature_network(path)
    with pytest.raises(SystemExit) as exit_:
        main(["--tiny", "--prompts", "a cat", "a dog", "--methods", "sds", "--steps", "1", "--quiet",
              "--ddim-steps", "1", "--out", str(tmp_path / "out"), "--inception", str(path)])
    assert exit_.value.code == 2 and "features.pt" in capsys.readouterr().err
    assert not marker.exists()
