#!/usr/bin/env bash
# The flows' own converters, for benchmarks/flow_vs_standard.py: each in its own venv under the
# amoeba-export cache, because their pins clash with the project's (optimum-intel 2.2.0 wants
# transformers<5.6, optimum-executorch 1.1.0 pins transformers==5.0.0rc1).
#
#   <cache>/standard/optimum-intel/      optimum-cli export openvino
#   <cache>/standard/optimum-executorch/ optimum-cli export executorch
#   <cache>/standard/llama.cpp/          llama.cpp's convert_hf_to_gguf.py (+ its gguf-py), from the
#                                        llama-cpp-python sdist the project's wheel was built from
#
# Idempotent: a part whose stamp file names the same packages is skipped. Each venv takes a few
# minutes and about 1.6-1.7 GB (torch). <cache> is $AMOEBA_EXPORT_CACHE or ~/.cache/amoeba-export.
# Usage: scripts/setup-standard-tools.sh [openvino] [executorch] [gguf]   (default: all three)
set -euo pipefail

CACHE="${AMOEBA_EXPORT_CACHE:-$HOME/.cache/amoeba-export}"
ROOT="$CACHE/standard"
PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON=0.3.36  # the version of the project's llama-cpp-python (requirements.lock)
mkdir -p "$ROOT"

# venv NAME PACKAGE...: a venv at $ROOT/NAME holding PACKAGE... (torch's CPU wheel where pip's
# find-links offer it; PyPI's linux torch is the CUDA build, which works too, only larger)
venv() {
    local name=$1; shift
    local dir="$ROOT/$name" want="$*"
    if [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$want" ]]; then
        echo "$name: ready ($dir)"
        return
    fi
    echo "$name: installing $want into $dir (a few minutes, ~1.7 GB)"
    local t0=$SECONDS
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install --quiet "$@"
    # optimum pulls torchvision, whose wheel may not match this torch ("torchvision::nms does not
    # exist" on import); nothing here needs it
    "$dir/bin/pip" uninstall --quiet -y torchvision 2>/dev/null || true
    echo "$want" > "$dir/.installed"
    echo "$name: installed in $((SECONDS - t0)) s"
}

# the llama.cpp sources the llama-cpp-python wheel vendors: convert_hf_to_gguf.py and gguf-py
llama_cpp() {
    local dir="$ROOT/llama.cpp"
    if [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$LLAMA_CPP_PYTHON" ]]; then
        echo "llama.cpp: ready ($dir/convert_hf_to_gguf.py)"
        return
    fi
    echo "llama.cpp: fetching the llama-cpp-python==$LLAMA_CPP_PYTHON sdist for convert_hf_to_gguf.py"
    local tmp
    tmp=$(mktemp -d)
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$dir"
    mkdir -p "$dir"
    local src=("$tmp"/llama_cpp_python-*/vendor/llama.cpp)
    cp -r "$src/convert_hf_to_gguf.py" "$src/gguf-py" "$dir/"
    [[ -d "$src/conversion" ]] && cp -r "$src/conversion" "$dir/"  # newer llama.cpp splits the converter
    rm -rf "$tmp"
    echo "$LLAMA_CPP_PYTHON" > "$dir/.installed"
    echo "llama.cpp: ready ($dir/convert_hf_to_gguf.py)"
}

parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(gguf openvino executorch)
for part in "${parts[@]}"; do
    case "$part" in
        gguf) llama_cpp ;;
        openvino) venv optimum-intel torch==2.13.0 openvino==2026.4.1 optimum-intel==2.2.0 ;;
        executorch) venv optimum-executorch torch==2.13.0 executorch==1.5.1 optimum-executorch==1.1.0 ;;
        *) echo "unknown part $part: choose gguf, openvino, executorch" >&2; exit 2 ;;
    esac
done
