"""The MLC-LLM profiler: runs on the device, where MLC-LLM is installed (never here, never in CI).

`amoeba-export profile --target jetson-orin --flow mlc`, run on the Jetson, exports each shape,
runs its `build.sh` (`mlc_llm compile` for the device) and times the compiled library with the
weights through `mlc_llm.MLCEngine`. The engine serves whole requests, so TTFT is a one-token
request and TPOT is derived from a `gen_len`-token request (`timing.time_requests`). Prompts are
seeded random token ids; end-of-sequence is ignored (MLC's `debug_config`) so every request
generates exactly the tokens asked for. Batch 1: one request at a time.

The MLC calls follow its documented Python API (MLCEngine, completions.create with a token-id
prompt); they are not run on this project's CI machines [belief until run on a device].
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from amoeba_export.errors import UserError
from amoeba_export.io import read_json
from amoeba_export.shared_types import Workload
from profilers.timing import environment, profile_record, time_requests

LIB_SUFFIXES = (".so", ".dylib", ".tar", ".wasm")


def unavailable() -> str | None:
    """Why this machine cannot run the profiler, or None."""
    if importlib.util.find_spec("mlc_llm") is None:
        return "MLC-LLM (the mlc_llm package) is not installed here"
    return None


def model_lib(path: Path) -> Path:
    libs = sorted(p for p in (path / "lib").glob("*") if p.suffix in LIB_SUFFIXES)
    if not libs:
        raise UserError(f"{path}: no compiled library in lib/: run `bash build.sh` there first")
    return libs[0]


def profile(path: str | Path, workload: Workload, *, threads: int | None = None, seed: int = 0,
                     metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict:
    """Time the compiled library with the artifact's weights; the same record as the other profilers."""
    reason = unavailable()
    if reason:
        raise UserError(f"the mlc profiler runs on the device: {reason}")
    if workload.batch != 1:
        raise UserError(f"the mlc profiler times batch 1 (one request at a time); got batch {workload.batch}")
    import mlc_llm
    from mlc_llm import MLCEngine

    path = Path(path)
    config = read_json(path / "mlc-chat-config.json")
    metrics, _ = workload.timed(metrics, config.get("context_window_size"), "context_window_size")
    ids = workload.prompt_ids(config["vocab_size"], seed)[0].tolist()
    lib = model_lib(path)
    engine = MLCEngine(model=str(path), model_lib=str(lib), mode="local")

    def run(n: int):
        return engine.completions.create(prompt=ids, max_tokens=n, stream=False,
                                         extra_body={"debug_config": {"ignore_eos": True}})

    env = environment(threads)
    try:
        timings = time_requests(run, workload, metrics, **measure_kwargs)
    finally:
        engine.terminate()
    runtime = {"flow": "mlc", "device": "gpu", "runtime": "mlc_llm.MLCEngine (mode local)", "model_lib": lib.name,
               "mlc_llm": getattr(mlc_llm, "__version__", None), "quantization": config.get("quantization"),
               "seed": seed, "tpot": "derived from whole requests (timing.time_requests)"}
    return profile_record(path, workload, timings, env, runtime, measure_kwargs)
