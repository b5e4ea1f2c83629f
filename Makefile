# Two commands do all set-up: `make run` (the whole pipeline on the embedded default) and
# `make test` (the test suite, including the local Slurm + S3 fixtures).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
# Installed only when the venv has no importable torch; GPU users: TORCH_SPEC="torch==2.5.1" or
# VENV_FLAGS=--system-site-packages to use the CUDA build already on the machine.
TORCH_SPEC ?= torch==2.13.0
# An independent Inception port for the FID parity test, installed with --no-deps so that it
# brings neither torchvision nor another torch.
FID_REFERENCE_SPEC ?= torch-fidelity==0.4.0
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast test-unit imports cluster-deps cluster-up cluster-down lint bench

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps "$(FID_REFERENCE_SPEC)"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) launch/submit.py $(ARGS)

cluster-deps:
	bash launch/install_cluster_deps.sh

test: setup cluster-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slurm and not s3" $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

imports: setup
	$(PY) -m tsvae_dist.tools.imports

cluster-up: setup cluster-deps
	bash launch/dev_cluster.sh up

cluster-down:
	bash launch/dev_cluster.sh down

lint: setup
	$(VENV)/bin/ruff check tsvae_dist launch shards tests benchmarks

bench: setup
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_fid.py
