# Two commands do it all on a fresh machine:
#   make demo   -- create .venv, install torch + this package, run the main job
#   make test   -- (same set-up if needed) run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1

.PHONY: setup demo test bench gpu-session

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[dev,bench,lightning,hf]"
	touch $@

demo: setup
	$(VENV)/bin/guidance-kernels demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/guidance-kernels bench --quick --device cpu

# On a lent GPU machine (its own python3, no network): build, GPU tests, memcheck, full bench.
# See docs/cuda.md "GPU session". Output in $(OUT) (default ./gpu_out).
gpu-session:
	bash scripts/gpu_session.sh
