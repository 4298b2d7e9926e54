# Two commands on a fresh machine with Python 3.11 (README Quickstart):
#   make run    set up .venv and train ZFNet on the embedded dataset (mirrored strategy)
#   make test   set up .venv and run the whole test suite (lint included)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run test test-fast lint bench lock

# Installs the exact versions of requirements.lock (tested), not whatever the ranges of
# pyproject.toml resolve to today. (`pip install .` installs the package itself; a checkout
# needs no install: main.py runs from here.)
$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	touch $@

# Re-resolves pyproject.toml's ranges (with the test extra) to the newest versions into
# requirements.lock (pip-tools, in a venv of its own). Then `make test` on the new lock
# before committing it.
LOCK_VENV := .lock-venv
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip-tools>=7.4,<8"
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --extra test --output-file requirements.lock \
		pyproject.toml

setup: $(VENV)/.installed

run: setup
	$(PY) main.py --mode=train --strategy=mirrored

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# One pytest process per core (pytest-xdist; at most 4): on 2 cores the suite takes 8 minutes
# instead of 14. `.venv/bin/python -m pytest tests/test_x.py` runs one file in one process.
# Tests handed out one at a time (--dist loadgroup: xdist's default first hands each worker
# a block of consecutive tests, and the slow tests, sorted first, all went to one), the
# tests of a costly module fixture together (tests/conftest.py SHARED_MODULE_FIXTURES).
PYTEST := $(PY) -m pytest -q --numprocesses=auto --maxprocesses=4 --dist loadgroup

test: setup lint
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(PY) bench/pipeline.py
