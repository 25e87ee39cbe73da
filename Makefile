# Two commands do all the set-up (see README): `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONWARNINGS ?= ignore::UserWarning:nbformat,ignore::DeprecationWarning

.PHONY: install demo test test-slow check nbtest pytest docs docs-current readme chromium clean

# A virtual environment with the package (editable) and its dev tools, at the versions in constraints.txt.
$(STAMP): setup.py settings.ini constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/howfar demo

# Debian's Chromium, for the docs-site browser check (installed once, if missing).
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# The package is what nbdev_export makes from the notebooks, the notebooks are clean, README is current.
check: $(STAMP)
	$(BIN)/python tools/check_sync.py
	$(BIN)/ruff check --quiet transformers_howfar && echo "ruff: exported code clean (pyflakes)"

# Tests compile many small programs and run each briefly: at LLVM's lowest optimisation level a Reformer gradient compiled
# in 3.6 s instead of 16 s, and pytest took 8 min instead of 14-16.
# Compiled programs are kept in build/jax-cache (JAX's persistent compilation cache), so processes of one run, and later
# runs, reuse what another compiled: a warm cache took the Reformer notebook's checks from 44 s to 16 s.
TEST_XLA := XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" JAX_COMPILATION_CACHE_DIR=$(CURDIR)/build/jax-cache \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

nbtest: $(STAMP)
	$(TEST_XLA) $(BIN)/nbdev_test --n_workers 2

docs: $(STAMP)
	$(BIN)/python tools/build_docs.py

# In a git checkout, the committed site must be what the notebooks build (the site is served as-is).
docs-current:
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  if [ -n "$$(git status --porcelain -- docs)" ]; then git status --short -- docs | head -20; \
	    echo "out of sync: docs/ differs from what the notebooks build: run make docs and commit docs/"; exit 1; \
	  else echo "docs/ is current"; fi; fi

readme: $(STAMP)
	$(BIN)/python tools/make_readme.py

PYTEST := $(TEST_XLA) $(BIN)/python -m pytest tests/ -q -p no:cacheprovider -n 2 --dist loadgroup --durations=15

pytest: $(STAMP) chromium
	$(PYTEST) -m "not slow"

# The slow tier (see tests/conftest.py): end-to-end command-line runs, simulated devices, long sweeps. CI runs it too.
test-slow: $(STAMP)
	$(PYTEST) -m slow

test: $(STAMP) chromium
	$(MAKE) --no-print-directory check
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory docs
	$(MAKE) --no-print-directory docs-current
	$(MAKE) --no-print-directory pytest

clean:
	rm -rf _proc build demo_output .pytest_cache
