# Two commands: `make serve` (set up, then serve a model) and `make test` (set up, then run every test).
PYTHON ?= python3
VENV ?= .venv
MODEL ?= BAAI/bge-reranker-v2-m3
# CPU build by default; on a GPU host use e.g. TORCH_SPEC="torch==2.11.0" (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup serve test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

serve: setup
	$(BIN)/triton-rerank serve --model-path "$(MODEL)" $(SERVE_ARGS)

# Offline demo: a tiny random-weight model (meaningless scores), no download.
demo: setup
	$(BIN)/triton-rerank make-test-model build/demo-model --arch xlm-roberta
	$(BIN)/triton-rerank serve --model-path build/demo-model $(SERVE_ARGS)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build .pytest_cache
