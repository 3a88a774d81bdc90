"""The ONNX-flow profiler: times an exported `model.onnx` as ONNX Runtime (CPU EP) runs it.

What ships is what was timed: the graph `build` optimised offline (`model.opt.onnx`) when it is
there, else `model.onnx`, through the same step function the exporter's `load` uses
(`amoeba_export.exporters.onnx.step`; the KV cache stays in ORT's buffers between steps). The
session is pinned: `threads` intra-op threads (default: physical cores), one inter-op thread,
sequential execution. The three things a budget can bound:

- TTFT: the prefill of the `batch x prompt_len` prompt from an empty past, plus the argmax of the
  last position. The graph returns logits for every position (it is also the verify graph), so
  the LM head runs over the whole prompt; the record says so.
- TPOT: one decode step (one token) over a past of exactly `prompt_len` positions, plus its argmax.
  The prompt is prefilled once, untimed; every sample feeds that same past (a step never writes
  into its input cache), so each sample does the same work.
- E2E: a whole greedy request: prefill (the first token) then `gen_len - 1` decode steps.
"""
from __future__ import annotations

from pathlib import Path

from amoeba_export.exporters import onnx as exporter

from .timing import Timing, environment, measure, profile_record, resolve_threads
from .workload import Workload

FLOW = "onnx"
TIMES_BUILD = True  # the shipped artifact runs model.opt.onnx: time that
EMIT_OPTIONS = {"genai": False}  # the GenAI folder is not what this profiler times


def load_artifact(path: str | Path, threads: int | None = None):
    """(session, onnx_config, the graph file timed) for an exported ONNX-flow directory."""
    path = Path(path)
    config = exporter.read_config(path)
    model_file = exporter.artifact_model(path)
    return exporter.session(model_file, threads), config, model_file


def time_workload(sess, config: dict, workload: Workload, *, seed: int = 0,
                  metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict[str, Timing]:
    """Time `metrics` (default: ttft, tpot, and the workload's own metric). Returns {metric: Timing}, seconds."""
    metrics, _ = workload.timed(metrics, config.get("max_position_embeddings"), "max_position_embeddings")
    ids = workload.prompt_ids(config["vocab_size"], seed)
    empty = exporter.empty_past(config, workload.batch)
    out: dict[str, Timing] = {}
    for metric in metrics:
        if metric == "ttft":
            out[metric] = measure(lambda: exporter.next_token(exporter.step(sess, ids, empty)[0]), **measure_kwargs)
        elif metric == "tpot":
            logits, past = exporter.step(sess, ids, empty)
            token = exporter.next_token(logits)
            out[metric] = measure(lambda: exporter.next_token(exporter.step(sess, token, past)[0]), **measure_kwargs)
            del past
        else:
            out[metric] = measure(lambda: exporter.generate(sess, config, ids, workload.gen_len), **measure_kwargs)
    return out


def profile_artifact(path: str | Path, workload: Workload, *, threads: int | None = None, seed: int = 0,
                     metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict:
    """Load the artifact with pinned threads, record the environment, time the workload.

    Returns a JSON-serialisable record: {"workload", "timings": {metric: Timing fields},
    "environment", "artifact", "runtime", "measure"}.
    """
    import onnxruntime as ort

    n = resolve_threads(threads)
    path = Path(path)
    sess, config, model_file = load_artifact(path, n)
    env = environment(n)
    env["ort_intra_op_threads"] = n
    timings = time_workload(sess, config, workload, seed=seed, metrics=metrics, **measure_kwargs)
    runtime = {
        "flow": FLOW, "device": "cpu", "provider": sess.get_providers()[0], "onnxruntime": ort.__version__,
        "model_file": model_file.name, "dtype": config["dtype"], "threads": n, "inter_op_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization_level": sess.get_session_options().graph_optimization_level.name,
        "logits": "every position (prefill runs the LM head over the whole prompt)", "seed": seed,
    }
    record = profile_record(path, workload, timings, env, runtime, measure_kwargs)
    return record
