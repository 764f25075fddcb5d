# One command each on a fresh machine: `make demo` (set up + run the main job) and
# `make test` (set up + run the tests). Setup is idempotent and cheap when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/ddetr_dist/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
DEMO_DIR ?= data/demo
PYTEST_ARGS ?=

.PHONY: setup test test-deps test-gpu gpu-check demo bench clean

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# Debian packages of the cluster tests (real Slurm, munge, shellcheck); as root. Without
# them those tests skip, with the reason.
test-deps:
	@bash tools/install_test_deps.sh

# On a machine with a CUDA torch and a GPU.
test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The first thing to run on a GPU machine (under 8 minutes): builds the op for this GPU, runs
# test-gpu and the benchmarks on the GPU, writes one report (runs/gpu-check/, or
# $DDETR_GPU_CHECK_DIR). Exit 2, at once: no GPU here.
gpu-check: setup
	$(PY) tools/gpu_check.py

demo: setup
	@bash tools/demo.sh $(PY) $(DEMO_DIR)

bench: setup
	$(PY) -m ddetr_dist.cli bench msda
	$(PY) -m ddetr_dist.cli bench data
	$(PY) -m ddetr_dist.cli bench train

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
