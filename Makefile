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
.PHONY: help setup test test-slow data table1 table1-shared inspect-config clean-processed

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

setup: ## idempotent set-up: R stack, .venv, torch (CPU here), pinned Python deps
	@bash scripts/setup.sh

test: setup ## run the test suite (set-up included; slow checks excluded, see test-slow)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup ## the slow checks only (longer end-to-end runs)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

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
