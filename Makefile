# `make run` and `make test` set up a local virtual environment (.venv) on first use;
# later runs reuse it and start at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-kernels lint bench clean

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

# The tests marked numerics (a bound on a trained or computed number) under the kernels this CPU
# does not pick by itself: AVX2 (the AVX-512 paths off, on an AVX-512 machine) and the scalar
# ones. Run before each submission, beside make test (which runs them under the native kernels).
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m numerics $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m numerics $(PYTEST_ARGS)

# ruff (lint and format) over the repository, mypy over the library packages and bench/ (pyproject.toml), and
# the layout floors (no file over 450 lines, no function over 45, no import cycle: bench/layout.py).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m bench.layout --quiet

bench: $(STAMP)
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) build *.egg-info
