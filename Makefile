# Two commands set up and use normdrop on a fresh machine: `make study` and `make test`.
# Both are idempotent: the venv is (re)installed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STUDY_ARGS ?=

.PHONY: study test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev,ray]'
	touch $@

study: $(VENV)/.installed
	$(VENV)/bin/normdrop study $(STUDY_ARGS)

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check normdrop tests benchmarks
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check normdrop tests benchmarks
	$(VENV)/bin/ruff format --check normdrop tests benchmarks

bench: $(VENV)/.installed
	$(VENV)/bin/normdrop bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
