# Two commands for a fresh machine (Python 3.11, no GPU needed):
#   make demo    set up .venv, then run steps 1-4 on a generated Japanese corpus (DATA_DIR=... for a real one)
#   make test    set up .venv, then run the test suite
# `make` alone prints the targets (make help); it used to set up .venv, which is now `make setup`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: help demo test test-gpu setup clean
.DEFAULT_GOAL := help

help:  ## this list
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed  ## create .venv and install requirements.txt (again only when it changes)

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup  ## steps 1-4 on a generated Japanese corpus, on CPU, in minutes (DATA_DIR=... for a real corpus)
	PYTHON=$(abspath $(PY)) PYTHONPATH=$(CURDIR) DATA_DIR=$(DATA_DIR) bash demo/run_demo.sh

# the optional packages (requirements-test.txt), so that the tests of .zst, .parquet and --tensorboard run, not skip
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

# TRM_TEST_OPTIONAL=1: the optional packages were just installed, so a test that would skip for want of one fails instead
test: setup $(VENV)/.installed-test  ## the test suite, CPU only, with the optional packages (about 10 minutes on 2 cores; the slowest tests listed last)
	TRM_TEST_OPTIONAL=1 $(PY) -m pytest -q --durations=10

# On a GPU machine whose Python already has torch: CUDA, bf16, torch.compile and NCCL tests.
test-gpu:  ## the GPU tests, with the Python that has CUDA torch (PYTHON=...)
	$(PYTHON) -m pytest -q -m gpu

clean:  ## remove demo_run and .pytest_cache
	rm -rf demo_run .pytest_cache
