# `make fit` and `make test` build .venv themselves on a fresh clone (Python 3.10+ and pip only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: fit test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

fit: $(STAMP)
	$(BIN)/ddp-train fit

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ddp_train tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
