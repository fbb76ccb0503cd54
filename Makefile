# `make test` builds .venv from the pinned requirements when it is missing, then runs the default suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo toy2d digits bench env clean

$(STAMP): requirements/ci.txt requirements/nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

env: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --timeout 600

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow --timeout 1800

demo: $(STAMP)
	$(PY) -m diffsolve_studies.cli demo --out outputs/demo
	$(PY) -m diffsolve_studies.cli toy --quick --datasets fractal --out outputs/demo/toy2d --figures outputs/demo/figures --cache outputs/demo/cache
	@echo "figures: outputs/demo/fractal_ideal.png and outputs/demo/figures/toy2d_fractal_points.png: the quick study"
	@echo "(16x16 grid, 40 steps, toy models trained 5% of the recipe, trained here): the study's behaviour in kind,"
	@echo "not its numbers; each panel gives the mean distance to the nearest mode at the start and the end (full study: make toy2d)"

toy2d: $(STAMP)
	$(PY) benchmarks/toy2d.py

digits: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/digits.py

bench: $(STAMP)
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
