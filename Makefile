# `make fit` and `make test` build .venv themselves on a fresh clone (Python 3.10+ and pip only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: fit test test-fast lint docs bench clean

# TORCH_INDEX: where torch comes from, e.g. the CPU-only build on a machine without a GPU
# (make fit TORCH_INDEX=https://download.pytorch.org/whl/cpu: a 1.6 GB venv instead of 6.1 GB).
TORCH_INDEX ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

fit: $(STAMP)
	$(BIN)/ddp-train fit

test: lint
	$(BIN)/pytest -q

# The fast tier: everything not marked slow (no multi-process runs); ~3 min against ~15 for all.
test-fast: lint
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check ddp_train tests benchmarks examples
	$(BIN)/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs site
