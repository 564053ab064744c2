PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint types unit install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

# Stamp files so a second `make` does not reinstall; they depend on pyproject.toml.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,bench,cluster]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(BIN)/promptcache serve $(ARGS)

lint: install-dev
	$(BIN)/ruff check promptcache tests scripts

types: install-dev
	$(BIN)/mypy promptcache/cache promptcache/engine promptcache/server promptcache/model promptcache/bench promptcache/cluster

# Debian packages the tests start for real (a redis-server per test that needs one; chromium for the dashboard)
unit: install-dev
	scripts/ensure-debian-packages.sh redis-server=redis-server chromium=chromium
	$(BIN)/python -m pytest -q $(ARGS)

test: lint types unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
