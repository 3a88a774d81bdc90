"""The PyTorch flow: an HF directory (stock LlamaForCausalLM, or `amoeba_llama` for per-layer sizes)
run by transformers; the build AOT-compiles a package where a compiler is present."""
from ..base import Flow
from . import runtime, writer

FLOW = Flow(name=writer.NAME, caps=writer.CAPS, emit=writer.emit, load=writer.load, build=writer.build,
            open=runtime.open, devices=("cpu", "cuda"))  # the host times the CPU; a GPU target, on the device, CUDA
