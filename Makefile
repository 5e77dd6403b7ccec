# kvroute: one virtualenv in .venv, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run external test lint bench mutate

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: launch configs/default.yaml on an embedded local Ray, replay the
## bundled workload through the HTTP API, print the routing report, shut down.
run: install
	$(VENV)/bin/kvroute run configs/default.yaml

## kvroute in front of engines it did not start: three `kvroute serve-replica`
## processes (each with its own hash root, as vLLM draws it from PYTHONHASHSEED),
## then the bundled workload through the router (configs/external.yaml).
external: install
	@pids=""; trap 'kill $$pids 2>/dev/null' EXIT INT TERM; \
	for i in 1 2 3; do \
	  events='{"enable_kv_cache_events": true, "publisher": "zmq", '; \
	  events="$$events\"endpoint\": \"tcp://127.0.0.1:556$$i\", "; \
	  events="$$events\"replay_endpoint\": \"tcp://127.0.0.1:557$$i\"}"; \
	  PYTHONHASHSEED=$$i $(VENV)/bin/kvroute serve-replica configs/external.yaml \
	    --port 810$$i --kv-events-config "$$events" & pids="$$pids $$!"; \
	done; \
	$(VENV)/bin/kvroute run configs/external.yaml

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
