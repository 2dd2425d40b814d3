# Quick start: `make demo` (main job) and `make test` (whole suite). Both set up .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

# A usable venv has a pip that runs; a dangling link or a half-made folder is made anew.
# Bytecode: pip would compile all ~18,000 files of the dependencies (~2 minutes of a fresh
# set-up); instead what a command imports is compiled once, on first use, by running `make`'s
# commands with bytecode writing on: on machines that set PYTHONDONTWRITEBYTECODE=1, as this
# project's do, every `rim` process would otherwise compile torch and transformers from source.
# `make setup` compiles the ~3,600 modules a `rim` process imports (WARM) for later direct use.
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE
WARM := import rim.cli, rim.trainer, rim.evaluation, rim.sweep, rim.probe, accelerate, peft, \
	sklearn.linear_model, matplotlib.pyplot; \
	from transformers import LlamaForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast

$(STAMP): pyproject.toml constraints-cpu.txt
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
		echo "setting up $(VENV)"; rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints-cpu.txt -e ".[dev,track,data,eval,onnx]"
	touch $(STAMP)

setup: $(STAMP)
	$(WRITE_BYTECODE) $(BIN)/python -c "$(WARM)"

demo: $(STAMP)
	$(WRITE_BYTECODE) $(BIN)/rim demo --out runs/demo

# One pytest worker per core (pytest-xdist), a test file per worker so that a module's
# trained fixture is built once; most of the suite's time is process start-up and tiny
# training runs, which one core each does as fast as two. Files go out in collection order
# (tests/conftest.py puts the long ones first), not xdist's by-number-of-tests order.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(WRITE_BYTECODE) $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
