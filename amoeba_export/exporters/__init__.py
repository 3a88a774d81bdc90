"""One exporter per flow, each a module with the same small interface:

- `NAME`: the flow name used on the command line;
- `emit(dense, out_dir, tokenizer_dir) -> list[str]`: write the flow's artifact into `out_dir`;
- `load(out_dir)`: load the artifact with the flow's own runtime and return a logits function
  (`input_ids [B, T] -> logits [B, T, V]`), used by verify.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import UserError
from . import pytorch

EXPORTERS: dict[str, ModuleType] = {m.NAME: m for m in (pytorch,)}


def get_exporter(flow: str) -> ModuleType:
    if flow not in EXPORTERS:
        raise UserError(f"unknown flow {flow!r}: choose one of {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[flow]
