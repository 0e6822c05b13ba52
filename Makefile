# Two entry points (README Quickstart): `make tiny` trains the tiny CPU example, `make test` runs the suite.
# Both create ./.venv and install everything they need on a fresh machine (Python 3.11, no GPU).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install tiny test
install: $(BIN)/.installed

tiny: $(BIN)/.installed
	$(BIN)/python tools/make_tiny_corpus.py data/tiny
	$(BIN)/megatron-align train examples/tiny_cpu.yaml $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
