"""Wall time of `make demo`'s two commands on a cold cache (model training included), after set-up:
`diffsolve demo` and the quick fractal study with its own fresh model cache. Writes
benchmarks/results/demo_time.json with the machine's load, so the time can be read against it.

    python benchmarks/demo_time.py            # runs them in a temporary folder (about 1.5 minutes)
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402


def _timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS / "demo_time.json"))
    args = p.parse_args(argv)
    py = [sys.executable, "-m", "diffsolve_studies.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        demo = _timed(py + ["demo", "--out", str(out / "demo")])
        quick = _timed(py + ["toy", "--quick", "--datasets", "fractal", "--out", str(out / "toy2d"),
                             "--figures", str(out / "figures"), "--cache", str(out / "cache")])
    res = {"diffsolve_demo_seconds": demo, "quick_fractal_seconds_with_training": quick,
           "total_seconds": demo + quick, "machine": machine_info()}
    write_json_atomic(args.out, res)
    print(f"diffsolve demo {demo:.0f} s, quick fractal study (training included) {quick:.0f} s, "
          f"total {demo + quick:.0f} s")
    return res


if __name__ == "__main__":
    main()
