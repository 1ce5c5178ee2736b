# `make demo` and `make test` work on a fresh clone: both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The TPU plan's compiler (tools/tpu_plan.py): jax[tpu] and libtpu in an interpreter of their own, never next to
# torch_xla (both bring their own XLA, and a TPU VM's torch_xla[tpu] pins its own libtpu).
TPU_VENV ?= .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
JAX_TPU := jax[tpu]==0.10.2
PYTEST_ARGS ?=

.PHONY: install tpu-env tpu-tables demo test test-quick test-slow test-slow-ci bench gap-study lint format clean

install: $(STAMP)

# Re-runs only when the dependency list changes; the editable install picks up code changes by itself.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

tpu-env: $(TPU_STAMP)

$(TPU_STAMP): Makefile
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet "$(JAX_TPU)"
	touch $(TPU_STAMP)

# The docs' tables of TPU plans, rendered again from the committed bench/v*/*.json (after a new plan).
tpu-tables: install
	$(PY) tools/tpu_plan.py --update-docs

demo: install
	PJRT_DEVICE=CPU $(VENV)/bin/digpt demo

test: install tpu-env
	PJRT_DEVICE=CPU $(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no second process (no command-line run, torchrun, multi-device XLA or libtpu compile), no XLA
# compile in this process, nothing slow. The markers follow what a test does (tests/conftest.py enforces it).
test-quick: install
	PJRT_DEVICE=CPU $(PY) -m pytest -m "not slow and not multiprocess and not xla" -x -q $(PYTEST_ARGS)

test-slow: install tpu-env
	PJRT_DEVICE=CPU $(PY) -m pytest -m slow $(PYTEST_ARGS)

# What CI runs after `make test`: the slow tests short of the full ViT programs.
test-slow-ci: install tpu-env
	PJRT_DEVICE=CPU $(PY) -m pytest -m "slow and not vit" $(PYTEST_ARGS)

bench: install
	PJRT_DEVICE=CPU $(PY) tools/bench.py train --model digpt_tiny --backend cpu --batch 32 --out runs/bench

# About 70 minutes on 2 cores; reruns skip what parity/reports/gap_study_digits/ledger.jsonl already holds.
gap-study: install
	PJRT_DEVICE=CPU $(PY) -m parity gap study --config yaml/parity/gap_study_digits.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(TPU_VENV) runs .pytest_cache .ruff_cache
