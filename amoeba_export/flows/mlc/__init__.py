"""The MLC-LLM flow: MLC's weight directory and chat config, and `build.sh` that compiles the model
library on the device; verified here by a NumPy forward that reads the weights by MLC's names."""
from ..base import Flow
from . import runtime, writer

FLOW = Flow(name=writer.NAME, caps=writer.CAPS, emit=writer.emit, load=writer.load, build=writer.build,
            script=writer.script, tolerance=writer.TOLERANCE, profile=runtime.profile,
            unavailable=runtime.unavailable, devices=("cuda",), times_build=True)
