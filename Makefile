# refusal-edit: `make demo` sets up and runs the demo on the embedded default model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
DEMO_OUT ?= runs/demo

.PHONY: setup demo test mutants lint format bench clean archs archs-real real-tune

# torch first, pinned to the CPU build that resolves locally; everything else from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The demo is sized for ~15 min on 2 CPU cores: a shorter tune and smaller evaluation sets than the defaults
# (the README shows the full run's commands and figures). Its held-out judging keeps the default 96 prompts: at
# 48 the pick's margin can hardly show a tie, and on 2026-12-07 the demo picked the paper's edit itself (1 of 48
# held out against the bridge point's 2, gap -6.2 to +11.5 points: not within 8).
DEMO_TUNE ?= --trials 24 --confirm 3 --n-val 24
DEMO_EVAL ?= --n-test 20 --max-new-tokens 64

demo: setup
	$(BIN)/refusal-edit fetch $(DEMO_MODEL)
	$(BIN)/refusal-edit extract $(DEMO_MODEL) --out $(DEMO_OUT)/direction --force
	$(BIN)/refusal-edit tune $(DEMO_MODEL) --direction $(DEMO_OUT)/direction --out $(DEMO_OUT)/tune --force $(DEMO_TUNE)
	$(BIN)/refusal-edit orthogonalize $(DEMO_MODEL) --spec $(DEMO_OUT)/tune/front.json \
		--out $(DEMO_OUT)/abliterated --force
	$(BIN)/refusal-edit evaluate $(DEMO_MODEL) $(DEMO_OUT)/abliterated --out $(DEMO_OUT)/report --record --force $(DEMO_EVAL)

# llama-cpp-python (sdist only: one C++ build of ~3.5 min on 2 cores) is the real client the suite checks our GGUF
# files against: our K-quant quantizers bit for bit against ggml, our files through ggml's own reader. A required
# dependency of `make test`: a failed build fails it, and REFUSAL_EDIT_REQUIRE_LLAMACPP makes a missing `llama_cpp`
# a test failure rather than a skip. The wheel is built once into WHEELS (in $HOME: kept between fresh clones).
WHEELS ?= $(HOME)/.cache/refusal-edit/wheels
LLAMACPP := llama-cpp-python==0.3.36
$(VENV)/.llamacpp: $(VENV)/.installed
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip wheel -q --no-deps --find-links $(WHEELS) -w $(WHEELS) '$(LLAMACPP)'
	$(BIN)/python -m pip install -q --find-links $(WHEELS) '$(LLAMACPP)'
	touch $@

# One pytest-xdist worker per core, at most 4 (each holds its own torch): the tiny-model tests run one thread each,
# so a single process leaves CI's second core idle. Whole files per worker (`loadfile`; pytest 9 ignores xdist's
# `loadgroup` marks): the real-model file shares one extract of the demo model and starts first (tests/conftest.py).
# (sched_getaffinity is Linux's; macOS has only cpu_count.)
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; a = getattr(os, 'sched_getaffinity', None); print(min(4, len(a(0)) if a else os.cpu_count() or 1))")
test: setup $(VENV)/.llamacpp lint
	REFUSAL_EDIT_REQUIRE_LLAMACPP=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Planted bugs (tests/mutants.py) the suite must kill; `make test` runs the same list (tests/test_mutants.py).
mutants: setup
	$(BIN)/python tests/mutants.py

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

# A small tune on the demo model whose pick keeps its val refusal rate on test prompts: the real-model file is the
# critical path of `make test` under xdist, and this test was its longest part after extract (519 s under load).
real-tune: setup
	REFUSAL_EDIT_REAL_TUNE=1 $(BIN)/python -m pytest -q tests/test_real_model.py -k tuned_point

# The demo model, SmolLM2 and gemma-3-270m edited through the derived path give byte-identical checkpoints.
archs-real: setup
	REFUSAL_EDIT_DERIVE_REAL=1 $(BIN)/python -m pytest -q tests/test_derive_real.py

# The demo-model llama.cpp checks (pytest marker `llamacpp`: refusal rates of the edited GGUF and of control
# vectors, logits against transformers, the requantization bound, Gemma's stored 1 + w gain): 30-40 min on 2 cores,
# outside `make test`'s budget, so run here; the fast llama.cpp checks run in `make test`.
LLAMACPP_DIRECTION ?= runs/llamacpp/direction
.PHONY: llamacpp
llamacpp: setup $(VENV)/.llamacpp
	$(BIN)/refusal-edit fetch $(DEMO_MODEL)
	$(BIN)/refusal-edit fetch gemma-3-270m
	test -e $(LLAMACPP_DIRECTION) || $(BIN)/refusal-edit extract $(DEMO_MODEL) --out $(LLAMACPP_DIRECTION)
	REFUSAL_EDIT_DIRECTION=$(LLAMACPP_DIRECTION) $(BIN)/python -m pytest -q -s -m llamacpp tests/test_llamacpp.py
