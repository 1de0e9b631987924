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

# ruff, and the architecture: import-linter's contracts in pyproject.toml (layers, no import circles).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build .pytest_cache

# Benchmarks (see README "Performance"). Infinity, the peer server, lives in its own venv.
INFVENV ?= build/infinity-venv
BENCH_ARGS ?=
.PHONY: bench bench-quick bench-peer-setup bench-cpu-peers-setup
# sentence-transformers on torch, ONNX Runtime and OpenVINO: `triton-rerank bench --contenders peers,...`
bench-cpu-peers-setup:
	$(PYTHON) -m venv build/cpu-peers-venv
	build/cpu-peers-venv/bin/pip install -q "torch==2.13.0"
	build/cpu-peers-venv/bin/pip install -q "sentence-transformers[onnx,openvino]" onnxruntime

bench-peer-setup:
	$(PYTHON) -m venv $(INFVENV)
	$(INFVENV)/bin/pip install -q "torch==2.13.0"
	$(INFVENV)/bin/pip install -q "infinity-emb[server,torch]==0.0.78"

bench: setup
	$(BIN)/triton-rerank bench --out results/cpu-minilm-l6 --repeat 3 --max-batch-tokens 4096 --dtype float32 \
	  --triton-variant delay=0,instances=1,threads=2 --infinity-python $(INFVENV)/bin/python $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/triton-rerank bench --quick --out build/bench-quick $(BENCH_ARGS)
