"""The OpenVINO flow: a stateful OpenVINO IR of the dense model, run by OpenVINO's CPU plugin
(docs/flow-openvino.md). `writer` emits it, `runtime` loads it for verify and opens it for timing."""
from __future__ import annotations

from ..base import Flow
from . import runtime, writer

# verify's limits: float32 measured within 5e-7 on the tiny models and ... on the default model;
# float16 and int8 measured against the float32 reference (docs/flow-openvino.md §5)
TOLERANCE = {"float32": 1e-4}

FLOW = Flow(name="openvino", caps=writer.CAPS, emit=writer.emit, load=runtime.load, open=runtime.open,
            tolerance=TOLERANCE, devices=("cpu",))
