"""The OpenVINO flow's runtime: the stateful IR on OpenVINO's CPU plugin, for verify and for timing.

One infer request holds the KV cache as state; a call feeds `input_ids` only (the graph continues the
positions from the cached length), and `reset_state()` empties the cache.

- verify (`load`): every precision hint pinned to f32 (compute, KV cache) and no dynamic quantisation
  of activations, so the logits are those of the artifact's weights: the plugin's default u8 KV cache
  alone moves them by ~1e-3 (docs/flow-openvino.md §4);
- timing (`open`): the plugin's own defaults for precision (what optimum-intel and OpenVINO GenAI run
  unless told otherwise: u8 KV cache, int8 activations for int8 weights, bf16 compute on CPUs with
  AMX), one stream, the LATENCY hint and `threads` threads; the record says what the plugin chose.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from profilers.timing import resolve_threads

from ...errors import UserError
from ...io import read_json
from .writer import CONFIG_FILE, MODEL_FILE

DEVICE = "CPU"
EXACT_HINTS = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
TIMED_HINTS: dict = {}  # the plugin's defaults: what a user ships (docs/flow-openvino.md §4)
REPORTED = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
            "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "ENABLE_HYPER_THREADING")


def read_config(out_dir: Path) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{out_dir} is not an openvino-flow artifact: {CONFIG_FILE} is missing")
    return read_json(path)


def compile_model(out_dir: Path, threads: int = 1, hints: dict | None = None):
    """The artifact compiled for the CPU plugin: `threads` inference threads, one stream, `hints` over
    the plugin's defaults (None: EXACT_HINTS)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              **(EXACT_HINTS if hints is None else hints)}
    core = ov.Core()
    return core.compile_model(core.read_model(Path(out_dir) / MODEL_FILE), DEVICE, config)


def properties(compiled) -> dict:
    """What the plugin settled on (JSON-serialisable: element types as `f32`, enums by name)."""
    def plain(v):
        if hasattr(v, "to_string"):
            return v.to_string()
        return v if isinstance(v, (bool, int, float, str)) else getattr(v, "name", str(v))

    return {k: plain(compiled.get_property(k)) for k in REPORTED}


@dataclass
class OVSteps:
    """`Steps` over one stateful infer request; `forward` also returns the logits (tests and verify)."""

    request: object

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] of `ids` [B, S] after the cached positions; the cache grows by S."""
        self.request.infer({"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})
        return self.request.get_tensor("logits").data

    def cached(self) -> int:
        states = self.request.query_state()
        return int(states[0].state.shape[2]) if states else 0

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.forward(ids)[:, -1].argmax(-1)[:, None]

    def decode(self, token: np.ndarray) -> np.ndarray:
        return self.forward(token)[:, -1].argmax(-1)[:, None]

    def rewind(self, length: int) -> None:
        """Drop every cached position from `length` on: reset for 0, else cut each state tensor."""
        import openvino as ov

        if length == 0:
            self.request.reset_state()
            return
        for state in self.request.query_state():
            data = state.state.data
            if data.shape[2] < length:
                raise ValueError(f"cannot rewind to {length}: the cache holds {data.shape[2]} positions")
            if data.shape[2] > length:
                state.state = ov.Tensor(np.array(data[:, :, :length], copy=True))  # never a view of the old state


def load(out_dir: Path):
    """The artifact on OpenVINO's CPU plugin, one thread, exact hints: `ids [B, T] -> logits [B, T, V]`
    from an empty cache."""
    read_config(out_dir)
    steps = OVSteps(compile_model(out_dir).create_infer_request())

    def logits(ids: torch.Tensor) -> torch.Tensor:
        steps.rewind(0)
        return torch.from_numpy(steps.forward(ids.numpy()).copy())

    return logits


def open(out_dir: Path, workload, metrics: tuple[str, ...] | None = None, *, threads: int | None = None,
         seed: int = 0, device: str = "cpu"):
    """The artifact compiled as it ships (TIMED_HINTS), for `time_steps`."""
    import openvino as ov

    from ..base import Opened

    if device != "cpu":
        raise UserError(f"the openvino profiler times the CPU plugin, not {device}")
    threads = resolve_threads(threads)
    config = read_config(out_dir)
    metrics, _ = workload.timed(metrics, config.get("max_position_embeddings"), "max_position_embeddings")
    compiled = compile_model(out_dir, threads, TIMED_HINTS)
    steps = OVSteps(compiled.create_infer_request())
    runtime = {
        "flow": "openvino", "device": DEVICE, "openvino": ov.get_version(), "dtype": config["dtype"],
        "threads": threads, "hints": dict(TIMED_HINTS) or "plugin defaults", "properties": properties(compiled),
        "logits": "every position (prefill runs the LM head over the whole prompt)", "seed": seed,
    }
    return Opened(steps=steps, ids=workload.prompt_ids(config["vocab_size"], seed), runtime=runtime, threads=threads,
                  metrics=metrics)
