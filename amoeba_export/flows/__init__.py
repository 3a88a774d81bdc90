"""The flows: one registered `Flow` per name (`base.Flow`), one folder per flow (writer, runtime).

A name from the command line or a matrix is resolved once, by `get_flow`; everything after takes the
`Flow` itself.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import executorch, gguf, mlc, onnx, openvino, pytorch, trtllm, vllm
from .base import Emitted, Flow

FLOWS: dict[str, Flow] = {m.FLOW.name: m.FLOW for m in (pytorch, onnx, gguf, trtllm, mlc, vllm, executorch,
                                                                  openvino)}


def get_flow(name: str) -> Flow:
    if name not in FLOWS:
        raise UserError(f"unknown flow {name!r}: choose one of {', '.join(FLOWS)}")
    return FLOWS[name]


def write_artifact(flow: Flow, dense, out_dir: Path, tokenizer_dir: Path, target: dict, *, quant: str | None,
                   workload, build: bool = True, **emit_options) -> tuple[Emitted, dict | None]:
    """emit, the device's build script where the flow has one, and (with `build`) the engine build:
    what the compile ships and what a profiler times. (what was emitted, the build record or None)."""
    emitted = flow.emit(dense, out_dir, tokenizer_dir, quant=quant, workload=workload, **emit_options)
    if flow.script is not None:  # written whether or not the build runs here
        emitted = Emitted(emitted.files + flow.script(out_dir, target, quant=quant, workload=workload), emitted.record)
    built = flow.build(out_dir, target, quant=quant) if build and flow.build is not None else None
    return emitted, built


__all__ = ["FLOWS", "Emitted", "Flow", "get_flow", "write_artifact"]
