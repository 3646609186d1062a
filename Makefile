# The two commands of the README: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup bench-setup demo up test test-fast lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "modelprint needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# MLServer for bench/end_to_end.py, in its own virtualenv: it pins fastapi < 0.116, which modelprint
# cannot share, and breaks with uvloop >= 0.22 (no current event loop in its inference workers).
bench-setup: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet --disable-pip-version-check 'mlserver==1.7.1' \
		'mlserver-sklearn==1.7.1' 'uvloop<0.22' \
		"scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)')"

demo: setup
	$(BIN)/modelprint demo

up: setup
	$(BIN)/modelprint up

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .venv-mlserver .pytest_cache .mypy_cache .ruff_cache
