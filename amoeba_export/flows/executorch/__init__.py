"""The ExecuTorch flow: `model.pte` lowered to XNNPACK, KV cache inside the program, run by the
ExecuTorch Python runtime (docs/flow-executorch.md)."""
from __future__ import annotations

from ..base import Flow
from . import runtime, writer


def unavailable() -> str | None:
    """Why this machine cannot run the program (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        return "executorch is not installed (pip install executorch)"
    return None


FLOW = Flow(
    name=writer.NAME,
    caps=writer.CAPS,
    emit=writer.emit,
    load=runtime.load,
    open=runtime.open,
    unavailable=unavailable,
    # verify's limit on the real model (XNNPACK's kernels sum in another order: see docs/flow-executorch.md §5)
    tolerance={"float32": 5e-4},
    devices=("cpu",),
)

__all__ = ["FLOW"]
