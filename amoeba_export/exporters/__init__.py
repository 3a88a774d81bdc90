"""One exporter per flow, each a module with the same small interface:

- `NAME`: the flow name used on the command line;
- `CAPS`: the `FlowCaps` of its runtime (what legalize must make the shape fit);
- `emit(dense, out_dir, tokenizer_dir, quant=None, workload=None) -> list[str]`: write the flow's
  artifact into `out_dir` (`quant`: the flow's own format where it is not a float dtype; `workload`:
  what the artifact is sized for, where the format records it, e.g. MLC's context and prefill sizes);
- `build(out_dir, target, quant=None) -> dict`: the engine build that runs here (AOT package,
  optimised graph, llama.cpp quantisation), returning what was built with which toolchain;
- `load(out_dir)`: load the artifact with the flow's own runtime and return a logits function
  (`input_ids [B, T] -> logits [B, T, V]`), used by verify;
- optionally `TOLERANCE`: verify's parity limit per dtype where the runtime computes differently;
- optionally `script(out_dir, target, quant=None, workload=None) -> list[str]`: for flows whose
  toolchain lives on the device (TensorRT-LLM, MLC-LLM), write `build.sh` for the target; their
  `build` runs it when the toolchain is on PATH and otherwise says what to run on the device.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import UserError
from . import gguf, mlc, onnx, pytorch, trtllm

EXPORTERS: dict[str, ModuleType] = {m.NAME: m for m in (pytorch, onnx, gguf, trtllm, mlc)}


def write_artifact(exporter: ModuleType, dense, out_dir: Path, tokenizer_dir: Path, target: dict, *,
                   quant: str | None, workload, build: bool = True, **emit_options) -> tuple[list[str], dict | None]:
    """emit, the device's build script where the flow has one, and (with `build`) the engine build:
    what the compile ships and what a profiler times. (files written, the build record or None)."""
    files = exporter.emit(dense, out_dir, tokenizer_dir, quant=quant, workload=workload, **emit_options)
    if hasattr(exporter, "script"):  # written whether or not the build runs here
        files += exporter.script(out_dir, target, quant=quant, workload=workload)
    built = exporter.build(out_dir, target, quant=quant) if build and hasattr(exporter, "build") else None
    return files, built


def get_exporter(flow: str) -> ModuleType:
    if flow not in EXPORTERS:
        raise UserError(f"unknown flow {flow!r}: choose one of {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[flow]
