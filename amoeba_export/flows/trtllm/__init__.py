"""The TensorRT-LLM flow: an HF directory plus a TensorRT-LLM checkpoint, and `build.sh` that builds
the engine on the device; verified here by a NumPy forward that reads the checkpoint by its names."""
from ..base import Flow
from . import runtime, writer

FLOW = Flow(name=writer.NAME, caps=writer.CAPS, emit=writer.emit, load=writer.load, build=writer.build,
            script=writer.script, tolerance=writer.TOLERANCE, profile=runtime.profile,
            unavailable=runtime.unavailable, devices=("cuda",), times_build=True)
