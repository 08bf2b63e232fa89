# LANCET. `make test` and `make demo` set everything up from nothing (a .venv in this folder).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lancet-installed
# The CPU build on purpose: an unpinned torch pulls a multi-GB CUDA build. GPU users: TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# Test-only: kronfluence is the independent EK-FAC reference. Its declared deps pull a CUDA torch,
# so it goes in without them, with the few it needs.
KRONFLUENCE_SPEC ?= kronfluence==1.0.1 einconv==0.1.0 opt_einsum accelerate
export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds a CPU op; keep its cache per venv (two venvs sharing one rebuild it endlessly)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
PYTEST_ARGS ?= --durations=40
# pip byte-compiles what it installs (65 of the install's 120 s on 2 cores): keep it. This
# machine sets PYTHONDONTWRITEBYTECODE=1 (CI, a machine like it, may too), so a module left
# uncompiled is compiled again by every process that imports it (pip --no-compile made the
# suite take 39 min instead of 21).

.PHONY: help install demo test test-hosts test-fast bench bench-gpu bench-suite plan bench-quick lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(KRONFLUENCE_SPEC)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install LANCET into it

demo: $(STAMP)  ## run the embedded demo end to end (python -m pipeline)
	$(PY) -m pipeline

test: $(STAMP) test-hosts  ## the whole suite CI can afford: fast math, real Ray/DeepSpeed/MLflow/Hydra, end to end
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The two-node test makes two hosts with iproute2's `ip netns` (root); it skips, saying why, without.
test-hosts:
	@command -v ip >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q iproute2 >/dev/null; }; } || \
	  echo "note: iproute2 unavailable; tests/test_two_nodes.py will skip"

test-fast: $(STAMP)  ## only the float64 math tests (no Ray)
	$(PY) -m pytest tests -m "not ray and not slow" $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks; writes bench/RESULTS.md
	$(PY) -m bench.run

bench-suite: $(STAMP)  ## recall of every method on the scenario suite (part of bench)
	$(PY) -m bench.suite

bench-gpu: $(STAMP)  ## the GPU benchmark (1.1B Llama shapes, bf16); says so and skips without CUDA
	$(PY) -m bench.gpu

plan: $(STAMP)  ## the memory plan per stage and GPU for Llama-2-7B and Llama-3-8B shapes
	$(PY) -m pipeline.plan --model llama2-7b --model llama3-8b

bench-quick: $(STAMP)  ## a quick pass of the benchmarks
	$(PY) -m bench.run --quick

lint: $(STAMP)  ## ruff and the import contracts (operators/ imports no Ray, MLflow, Hydra, ...)
	$(VENV)/bin/ruff check operators cluster pipeline tests bench
	$(VENV)/bin/lint-imports

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs multirun mlruns .pytest_cache
