"""Profilers: the timing discipline (`timing`), what is timed (`workload`), and one profiler per
flow runtime (`pytorch`: the exported HF directory under transformers). Profilers time what the
exporters emit: what ships is what was timed."""
