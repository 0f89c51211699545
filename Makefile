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

# Every test, the slow end-to-end ones included (what CI runs), on WORKERS pytest-xdist processes
# (the end-to-end tests spend much of their time waiting on processes and sockets; `worksteal`
# keeps both busy until the end). WORKERS=0 runs them in this one process.
WORKERS ?= 2
XDIST = $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist worksteal)

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

# The quick loop while developing: skips tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m 'not slow' $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
