# refusal-edit: `make demo` sets up and runs the demo on the embedded default model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint format bench clean archs archs-real

# torch first, pinned to the CPU build that resolves locally; everything else from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The demo is sized for ~15 min on 2 CPU cores: a shorter tune and smaller evaluation sets than the defaults
# (the README shows the full run's commands and figures).
# --resolve-prompts 48: half of tune's held-out judging (~1 min less; the pick's rates resolve less finely).
DEMO_TUNE ?= --trials 24 --confirm 3 --n-val 24 --resolve-prompts 48
DEMO_EVAL ?= --n-test 20 --max-new-tokens 64

demo: setup
	$(BIN)/refusal-edit fetch $(DEMO_MODEL)
	$(BIN)/refusal-edit extract $(DEMO_MODEL) --out $(DEMO_OUT)/direction --force
	$(BIN)/refusal-edit tune $(DEMO_MODEL) --direction $(DEMO_OUT)/direction --out $(DEMO_OUT)/tune --force $(DEMO_TUNE)
	$(BIN)/refusal-edit orthogonalize $(DEMO_MODEL) --spec $(DEMO_OUT)/tune/front.json \
		--out $(DEMO_OUT)/abliterated --force
	$(BIN)/refusal-edit evaluate $(DEMO_MODEL) $(DEMO_OUT)/abliterated --out $(DEMO_OUT)/report --record --force $(DEMO_EVAL)

# llama-cpp-python (sdist only: one C++ build of ~3.5 min on 2 cores, then pip's wheel cache) lets the suite check
# our K-quant quantizers bit for bit against ggml and read our GGUF files with ggml's own reader. Best effort:
# without it those tests skip with the reason. The demo does not need it.
$(VENV)/.llamacpp: $(VENV)/.installed
	$(BIN)/python -m pip install -q --find-links $(WHEELS) 'llama-cpp-python==0.3.36' \
		|| echo "llama-cpp-python was not built: the llama.cpp checks will skip"
	touch $@

test: setup $(VENV)/.llamacpp lint
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check refusal_edit tests bench
	$(BIN)/ruff format --check refusal_edit tests bench

format: setup
	$(BIN)/ruff format refusal_edit tests bench
	$(BIN)/ruff check --fix refusal_edit tests bench

bench: setup
	$(BIN)/python bench/edit.py
	$(BIN)/python bench/selection.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Every causal-LM and image-text-to-text model type of the installed transformers: derived, verified, edited through
# the CLI (bench/archs.py; ~300 types, one forked child each with a time limit). `make test` runs a sample.
archs: setup
	$(BIN)/python bench/archs.py --out runs/archs.json

# The demo model, SmolLM2 and gemma-3-270m edited through the derived path give byte-identical checkpoints.
archs-real: setup
	REFUSAL_EDIT_DERIVE_REAL=1 $(BIN)/python -m pytest -q tests/test_derive_real.py

# GGUF edits and control vectors checked in llama.cpp itself (pytest marker `llamacpp`). Not part of `make test`:
# llama-cpp-python ships only an sdist whose C++ build takes minutes; the wheel is built once into WHEELS.
WHEELS ?= $(HOME)/.cache/refusal-edit/wheels
LLAMACPP_DIRECTION ?= runs/llamacpp/direction
.PHONY: llamacpp
llamacpp: setup
	$(BIN)/python -m pip wheel -q --no-deps --find-links $(WHEELS) -w $(WHEELS) llama-cpp-python==0.3.36
	$(BIN)/python -m pip install -q --find-links $(WHEELS) llama-cpp-python==0.3.36
	$(BIN)/refusal-edit fetch $(DEMO_MODEL)
	$(BIN)/refusal-edit fetch gemma-3-270m
	test -e $(LLAMACPP_DIRECTION) || $(BIN)/refusal-edit extract $(DEMO_MODEL) --out $(LLAMACPP_DIRECTION)
	REFUSAL_EDIT_DIRECTION=$(LLAMACPP_DIRECTION) $(BIN)/python -m pytest -q -s -m llamacpp tests/test_llamacpp.py
