# The two commands of the README. Each sets itself up (a virtual environment in .venv and the
# package installed into it) and can be run again and again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## the main job: demo data -> MAE + MAGMA + uniformity pre-training -> kNN before/after, checkpoint, picture
demo: $(STAMP)
	$(PY) -m magma_composer.data.demo --out data/demo
	$(PY) -m magma_composer.train yamls/demo/mae.yaml

## the test suite (CPU, a few minutes)
test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/overhead.py
	$(PY) bench/pmae.py
	$(PY) bench/data_pipeline.py
	@echo "bench/linear_probe.py needs an encoder and MDS data: see its docstring"

clean:
	rm -rf data/demo runs
