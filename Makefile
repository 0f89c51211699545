# The two commands of the README: `make run` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray,postgres,lora]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fleetlearn run $(ARGS)

# Every test, the slow end-to-end ones included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The quick loop while developing: skips tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
