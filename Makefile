# Quick start: `make demo` (main job) and `make test` (whole suite). Both set up .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

# A usable venv has a pip that runs; a dangling link or a half-made folder is made anew.
# Bytecode: pip compiles the ~18,000 files of the dependencies one by one (~2 minutes of a
# fresh set-up); compileall does it on every core. (Not left to first use: with
# PYTHONDONTWRITEBYTECODE=1, as on this project's machines, nothing would ever be cached.)
$(STAMP): pyproject.toml constraints-cpu.txt
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
		echo "setting up $(VENV)"; rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints-cpu.txt -e ".[dev,track,data,eval,onnx]"
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_path('purelib'))") >/dev/null || true
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rim demo --out runs/demo

# One pytest worker per core (pytest-xdist), a test file per worker so that a module's
# trained fixture is built once; most of the suite's time is process start-up and tiny
# training runs, which one core each does as fast as two.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
