"""The package's shape: the core's import graph stays off the heavy stacks; a fresh `pip install .` without
extras imports the core; `pip install .[studies]` runs `diffsolve toy --quick` (slow: builds two venvs)."""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("diffusers", "k_diffusion", "matplotlib", "sklearn", "transformers", "diffsolve_studies",
             "diffsolve.integrations", "hypothesis")
STATIC_ONLY = ("scipy",)  # torchdiffeq (a core dependency) imports scipy itself; the core's own code does not
# the testing kit's hypothesis strategies and pytest plugin need the `testing` extra; nothing else imports them
TESTING_EXTRA = {"diffsolve/testing/strategies.py": ("hypothesis",),
                 "diffsolve/testing/pytest_plugin.py": ("hypothesis", "pytest")}
CORE_MODULES = sorted("diffsolve." + ".".join(p.relative_to(ROOT / "diffsolve").with_suffix("").parts)
                      for p in (ROOT / "diffsolve").rglob("*.py") if p.name != "__init__.py"
                      and str(p.relative_to(ROOT)) not in TESTING_EXTRA)


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_core_sources_import_no_heavy_stack():
    banned = FORBIDDEN + STATIC_ONLY
    bad = [(rel, m) for p in (ROOT / "diffsolve").rglob("*.py") for m in _imports(p)
           if (rel := str(p.relative_to(ROOT))) and (m.split(".")[0] in banned or m.startswith(banned))
           and m.split(".")[0] not in TESTING_EXTRA.get(rel, ())]
    assert not bad, bad


def test_core_import_graph_at_run_time_does_not_reach_the_heavy_stacks():
    """Import every core module in a fresh interpreter that refuses the forbidden packages."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        FORBIDDEN = {FORBIDDEN!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(FORBIDDEN):
                    raise ImportError("core imported " + name)
        sys.meta_path.insert(0, Block())
        for m in ["diffsolve"] + {CORE_MODULES!r}:
            importlib.import_module(m)
        print("ok", len(sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


@pytest.mark.slow
def test_fresh_install_without_extras_and_with_studies(tmp_path):
    """pip install . (the core's own dependencies, pinned like CI) imports the solvers, transforms and distillers
    without diffusers or matplotlib; pip install .[studies] runs `diffsolve toy --quick` end to end."""
    pins = ["-c", str(ROOT / "requirements" / "ci.txt")]
    py = _venv(tmp_path / "core")
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins, str(ROOT)], check=True)
    probe = ("import diffsolve as ds, diffsolve.distill as dd, importlib.util as u; "
             "print(len(ds.SOLVERS), dd.MSD.__name__, [m for m in ('diffusers', 'matplotlib', 'sklearn') "
             "if u.find_spec(m)])")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip().endswith("MSD []"), out.stdout
    studies = _venv(tmp_path / "studies")
    subprocess.run([str(studies), "-m", "pip", "install", "-q", *pins, f"{ROOT}[studies]"], check=True)
    env = {**os.environ, "DIFFSOLVE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(studies.parent / "diffsolve"), "toy", "--quick", "--datasets", "fractal",
                          "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("toy2d.json")).read_text())
    assert "fractal/ideal/msd" in results["runs"]
