# Two commands on a fresh machine: `make demo` and `make test`. Each builds what it needs.
#
# `make test` runs the suite and the doctests twice, so CI covers both ends of what we support:
#   .venv      Python 3.11 (PY) with the declared floor pinned by .ci/floor.txt (jax 0.10.2, ...)
#   .venv-new  Python >= 3.12 (PY_NEW) with the newest releases (what a fresh `pip install` gets)
# `make test-floor` / `make test-new` run one of them. The notebooks (nbmake) run once, in the floor.

# Interpreters (override on the command line: `make test PY_NEW=/path/to/python3.12`).
# The floor: Python 3.11 (jax 0.10.2 is the newest jax it gets), else python3.
ifeq ($(origin PY),undefined)
PY := $(or $(shell sh .ci/find_python.sh 3.11),python3)
endif
# The newest jax: Python 3.12, else 3.13 (on PATH or under pyenv); `make test` fails without one.
ifeq ($(origin PY_NEW),undefined)
PY_NEW := $(shell sh .ci/find_python.sh 3.12 3.13)
endif

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV_NEW := .venv-new
BIN_NEW := $(VENV_NEW)/bin
STAMP_NEW := $(VENV_NEW)/.installed
FLOOR := .ci/floor.txt
PYTEST_ARGS ?= -n 2 -q --durations=10

.PHONY: demo test test-floor test-new bench lint install clean

$(STAMP): pyproject.toml $(FLOOR)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(FLOOR) -e ".[dev]"
	$(BIN)/python -c 'import sys, jax; print(f"$(VENV): Python {sys.version.split()[0]}, jax {jax.__version__} (floor)")'
	touch $@

$(STAMP_NEW): pyproject.toml
	@if [ -z "$(PY_NEW)" ] || ! "$(PY_NEW)" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
	  echo "*** make: no working Python >= 3.12 found (PY_NEW='$(PY_NEW)')." >&2; \
	  echo "*** The newest-jax suite needs one: install python3.12 or python3.13," >&2; \
	  echo "*** or run make with PY_NEW=/path/to/python3.12." >&2; \
	  exit 1; \
	fi
	test -x $(BIN_NEW)/python || "$(PY_NEW)" -m venv $(VENV_NEW)
	echo '*' > $(VENV_NEW)/.gitignore
	$(BIN_NEW)/python -m pip install -q --upgrade pip
	$(BIN_NEW)/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(BIN_NEW)/python -c 'import sys, jax; print(f"$(VENV_NEW): Python {sys.version.split()[0]}, jax {jax.__version__} (newest)")'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxslim demo

test: test-floor test-new

test-floor: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests
	$(BIN)/python -m pytest -q --doctest-modules jaxslim
	$(BIN)/python -m pytest $(PYTEST_ARGS) --nbmake notebooks

test-new: $(STAMP_NEW)
	$(BIN_NEW)/python -m pytest $(PYTEST_ARGS) tests
	$(BIN_NEW)/python -m pytest -q --doctest-modules jaxslim

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check jaxslim tests benchmarks
	$(BIN)/ruff format --check jaxslim tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_NEW) .pytest_cache .hypothesis
