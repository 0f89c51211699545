# The two commands of the README: `make run` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-all setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fleetlearn run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m '' $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
