# hf_shedder developer commands. `make demo` sets up .venv and runs the offline demo;
# `make test` runs the test suite (CPU, offline).
#
# Transformers: `make test` runs on the newest tested release (hf_shedder/versions.py) in .venv;
# `make test TRANSFORMERS=oldest` runs on the oldest one in .venv-oldest (any release number works too,
# in .venv-<number>). CI (.ci/run) runs both.
PYTHON ?= python3
TRANSFORMERS ?= newest
TRANSFORMERS_VERSION := $(if $(filter oldest newest,$(TRANSFORMERS)),$(shell $(PYTHON) hf_shedder/versions.py $(TRANSFORMERS)),$(TRANSFORMERS))
VENV ?= $(if $(filter newest,$(TRANSFORMERS)),.venv,.venv-$(TRANSFORMERS))
BIN := $(VENV)/bin
# Written after a successful install; the install reruns only when what it depends on changed.
STAMP := $(VENV)/.installed-transformers-$(TRANSFORMERS_VERSION)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip and setuptools print pages of notices on every install; they go to $(VENV)/install.log, shown on failure.
$(STAMP): setup.cfg setup.py hf_shedder/versions.py Makefile | $(BIN)/python
	@echo "installing hf_shedder + transformers==$(TRANSFORMERS_VERSION) into $(VENV) (log: $(VENV)/install.log)"
	@rm -f $(VENV)/.installed-*
	@{ $(BIN)/python -m pip install -q --upgrade pip && \
	   $(BIN)/python -m pip install -q "torch==2.13.0" && \
	   $(BIN)/python -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_VERSION)"; \
	 } > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@touch $@

# CPU torch first (in the recipe above): a plain `torch` requirement would pull a multi-GB CUDA build.
install: $(STAMP)

test: install
	@echo "tests on transformers $$($(BIN)/python -c 'import transformers; print(transformers.__version__)') ($(VENV))"
	@$(BIN)/python -m pytest tests -p no:cacheprovider; rc=$$?; \
	 if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

lint: install
	$(BIN)/ruff check hf_shedder tests recipes benchmarks

demo: install
	$(BIN)/python recipes/demo_offline.py --out demo_out --overwrite

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
