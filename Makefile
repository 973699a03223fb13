# ldct-lightning: every target prints the command it runs.
SHELL := /bin/bash
PYTHON ?= python3
ARGS ?=
DEMO_DATA ?= data/demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo data-demo test test-full lint format bench train-first clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: .install.stamp  ## install torch (CPU build when no CUDA GPU) and the project with dev extras

.install.stamp: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "# torch already installed: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "# CUDA GPU found: torch comes with the project's requirements"; \
	else \
		echo "+ $(PYTHON) -m pip install torch==2.13.0   # CPU build (no CUDA GPU here)"; \
		$(PYTHON) -m pip install torch==2.13.0; \
	fi
	@echo "+ $(PYTHON) -m pip install -e .[dev]"
	@$(PYTHON) -m pip install -e ".[dev]"
	@touch $@

demo: install  ## generate the built-in demo data set and summarise it (noise, dose, overview figure)
	@echo "+ ldct-simulate $(DEMO_DATA) --preset demo --overwrite"
	@ldct-simulate $(DEMO_DATA) --preset demo --overwrite
	@echo "+ ldct-data-summary $(DEMO_DATA)"
	@ldct-data-summary $(DEMO_DATA)

test: install  ## run the fast test suite (what CI runs)
	@echo "+ $(PYTHON) -m pytest -m 'not slow and not gpu' $(PYTEST_ARGS)"
	@$(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-full: install  ## run every test, slow ones included (GPU tests skip without a GPU)
	@echo "+ $(PYTHON) -m pytest $(PYTEST_ARGS)"
	@$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: install  ## ruff check and format check
	@echo "+ ruff check . && ruff format --check ."
	@ruff check . && ruff format --check .

format: install  ## ruff format and autofix
	@echo "+ ruff format . && ruff check --fix ."
	@ruff format . && ruff check --fix .

bench: install  ## speed benchmarks, written to bench/results.json
	@echo "+ $(PYTHON) -m ldct_lightning.bench --out bench/results.json $(ARGS)"
	@$(PYTHON) -m ldct_lightning.bench --out bench/results.json $(ARGS)

clean:  ## remove generated data, outputs, caches
	@echo "+ rm -rf data outputs logs wandb .pytest_cache .ruff_cache .install.stamp"
	@rm -rf data outputs logs wandb .pytest_cache .ruff_cache .install.stamp
