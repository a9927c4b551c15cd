# `make run` and `make test` set up a local virtual environment (.venv) on first use;
# later runs reuse it and start at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.txt -r requirements.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m recipes.nested_unet $(ARGS)

test: lint $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format) over the repository, mypy over the library packages (pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) build *.egg-info
