"""The ONNX flow: `model.onnx` with the KV cache as inputs and outputs, run by ONNX Runtime; the build
bakes ORT's graph optimisations into `model.opt.onnx`, which verify and the timing run."""
from ..base import Flow
from . import runtime, writer

FLOW = Flow(name=writer.NAME, caps=writer.CAPS, emit=writer.emit, load=writer.load, build=writer.build,
            tolerance=writer.TOLERANCE, open=runtime.open, times_build=True,
            profile_emit={"genai": False})  # the GenAI folder is not what is timed
