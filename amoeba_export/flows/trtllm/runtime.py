"""The TensorRT-LLM profiler: runs on the device, where TensorRT-LLM is installed (never here, never in CI).

`amoeba-export profile --target a5000 --flow trtllm`, run on the A5000 (or the Jetson, for
jetson-orin), exports each shape, runs its `build.sh` (trtllm-build, or nothing for the 1.x PyTorch
backend) and times what was built:

- an engine (`engine/`, from trtllm-build: <= 1.2, or v0.12.0-jetson) through
  `tensorrt_llm.runtime.ModelRunner`;
- else the HF directory itself through the 1.x LLM API (`LLM(model=dir)`, PyTorch backend).

Both run whole requests, so TTFT is a one-token request and TPOT is derived from a `gen_len`-token
request (`timing.time_requests`). Requests run `batch` copies of a seeded random prompt, greedy,
with end-of-sequence ignored so every request generates exactly the tokens asked for. Generation
returns only when the GPU is done, and CUDA is synchronised around every sample as well.

The TensorRT-LLM calls follow its documented APIs (ModelRunner.generate, LLM.generate with
SamplingParams(ignore_eos=True)); they are not run on this project's CI machines [belief until
run on a device].
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from amoeba_export.errors import UserError
from amoeba_export.io import read_json
from amoeba_export.shared_types import Workload
from profilers.timing import environment, profile_record, time_requests


def unavailable() -> str | None:
    """Why this machine cannot run the profiler, or None."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM (the tensorrt_llm package) is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def engine_runner(engine_dir: Path, ids: list[list[int]]):
    """run(n) for an engine built by trtllm-build."""
    import torch
    from tensorrt_llm.runtime import ModelRunner

    runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
    batch = [torch.tensor(x, dtype=torch.int32) for x in ids]

    def run(n: int):
        with torch.inference_mode():
            out = runner.generate(batch, max_new_tokens=n, end_id=-1, pad_id=0, temperature=1.0, top_k=1)
        torch.cuda.synchronize()
        return out

    return run, {"runtime": "tensorrt_llm.runtime.ModelRunner", "engine": str(engine_dir)}


def llm_api_runner(hf_dir: Path, ids: list[list[int]]):
    """run(n) for the HF directory through the 1.x LLM API (PyTorch backend)."""
    import torch
    from tensorrt_llm import LLM, SamplingParams

    llm = LLM(model=str(hf_dir))

    def run(n: int):
        out = llm.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0), use_tqdm=False)
        torch.cuda.synchronize()
        return out

    return run, {"runtime": "tensorrt_llm.LLM (PyTorch backend)", "model": str(hf_dir)}


def profile(path: str | Path, workload: Workload, *, threads: int | None = None, seed: int = 0,
                     metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict:
    """Time the artifact's engine (or its HF directory on 1.x); the same record as the other profilers."""
    reason = unavailable()
    if reason:
        raise UserError(f"the trtllm profiler runs on the device: {reason}")
    import tensorrt_llm

    path = Path(path)
    config = read_json(path / "config.json")
    metrics, _ = workload.timed(metrics, config.get("max_position_embeddings"), "max_position_embeddings")
    ids = workload.prompt_ids(config["vocab_size"], seed).tolist()
    engine = path / "engine"
    run, runtime = (engine_runner(engine, ids) if (engine / "config.json").is_file() else llm_api_runner(path, ids))
    env = environment(threads)
    timings = time_requests(run, workload, metrics, **measure_kwargs)
    runtime.update(flow="trtllm", device="cuda", tensorrt_llm=tensorrt_llm.__version__, seed=seed,
                   tpot="derived from whole requests (timing.time_requests)")
    return profile_record(path, workload, timings, env, runtime, measure_kwargs)
