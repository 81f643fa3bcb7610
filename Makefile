# Two commands for a fresh machine (Python 3.11, no GPU needed):
#   make demo    set up .venv, then run steps 1-4 on a generated Japanese corpus (DATA_DIR=... for a real one)
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-gpu setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	PYTHON=$(abspath $(PY)) PYTHONPATH=$(CURDIR) DATA_DIR=$(DATA_DIR) bash demo/run_demo.sh

test: setup
	$(PY) -m pytest -q

# On a GPU machine whose Python already has torch: CUDA, bf16, torch.compile and NCCL tests.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

clean:
	rm -rf demo_run .pytest_cache
