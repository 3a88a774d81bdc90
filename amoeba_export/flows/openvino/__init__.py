"""The OpenVINO flow: a stateful OpenVINO IR of the dense model, run by OpenVINO's CPU plugin
(docs/flow-openvino.md). `writer` emits it, `runtime` loads it for verify and opens it for timing."""
from __future__ import annotations

from ..base import Flow
from . import runtime, writer

# verify's limit: float32 measured at 5e-7 on the tiny models, 8.1e-5 on SmolLM2-135M at 24x0.75;
# float16 keeps verify's default, int8 the top-5 floor of quantised formats (docs/flow-openvino.md §5)
TOLERANCE = {"float32": 1e-4}

FLOW = Flow(name="openvino", caps=writer.CAPS, emit=writer.emit, load=runtime.load, open=runtime.open,
            tolerance=TOLERANCE, devices=("cpu",))
