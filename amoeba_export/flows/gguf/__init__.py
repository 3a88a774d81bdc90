"""The llama.cpp flow: `model.gguf` (arch `llama`, or `deci` for per-layer sizes), run by llama.cpp;
the build quantises to K-quants with llama.cpp's own quantiser."""
from ..base import Flow
from . import runtime, writer

FLOW = Flow(name=writer.NAME, caps=writer.CAPS, emit=writer.emit, load=writer.load, build=writer.build,
            tolerance=writer.TOLERANCE, open=runtime.open,
            times_build=True)  # K-quants exist only after the build
