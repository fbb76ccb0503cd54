"""The 2D study end to end in --quick mode: every method runs, metrics are finite, SDS and MSD at least halve the
mean distance to the nearest mode in the ideal column, results resume."""
import json
import math

import torch

from diffsolve_studies.toy import run, study

torch.set_num_threads(1)


def test_quick_study_runs_every_method_and_resumes(tmp_path):
    args = ["--quick", "--datasets", "fractal", "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig"),
            "--cache", str(tmp_path / "cache"), "--no-progress"]
    results = run.main(args)
    for column in study.COLUMNS["fractal"]:
        for method in study.METHODS:
            metrics = results["runs"][f"fractal/{column}/{method}"]["metrics"]
            assert all(math.isfinite(metrics[k]) for k in ("nll", "precision", "recall", "mmd_biased_e4"))
            assert (tmp_path / "out" / "toy2d_points" / f"fractal_{column}_{method}.npy").exists()
    assert set(results["efficiency"]) == {"fractal/ideal", "fractal/learned"}
    for method in ("sds", "msd"):  # the quick run shows the study's behaviour: the points reach the modes
        d = results["runs"][f"fractal/ideal/{method}"]["mode_distance"]
        assert d["end"] <= 0.5 * d["start"], (method, d)
    assert (tmp_path / "fig" / "toy2d_fractal_points.png").exists()
    saved = json.loads((tmp_path / "out" / "toy2d.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys()
    npy = tmp_path / "out" / "toy2d_points" / "fractal_learned_msd.npy"
    stamp = npy.stat().st_mtime_ns
    run.main(args)  # resumes: nothing is recomputed
    assert npy.stat().st_mtime_ns == stamp
