# ldct-lightning: every target prints the command it runs.
SHELL := /bin/bash
# Every target runs its tools from one project virtual environment: `.venv` in the checkout, unless a virtual
# environment is already active (VIRTUAL_ENV). So a package installed by hand elsewhere can never hide a missing
# dependency, and CI (a clean clone) always tests a fresh `.venv`.
BASE_PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
ARGS ?=
DEMO_DATA ?= data/demo
DEMO_RUN ?= outputs/demo-run
DEMO_OUT ?= outputs/demo
# the row every other is tested against in `make ablations` (with seeds: e.g. PROPOSED=proposed_s1)
PROPOSED ?= proposed
PYTEST_ARGS ?=
# the methods of make baselines and make bench-quality (model options; attention_unet = the proposed method)
METHODS ?= attention_unet,redcnn,pix2pix,cyclegan,oracle
# make bench-quality: the bench preset at 256x256 (same field of view and noise) so that it fits a CPU
BENCH_DATA ?= data/bench
BENCH_SIM_ARGS ?= --size 256
# make bench-quality: training seeds (rows: mean ± SD over seeds) and extra ablations of the proposed network
# (the paper-literal stage 2) trained beside METHODS in the same sweep folder
BENCH_SEEDS ?= 1,2,3
BENCH_ABLATIONS ?= proposed_eq9
# make bench-generalize: train on site A's style, test on site B's (presets site_a, site_b), at this size
GEN_TRAIN ?= data/site_a
GEN_TEST ?= data/site_b
GEN_SIM_ARGS ?= --size 256

.DEFAULT_GOAL := help
.PHONY: help install demo evaluate report baselines data-demo test test-full lint format bench bench-registration bench-quality bench-generalize train-first train-second train-two ablations clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: $(VENV)/.install.stamp  ## create the project venv, install torch (CPU build when no CUDA GPU) and the project with dev extras

$(VENV)/bin/python:
	@echo "+ $(BASE_PYTHON) -m venv $(VENV)"
	@$(BASE_PYTHON) -m venv $(VENV)

# re-runs only when pyproject.toml changes: a second `make test` reuses the environment
$(VENV)/.install.stamp: pyproject.toml | $(VENV)/bin/python
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "# torch already installed in $(VENV): $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "# CUDA GPU found: torch comes with the project's requirements"; \
	else \
		echo "+ $(PYTHON) -m pip install torch==2.13.0   # CPU build (no CUDA GPU here)"; \
		$(PYTHON) -m pip install torch==2.13.0 || exit $$?; \
	fi
	@echo "+ $(PYTHON) -m pip install -e .[dev]"
	@$(PYTHON) -m pip install -e ".[dev]"
	@touch $@

demo: data-demo  ## the main job: demo data, stage 1, stage 2, evaluation and outputs/demo/report.md
	@echo "+ ldct-data-summary $(DEMO_DATA)"
	@ldct-data-summary $(DEMO_DATA)
	@echo "+ rm -rf $(DEMO_RUN) && $(PYTHON) train.py experiment=demo ablation=proposed hydra.run.dir=$(DEMO_RUN) $(ARGS)"
	@rm -rf $(DEMO_RUN) && $(PYTHON) train.py experiment=demo ablation=proposed hydra.run.dir=$(DEMO_RUN) $(ARGS)
	@$(MAKE) --no-print-directory evaluate

evaluate: install  ## evaluate the demo run (LDCT, firstStep, proposed) on the held-out demo patients
	@echo "+ ldct-evaluate --data $(DEMO_DATA) --run $(DEMO_RUN) --proposed proposed --out $(DEMO_OUT) --overwrite"
	@ldct-evaluate --data $(DEMO_DATA) --run $(DEMO_RUN) --proposed proposed --out $(DEMO_OUT) --overwrite
	@echo "# report: $(DEMO_OUT)/report.md"

report: install  ## rebuild the report (tables, statistics, figures) from an evaluation folder
	@echo "+ ldct-evaluate --report-only --out $(DEMO_OUT)"
	@ldct-evaluate --report-only --out $(DEMO_OUT)

data-demo: install  ## generate the demo data set when it is missing
	@if [ -f $(DEMO_DATA)/manifest.csv ] && [ -f $(DEMO_DATA)/.ldct-pseudonym.key ]; then echo "# $(DEMO_DATA) exists (make clean, or ldct-simulate --overwrite, to remake it)"; \
	elif [ -f $(DEMO_DATA)/manifest.csv ]; then echo "+ ldct-simulate $(DEMO_DATA) --preset demo --overwrite   # made before keyed pseudonyms"; ldct-simulate $(DEMO_DATA) --preset demo --overwrite; \
	else echo "+ ldct-simulate $(DEMO_DATA) --preset demo"; ldct-simulate $(DEMO_DATA) --preset demo; fi

train-first: data-demo  ## stage 1 (firstStep) on the demo set; ARGS="..." passes Hydra overrides
	@echo "+ $(PYTHON) train.py experiment=demo ablation=firstStep $(ARGS)"
	@$(PYTHON) train.py experiment=demo ablation=firstStep $(ARGS)

train-second: data-demo  ## stage 2 from the latest stage-1 run of the experiment
	@echo "+ $(PYTHON) train.py experiment=demo ablation=proposed 'run_stages=[second]' $(ARGS)"
	@$(PYTHON) train.py experiment=demo ablation=proposed 'run_stages=[second]' $(ARGS)

train-two: data-demo  ## both stages in one run (the proposed method)
	@echo "+ $(PYTHON) train.py experiment=demo ablation=proposed $(ARGS)"
	@$(PYTHON) train.py experiment=demo ablation=proposed $(ARGS)

ablations: data-demo  ## proposed, proposed_eq9 (the paper's stage 2), proposed_unregistered, oneStep and firstStep as one Hydra multirun, then their table
	@echo "+ $(PYTHON) train.py -m experiment=demo ablation=proposed,proposed_eq9,proposed_unregistered,oneStep,firstStep $(ARGS)"
	@$(PYTHON) train.py -m experiment=demo ablation=proposed,proposed_eq9,proposed_unregistered,oneStep,firstStep $(ARGS)
	@sweep=$$(ls -td outputs/multiruns/demo/*/ | head -n 1); \
	echo "+ ldct-evaluate --data $(DEMO_DATA) --sweep $$sweep --proposed $(PROPOSED) --out $${sweep}evaluation --overwrite"; \
	ldct-evaluate --data $(DEMO_DATA) --sweep $$sweep --proposed $(PROPOSED) --out $${sweep}evaluation --overwrite

baselines: data-demo  ## the proposed model and every baseline as one multirun on the demo set, then one evaluation
	@echo "+ $(PYTHON) train.py -m experiment=demo model=$(METHODS) $(ARGS)"
	@$(PYTHON) train.py -m experiment=demo model=$(METHODS) $(ARGS)
	@sweep=$$(ls -td outputs/multiruns/demo/*/ | head -n 1); \
	bm3d=$$($(PYTHON) -c "import bm3d" 2>/dev/null && echo --bm3d || echo "# bm3d not installed (pip install -e .[bm3d]): no BM3D row" >&2); \
	echo "+ ldct-evaluate --data $(DEMO_DATA) --sweep $$sweep $$bm3d --proposed proposed --out $${sweep}evaluation --overwrite"; \
	ldct-evaluate --data $(DEMO_DATA) --sweep $$sweep $$bm3d --proposed proposed --out $${sweep}evaluation --overwrite

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

bench-registration: install  ## registration error vs the synthetic truth and time per study -> bench/registration.json
	@echo "+ $(PYTHON) -m ldct_lightning.bench_registration --out bench/registration.json $(ARGS)"
	@$(PYTHON) -m ldct_lightning.bench_registration --out bench/registration.json $(ARGS)

bench-quality: install  ## every method on the bench preset, same budget, BENCH_SEEDS seeds -> bench/quality.json and .md
	@if [ -f $(BENCH_DATA)/manifest.csv ]; then echo "# $(BENCH_DATA) exists (remove it to remake it)"; \
	else echo "+ ldct-simulate $(BENCH_DATA) --preset bench $(BENCH_SIM_ARGS)"; \
	ldct-simulate $(BENCH_DATA) --preset bench $(BENCH_SIM_ARGS) || exit $$?; fi
	@sweep=outputs/multiruns/bench_quality/$$(date +%Y-%m-%d_%H-%M-%S); \
	echo "+ $(PYTHON) train.py -m experiment=bench_quality data.root=$(BENCH_DATA) model=$(METHODS) seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS)"; \
	$(PYTHON) train.py -m experiment=bench_quality data.root=$(BENCH_DATA) model=$(METHODS) seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS) || exit $$?; \
	if [ -n "$(BENCH_ABLATIONS)" ]; then \
	echo "+ $(PYTHON) train.py -m experiment=bench_quality data.root=$(BENCH_DATA) model=attention_unet ablation=$(BENCH_ABLATIONS) seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS)"; \
	$(PYTHON) train.py -m experiment=bench_quality data.root=$(BENCH_DATA) model=attention_unet ablation=$(BENCH_ABLATIONS) seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS) || exit $$?; fi; \
	echo "+ $(PYTHON) -m ldct_lightning.bench_quality --data $(BENCH_DATA) --sweep $$sweep --out bench/quality.json"; \
	$(PYTHON) -m ldct_lightning.bench_quality --data $(BENCH_DATA) --sweep $$sweep --out bench/quality.json

bench-generalize: install  ## train on site A, test on site B (another kernel, dose, sizes, DICOM) -> bench/generalize.json and .md
	@for pair in "$(GEN_TRAIN) site_a" "$(GEN_TEST) site_b"; do set -- $$pair; \
	if [ -f $$1/manifest.csv ]; then echo "# $$1 exists (remove it to remake it)"; \
	else echo "+ ldct-simulate $$1 --preset $$2 $(GEN_SIM_ARGS)"; ldct-simulate $$1 --preset $$2 $(GEN_SIM_ARGS) || exit $$?; fi; done
	@sweep=outputs/multiruns/bench_generalize/$$(date +%Y-%m-%d_%H-%M-%S); \
	echo "+ $(PYTHON) train.py -m experiment=bench_quality data.root=$(GEN_TRAIN) data.n_test=2 model=attention_unet seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS)"; \
	$(PYTHON) train.py -m experiment=bench_quality data.root=$(GEN_TRAIN) data.n_test=2 model=attention_unet seed=$(BENCH_SEEDS) hydra.sweep.dir=$$sweep $(ARGS) || exit $$?; \
	echo "+ $(PYTHON) -m ldct_lightning.bench_quality --data $(GEN_TRAIN) --sweep $$sweep --evaluation $$sweep/evaluation_site_a --out bench/generalize_site_a.json"; \
	$(PYTHON) -m ldct_lightning.bench_quality --data $(GEN_TRAIN) --sweep $$sweep --evaluation $$sweep/evaluation_site_a --out bench/generalize_site_a.json || exit $$?; \
	echo "+ $(PYTHON) -m ldct_lightning.bench_quality --data $(GEN_TEST) --all-test --targets generalize --sweep $$sweep --evaluation $$sweep/evaluation_site_b --out bench/generalize.json"; \
	$(PYTHON) -m ldct_lightning.bench_quality --data $(GEN_TEST) --all-test --targets generalize --sweep $$sweep --evaluation $$sweep/evaluation_site_b --out bench/generalize.json

clean:  ## remove generated data, outputs, caches
	@echo "+ rm -rf data outputs logs wandb .pytest_cache .ruff_cache $(VENV)/.install.stamp"
	@rm -rf data outputs logs wandb .pytest_cache .ruff_cache $(VENV)/.install.stamp
