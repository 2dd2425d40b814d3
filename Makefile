# Quick start: `make demo` (main job) and `make test` (whole suite). Both set up .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

# A usable venv has a pip that runs; a dangling link or a half-made folder is made anew.
$(STAMP): pyproject.toml constraints-cpu.txt
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
		echo "setting up $(VENV)"; rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[dev,track,data,eval,onnx]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rim demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
