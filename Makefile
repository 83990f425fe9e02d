# Two commands set up and use normdrop on a fresh machine: `make study` and `make test`.
# Both are idempotent: the venv is (re)installed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STUDY_ARGS ?=

.PHONY: study test lint bench clean fastpath

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev,ray]'
	touch $@

# The C++ fast path for small layers (normdrop/nn/kernels/fastpath.py): built once per source version, ~30 s;
# a no-op check afterwards. Without a C++ compiler normdrop still works (slower on small layers), so only the
# tests insist on it.
fastpath: $(VENV)/.installed
	-$(VENV)/bin/normdrop build-fastpath

study: $(VENV)/.installed fastpath
	$(VENV)/bin/normdrop study $(STUDY_ARGS)

test: $(VENV)/.installed-dev fastpath
	$(VENV)/bin/ruff check normdrop tests benchmarks
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check normdrop tests benchmarks
	$(VENV)/bin/ruff format --check normdrop tests benchmarks

bench: $(VENV)/.installed fastpath
	$(VENV)/bin/normdrop bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
