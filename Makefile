# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxslim demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests
	$(BIN)/python -m pytest -q --doctest-modules jaxslim

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check jaxslim tests benchmarks
	$(BIN)/ruff format --check jaxslim tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
