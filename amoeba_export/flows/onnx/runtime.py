"""The ONNX-flow profiler: times an exported `model.onnx` as ONNX Runtime (CPU EP) runs it.

What ships is what was timed: the graph `build` optimised offline (`model.opt.onnx`) when it is
there, else `model.onnx`, through the same step function the exporter's `load` uses
(`writer.step`; the KV cache stays in ORT's buffers between steps). The
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

import numpy as np

from amoeba_export.errors import UserError
from amoeba_export.shared_types import Workload
from profilers.timing import resolve_threads

from ..base import Opened
from . import writer as exporter


def load_artifact(path: str | Path, threads: int | None = None):
    """(session, onnx_config, the graph file timed) for an exported ONNX-flow directory."""
    path = Path(path)
    config = exporter.read_config(path)
    model_file = exporter.artifact_model(path)
    return exporter.session(model_file, threads), config, model_file


class Steps:
    """ORT's KV-cache buffers between steps. A step never writes into its input cache, so the cache
    right after the prompt stays valid: rewinding to it is free (and the only place besides 0 that
    the timing loop rewinds to)."""

    def __init__(self, sess, config: dict, batch: int):
        self.sess, self.empty = sess, exporter.empty_past(config, batch)
        self.past, self.prompt = self.empty, (0, self.empty)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits, self.past = exporter.step(self.sess, ids, self.past)
        if self.prompt[1] is self.empty:
            self.prompt = (ids.shape[1], self.past)
        return exporter.next_token(logits)

    def decode(self, token: np.ndarray) -> np.ndarray:
        logits, self.past = exporter.step(self.sess, token, self.past)
        return exporter.next_token(logits)

    def rewind(self, length: int) -> None:
        if length == 0:
            self.past, self.prompt = self.empty, (0, self.empty)
        elif length == self.prompt[0]:
            self.past = self.prompt[1]
        else:
            raise ValueError(f"the onnx runtime rewinds to 0 or to the prompt ({self.prompt[0]}), not {length}")


def open(path: str | Path, workload: Workload, metrics: tuple[str, ...] | None = None, *, threads: int | None = None,
         seed: int = 0, device: str = "cpu") -> Opened:
    """The shipped graph in an ORT session pinned to `threads` intra-op threads."""
    import onnxruntime as ort

    if device != "cpu":
        raise UserError(f"the onnx profiler times the CPU, not {device}")
    n = resolve_threads(threads)
    sess, config, model_file = load_artifact(Path(path), n)
    metrics, _ = workload.timed(metrics, config.get("max_position_embeddings"), "max_position_embeddings")
    runtime = {
        "flow": "onnx", "device": "cpu", "provider": sess.get_providers()[0], "onnxruntime": ort.__version__,
        "model_file": model_file.name, "dtype": config["dtype"], "threads": n, "ort_intra_op_threads": n,
        "inter_op_threads": 1, "execution_mode": "sequential",
        "graph_optimization_level": sess.get_session_options().graph_optimization_level.name,
        "logits": "every position (prefill runs the LM head over the whole prompt)", "seed": seed,
    }
    return Opened(Steps(sess, config, workload.batch), workload.prompt_ids(config["vocab_size"], seed), runtime, n,
                  metrics)
