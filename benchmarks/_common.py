"""Small helpers shared by the benchmark scripts: atomic JSON output and a description of the machine."""
import datetime
import os
import platform
import sys
from pathlib import Path

from diffsolve._io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def committed_paths(argv):
    """A study's arguments with the committed output folders (benchmarks/results, docs/figures) added unless
    given, or the quick mode's own defaults: only a full study regenerates the committed results."""
    argv = list(argv)
    if "--quick" in argv:
        return argv
    for flag, path in (("--out", RESULTS), ("--figures", ROOT / "docs" / "figures")):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, str(path)]
    return argv


def write_json_atomic(path, data):
    """Write `data` as JSON atomically (diffsolve._io), so that a reader never sees a half-written file
    and an interrupted run leaves the previous file intact."""
    return write_json(path, data)


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """Versions and threading of the process that ran a benchmark."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    for name in ("k_diffusion", "diffusers", "diffsolve"):
        try:
            from importlib.metadata import version
            info[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed, or installed without metadata
            info[name] = None
    return info
