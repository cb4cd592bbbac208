# hf_shedder developer commands. `make demo` sets up .venv and runs the offline demo;
# `make test` runs the test suite (CPU, offline).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	# CPU torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check hf_shedder tests recipes benchmarks

demo: install
	$(BIN)/python recipes/demo_offline.py --out demo_out --overwrite

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
