# make demo: set up (once) and train a tiny hybrid end to end on the embedded corpus.   make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

.PHONY: setup demo test test-gpu clean

setup: $(VENV)/.installed

# Idempotent: the venv and the editable install are redone only when the project's metadata changes.
# torch goes first where the venv has none: torch==2.13.0 is the CPU build on this machine's disk.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray,hf]'
	touch $@

demo: setup
	$(BIN)/lctrain demo --config configs/demo.yaml --run-dir $(RUN_DIR)

# make ray-demo: the demo config as a Ray job (lctrain submit) on a local single-node cluster with token auth,
# stopped at the end also on failure; prints how to open TensorBoard on the run (lctrain/ray/demo.py).
.PHONY: ray-demo
ray-demo: setup
	$(BIN)/python -m lctrain.ray.demo --config configs/demo.yaml --run-dir runs/ray-demo

# The venv's tools first on PATH for every target: DeepSpeed builds its CPU communication op with the ninja it
# finds, and a different ninja on a later run would rebuild it.
export PATH := $(CURDIR)/$(BIN):$(PATH)

test: setup
	$(BIN)/python -m pytest -q -ra

test-gpu: setup
	$(BIN)/python -m pytest -q -ra -m "gpu or multigpu"

clean:
	rm -rf runs .pytest_cache
