# kvroute: one virtualenv in .venv, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench mutate

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: launch configs/default.yaml on an embedded local Ray, replay the
## bundled workload through the HTTP API, print the routing report, shut down.
run: install
	$(VENV)/bin/kvroute run configs/default.yaml

## The whole test suite (slow multi-process tests included).
test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks.block_manager
	$(PY) -m benchmarks.router

## Mutation testing of the core modules against the fast tests (not part of CI).
## A reproducible sample; e.g. `make mutate MUTATE_ARGS="--module events/sequencer.py"`.
MUTATE_ARGS ?= --limit 80 --seed 1
mutate: install
	$(PY) -m benchmarks.mutate $(MUTATE_ARGS)
