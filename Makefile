# PLW study pipeline. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HYDRA_FULL_ERROR ?= 0

# Datasets for `make table1` (config names in conf/dataset/) and Hydra overrides for any stage.
DATASETS ?= alpaca_data,alpaca_data_cleaned,alpaca_data_short,dolly,ultrafeedback,dolly_short,ultrafeedback_short
SHARED_DATASETS ?= shared_alpaca52k,shared_alpaca52k_short,shared_alpaca_gpt4,shared_alpaca_gpt4_short,shared_alpaca_gpt4_medium,shared_alpaca_gpt4_tiny,shared_dolly_hhrlhf,shared_dolly_hhrlhf_short,shared_seed_tasks
OVERRIDES ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow lint format data table1 table1-shared inspect-config clean-processed

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

setup: ## idempotent set-up: R stack, .venv, torch (CPU here), pinned Python deps
	@bash scripts/setup.sh

test: setup ## run the test suite (set-up included; slow checks excluded, see test-slow)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup ## the slow checks only (longer end-to-end runs)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: setup ## ruff lint and format check (configured in pyproject.toml) and the import graph (no cycles)
	$(VENV)/bin/ruff check pipeline tests benchmarks scripts
	$(VENV)/bin/ruff format --check pipeline tests benchmarks scripts
	$(PY) scripts/check_imports.py pipeline

format: setup ## ruff format, in place
	$(VENV)/bin/ruff format pipeline tests benchmarks scripts

data: setup ## build one dataset: make data OVERRIDES="dataset=alpaca_data_short"
	$(PY) -m pipeline.data.build $(OVERRIDES)

table1: setup ## Table 1 statistics for DATASETS (downloads the paper's data; needs internet once)
	$(PY) -m pipeline.data.stats stats_datasets=[$(DATASETS)] $(OVERRIDES)

table1-shared: setup ## Table 1 statistics for the real instruction data in ../shared (offline)
	$(PY) -m pipeline.data.stats stats_datasets=[$(SHARED_DATASETS)] paths.llama_tokenizer='$${paths.shared_dir}/tokenizers/llama' $(OVERRIDES)

inspect-config: setup ## print the composed config: make inspect-config OVERRIDES="model=llama2_7b plw=0.1"
	$(PY) -m pipeline.show_config $(OVERRIDES)

clean-processed: ## delete processed datasets (downloads in data/raw are kept)
	rm -rf data/processed

.PHONY: regress suggest
regress: setup ## GLMM per dataset, GAMs, figures and report from paths.runs_dir (-> paths.reports_dir/analysis)
	$(PY) -m pipeline.analysis regress $(OVERRIDES)

suggest: setup ## the PLW for a dataset: the paper's published answer, and your study's GAM once `make regress` fitted one: make suggest DATA=my.jsonl TOKENIZER=<folder|hub id> [FORMAT=alpaca|dolly|ultrafeedback|messages] [TURNS=all|last (chat)] (or RG=<R_g>)
	$(PY) -m pipeline.analysis suggest $(if $(DATA),--data "$(DATA)") $(if $(TOKENIZER),--tokenizer "$(TOKENIZER)") $(if $(FORMAT),--format "$(FORMAT)") $(if $(RG),--r-g $(RG)) $(if $(TURNS),analysis.suggest.completion_turns=$(TURNS)) $(OVERRIDES)

.PHONY: fetch-data eval
.PHONY: fetch-demo-data
fetch-data: setup ## the offline benchmark mirror in eval.data_dir (needs internet once; data/benchmarks by default)
	$(PY) -m pipeline.eval.fetch $(OVERRIDES)

fetch-demo-data: setup ## make demo's inputs from pinned sources into data/shared (or ROOT=<dir>) unless ../shared has them (needs GitHub and the hub once)
	$(PY) -m pipeline.shared_data $(if $(ROOT),--root "$(ROOT)") $(OVERRIDES)

fetch-data: fetch-demo-data

eval: setup ## evaluate finished runs lacking results (OVERRIDES: eval.run_dir=<run>, eval.pretrained=true model=..., eval=cpu_small)
	$(PY) -m pipeline.eval $(OVERRIDES)

.PHONY: train
train: setup ## one training run: make train OVERRIDES="plw=0.1 model=tiny dataset=shared_alpaca52k train=cpu_small"
	$(PY) -m pipeline.train $(OVERRIDES)

.PHONY: inspect-data
inspect-data: setup ## show how instances are tokenized and weighted: make inspect-data OVERRIDES="dataset=shared_alpaca52k model=tiny plw=0.1 n=3" (chat data: dataset.source.format=messages [dataset.completion_turns=last])
	$(PY) -m pipeline.inspect_data $(OVERRIDES)

.PHONY: sweep status slurm-up slurm-down
sweep: setup ## run an experiment's grid, resumable: make sweep EXPERIMENT=main [DRY_RUN=1] [OVERRIDES="launcher=slurm launcher.partition=gpu"]
	$(PY) -m pipeline.sweep run experiment=$(or $(EXPERIMENT),demo) $(if $(filter 1 true yes,$(DRY_RUN)),--dry-run) $(OVERRIDES)

status: setup ## the grid's state from the run store: make status [EXPERIMENT=main] (no EXPERIMENT: every run)
	$(PY) -m pipeline.sweep status $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(OVERRIDES)

slurm-up: ## start a real single-node SLURM here (root, Debian; installs slurm + MariaDB accounting once)
	bash scripts/slurm/start.sh

slurm-down: ## stop the single-node SLURM started by slurm-up (its state is kept)
	bash scripts/slurm/stop.sh

.PHONY: demo
pretrain: setup ## build (once; cached) the pre-trained tiny models of a grid: make pretrain [EXPERIMENT=demo] or OVERRIDES="model=tinylm_a"
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.pretrain $(if $(EXPERIMENT),experiment=$(EXPERIMENT),$(if $(OVERRIDES),,experiment=demo)) $(OVERRIDES)

demo: setup ## the embedded default, one command: pretrain + sweep + eval + regress on experiment demo, then a summary (docs/demo.md): make demo [EXPERIMENT=demo_ci] [OVERRIDES=...]
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.demo --experiment $(or $(EXPERIMENT),demo) $(OVERRIDES)
