# raptr: every target sets itself up (creates .venv on first use).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of torch 2.13.0 lies on this machine's disk; an unpinned torch would pull a
# multi-GB CUDA build. Override on a GPU box: make install TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
PYTEST := $(BIN)/python -m pytest

.PHONY: install install-torchtitan test test-slow test-all demo bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# torchtitan for tests/test_torchtitan.py, at the versions tested, without its declared extras
# (wandb, an older datasets) so the environment stays the one the rest of the suite runs on.
TORCHTITAN := torchtitan==0.3.0 triton==3.9.0 spmd_types==0.2.3 torchdata==0.11.0 tyro==1.0.17 \
	docstring_parser==0.18.0 einops==0.8.2 torch_checkpointing==0.1.1 typeguard==4.6.1
# (the stamp is renamed when the list changes, so installed venvs catch up)
TT_STAMP := $(VENV)/.torchtitan-stamp-2

install-torchtitan: $(TT_STAMP)

$(TT_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(TORCHTITAN)
	touch $(TT_STAMP)

# Default test run: fast and medium tests (< ~10 min on 2 cores). pytest exit 5 (no tests) fails.
test: install $(TT_STAMP)
	$(PYTEST) -q

# Long experiment tests, run separately.
test-slow: install $(TT_STAMP)
	$(PYTEST) -q -m slow

test-all: install $(TT_STAMP)
	$(PYTEST) -q -m "slow or not slow"

# The main job: RaPTr and standard training side by side from one seed (~3 min of training on
# 2 cores), then a table and plots (results/demo/). `raptr train --config bert-tiny-raptr` remains.
demo: install
	$(BIN)/raptr compare --config compare/demo --workers 2 --results results

bench: install
	$(BIN)/python benchmarks/skip_speed.py

# On a CUDA machine whose Python has torch + transformers (no venv, no install): <= 8 minutes.
GPU_OUT ?= docs/results/gpu
bench-gpu:
	PYTHONPATH=src $(PY) benchmarks/gpu_suite.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) runs results .pytest_cache
