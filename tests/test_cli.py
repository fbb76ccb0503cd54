"""Issue 15, item 5: the command lines as users expect them. Unwritable outputs and bad values are usage errors
(exit status 2, one line on stderr) found before any work; nothing is abbreviated; outputs default to
./outputs/<command>/; every flag's help shows its default; --device is checked."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsolve_studies import cli
from diffsolve_studies.digits import run as digits_run
from diffsolve_studies.toy import run as toy_run


def diffsolve(args, cwd, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFSOLVE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffsolve_studies.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def usage_error(main, args, capsys):
    """(exit status, stderr) of `main(args)`, which must exit."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, capsys.readouterr().err


def t2i_main():
    pytest.importorskip("diffusers")
    from diffsolve.integrations.t2i_cli import main
    return main


@pytest.mark.parametrize("command", [["toy", "--quick", "--datasets", "fractal"], ["digits", "--quick"],
                                     ["t2i", "--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "1"],
                                     ["demo"]])
def test_unwritable_out_is_refused_before_any_work(tmp_path, command):
    """Row 7: `--out /proc/x` trained three models and ran a study before a misleading FileNotFoundError."""
    if command[0] == "t2i":
        t2i_main()
    proc = diffsolve([*command, "--out", "/proc/x"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'/proc/x' is not writable" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no model trained, nothing written


TOY_BAD = [(["--grid", "0"], "--grid"), (["--grid", "-3"], "--grid"), (["--n-mc", "0"], "--n-mc"),
           (["--datasets", "moons"], "moons"), (["--figures", "/proc/y"], "/proc/y")]


@pytest.mark.parametrize("args, message", TOY_BAD)
def test_toy_bad_values_are_usage_errors(tmp_path, capsys, args, message):
    """Row 8: `--grid 0`, `--n-mc 0` ended in a bare ZeroDivisionError (after training)."""
    code, err = usage_error(toy_run.main, ["--quick", "--datasets", "fractal", "--no-progress", "--cache",
                                           str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [(["--budget", "0"], "--budget"), (["--seed", "-1"], "--seed"),
                                           (["--only", "no/such/run"], "no/such/run")])
def test_digits_bad_values_are_usage_errors(tmp_path, capsys, args, message):
    code, err = usage_error(digits_run.main, ["--quick", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                                              "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


T2I_BAD = [(["--steps", "0"], "--steps"), (["--resolution", "31"], "downsampling factor"),
           (["--seeds", "-1"], "--seeds"), (["--msd-steps", "0"], "--msd-steps"),
           (["--guidance-interval", "2", "1"], "guidance_interval"), (["--device", "nonsense"], "nonsense"),
           (["--device", "cuda:99"], "cuda:99"), (["--methods", "sgd"], "sgd"), (["--prompts"], "non-empty")]


@pytest.mark.parametrize("args, message", T2I_BAD)
def test_t2i_bad_values_are_usage_errors(tmp_path, capsys, args, message):
    """Row 10: bad text-to-2D values ended in tracebacks; `--device cuda` without CUDA in an AssertionError."""
    code, err = usage_error(t2i_main(), ["--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "1",
                                         "--quiet", "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_t2i_cuda_without_cuda_is_a_usage_error_naming_it(tmp_path, capsys):
    code, err = usage_error(t2i_main(), ["--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "1",
                                         "--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "device cuda" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [(["demo", "--step", "3"], "unrecognized arguments: --step 3"),
                                           (["demo", "--steps", "0"], "--steps"), (["demo", "--n", "0"], "--n"),
                                           (["toy", "--quick", "--datasets", "fractal", "--gri", "4"],
                                            "unrecognized arguments: --gri 4"),
                                           (["digits", "--quick", "--budg", "5"], "unrecognized arguments: --budg"),
                                           (["frobnicate"], "frobnicate")])
def test_no_abbreviations_and_bad_demo_values(tmp_path, capsys, monkeypatch, args, message):
    """Row 10: `demo --step 3` was taken as `--steps 3`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSOLVE_CACHE", str(tmp_path / "cache"))
    code, err = usage_error(cli.main, args, capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_t2i_no_abbreviations(tmp_path, capsys):
    code, err = usage_error(t2i_main(), ["--tiny", "--step", "1", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "unrecognized arguments: --step" in err


def test_demo_writes_under_outputs_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--n", "200", "--steps", "4"]) == 0
    assert (tmp_path / "outputs" / "demo" / "fractal_ideal.png").is_file()


def test_full_digits_run_defaults_to_outputs_digits(tmp_path, monkeypatch):
    """Row 9: a full `diffsolve digits` wrote into the package tree (results and figures)."""
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSOLVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digits_run, "run_study", lambda cfg, training, out, *a, **k: seen.update(out=Path(out)) or
                        {"name": "digits"})
    monkeypatch.setattr("diffsolve_studies.digits.report.write_report",
                        lambda results, out, figures=True, fig_dir=None: seen.update(fig_dir=Path(fig_dir)))
    digits_run.main([])
    assert seen["out"].resolve() == tmp_path / "outputs" / "digits"
    assert seen["fig_dir"].resolve() == tmp_path / "outputs" / "digits" / "figures"


def test_t2i_dry_run_defaults_to_outputs_t2i(tmp_path, monkeypatch):
    """Row 9: `t2i --dry-run` wrote into the package tree (benchmarks/results/text2image_nfe.json)."""
    main = t2i_main()
    import diffsolve.integrations.t2i_cli as t2i_cli
    committed = Path(t2i_cli.__file__).resolve().parents[1] / "benchmarks" / "results" / "text2image_nfe.json"
    before = committed.read_bytes() if committed.exists() else None
    monkeypatch.chdir(tmp_path)
    try:
        main(["--dry-run", "--tiny", "--msd-steps", "2"])
    finally:
        changed = committed.exists() and committed.read_bytes() != before
        if changed and before is not None:
            committed.write_bytes(before)  # undo, should the check below ever fail
    assert (tmp_path / "outputs" / "t2i" / "text2image_nfe.json").is_file()
    assert not changed


def test_benchmark_scripts_pass_the_committed_paths_explicitly():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import digits as bench_digits
        import toy2d as bench_toy
        for bench in (bench_toy, bench_digits):
            argv = bench.committed_paths([])
            assert argv == ["--out", str(root / "benchmarks" / "results"), "--figures", str(root / "docs" / "figures")]
            assert bench.committed_paths(["--quick"]) == ["--quick"]  # quick runs go to ./outputs
            assert bench.committed_paths(["--out=x"])[:1] == ["--out=x"]
    finally:
        sys.path.remove(str(root / "benchmarks"))


def _parsers():
    parsers = [cli._parser()[1], toy_run._parser(), digits_run._parser()]
    try:
        from diffsolve.integrations.t2i_cli import _parser
        parsers.append(_parser())
    except ImportError:
        pass
    return parsers


def test_every_flag_has_help_that_shows_its_default():
    for parser in _parsers():
        assert parser.allow_abbrev is False, parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert text and len(text) > 8, (parser.prog, action.dest)
            if action.default is not None and action.default is not False:
                assert "default" in text, (parser.prog, action.dest, text)


def test_quick_modes_state_their_measured_time():
    modules = [toy_run, digits_run]
    try:
        import diffsolve.integrations.t2i_cli as t2i_cli
        modules.append(t2i_cli)
    except ImportError:
        pass
    for module in modules:
        stated = getattr(module, "QUICK_TIME", None) or module.TINY_TIME
        assert any(unit in stated for unit in (" s", "minute", "seconds")), stated
        assert " ".join(stated.split()) in " ".join(module._parser().format_help().split()), module.__name__
