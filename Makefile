# refusal-edit: `make demo` sets up and runs the demo on the embedded default model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint format bench clean

# torch first, pinned to the CPU build that resolves locally; everything else from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/refusal-edit fetch $(DEMO_MODEL)
	$(BIN)/refusal-edit extract $(DEMO_MODEL) --out $(DEMO_OUT)/direction --force
	$(BIN)/refusal-edit orthogonalize $(DEMO_MODEL) --direction $(DEMO_OUT)/direction/direction.safetensors \
		--out $(DEMO_OUT)/abliterated --force
	$(BIN)/refusal-edit evaluate $(DEMO_MODEL) $(DEMO_OUT)/abliterated --out $(DEMO_OUT)/report --record

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check refusal_edit tests bench
	$(BIN)/ruff format --check refusal_edit tests bench

format: setup
	$(BIN)/ruff format refusal_edit tests bench
	$(BIN)/ruff check --fix refusal_edit tests bench

bench: setup
	$(BIN)/python bench/edit.py
	$(BIN)/python bench/select.py

clean:
	rm -rf $(VENV) runs .pytest_cache
