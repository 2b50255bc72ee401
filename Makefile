# ramp: the two commands of the README (`make demo`, `make test`) and their helpers.
#
# `setup` builds .venv once; a stamp file that depends on pyproject.toml makes every later `make` instant
# until the dependencies change. Order matters:
#   1. torch==2.13.0 first: this pin matches the CPU wheel on CI's disk. A bare `torch` requirement
#      resolved by pip would download several GB of CUDA packages instead.
#   2. the project itself, editable, with the dev and hf extras (torch>=2.6 is then already satisfied).
#   3. deepspeed last, with --no-build-isolation: it builds from source and imports torch in setup.py;
#      an isolated build environment would download a second torch just to build it.
# On a GPU cluster install the CUDA torch build into .venv first; `make setup` keeps it: step 1 is skipped
# when the venv's torch is a CUDA build, so its TransformerEngine and Apex builds keep working.
# Elsewhere, TORCH_PIP_ARGS='--index-url URL' points pip at a CPU wheel index for step 1.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := setup
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ramp-setup.stamp
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
DEEPSPEED_VERSION ?= 0.19.8
PIP := $(BIN)/python -m pip --disable-pip-version-check
RUFF ?= $(BIN)/ruff

DEMO_RECIPE ?= moe-tiny
DEMO_NPROC ?= 2
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup demo test test-slurm lint format clean

# pytest with PYTEST_ARGS after $(1); exit 5 (no test collected) fails: a suite that ran nothing must not pass.
define pytest
echo "$(BIN)/python -m pytest $(1) $(PYTEST_ARGS)"; rc=0; $(BIN)/python -m pytest $(1) $(PYTEST_ARGS) || rc=$$?; \
if (( rc == 5 )); then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
endef

help:
	@echo "make setup   create $(VENV) and install ramp (torch $(TORCH_VERSION), deepspeed $(DEEPSPEED_VERSION))"
	@echo "make demo    train $(DEMO_RECIPE) on $(DEMO_NPROC) processes through the DeepSpeed launcher, then plot"
	@echo "make test    ruff check, ruff format --check, pytest (PYTEST_ARGS='-m \"not dist\"' to narrow)"
	@echo "make test-slurm  install and start Slurm on this machine (root, apt-get), run the sbatch template's test"
	@echo "make lint    ruff check + format check;  make format   apply ruff format and fixes"
	@echo "make clean   remove caches and build leftovers (keeps $(VENV) and runs/)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(PIP) install --upgrade pip "setuptools>=70.1" wheel
	@# A CUDA build of torch already in the venv (a cluster's, matched to its TE/Apex builds) stays.
	@if $(BIN)/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then \
		echo "keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') (CUDA build)"; \
	else $(PIP) install $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION); fi
	$(PIP) install -e '.[dev,hf]'
	$(PIP) install --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	@touch $@

demo: setup
	@if [ -f tools/prepare_data.py ]; then $(BIN)/python -m tools.prepare_data --embedded; \
	else echo "tools/prepare_data.py not found: the training run prepares the embedded corpus itself"; fi
	$(BIN)/ramp-launch --launcher deepspeed --nproc $(DEMO_NPROC) -- --recipe $(DEMO_RECIPE) $(DEMO_ARGS)
	@shopt -s nullglob; plots=(runs/$(DEMO_RECIPE)/plots/*.png); \
	if (( $${#plots[@]} == 0 )); then echo "no plots in runs/$(DEMO_RECIPE)/plots/" >&2; exit 1; fi; \
	echo; echo "Plots of the run:"; printf '  %s\n' "$${plots[@]}"

test: setup
	$(RUFF) check .
	$(RUFF) format --check .
	@$(call pytest,)

# Debian's slurm-wlm and munge (installed here if missing), started by the test itself in a private state
# directory (tests/slurm_cluster.py); the test skips, saying why, where they cannot start.
test-slurm: setup
	@if ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then \
		if (( EUID == 0 )) && command -v apt-get >/dev/null; then \
			echo "installing slurm-wlm and munge"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge \
			|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge; }; \
		else echo "slurm-wlm is not installed and this is not root with apt-get: the test will skip"; fi; \
	fi
	@$(call pytest,-m slurm tests/slurm)

lint: setup
	$(RUFF) check .
	$(RUFF) format --check .

format: setup
	$(RUFF) format .
	$(RUFF) check --fix .

clean:
	rm -rf build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
