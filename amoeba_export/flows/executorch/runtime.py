"""The ExecuTorch runtime: `model.pte` through the ExecuTorch Python runtime (the portable runtime
with the XNNPACK delegate), for verify (`load`) and for timing (`open`).

The program keeps its KV cache in its own mutable buffers, so a call says only where its tokens go
(`cache_position`); the cache is never passed in or out. Rewinding is setting the next position back:
the attention mask of a static cache hides every slot at or after the position being written, so
stale slots are never read (docs/flow-executorch.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UserError
from ...io import read_json
from ...manifest import package_versions
from ...shared_types import Workload
from ..base import Opened
from .module import load_custom_ops
from .writer import CONFIG_FILE, METHOD, MODEL_FILE


def read_config(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_FILE).is_file() or not (out_dir / MODEL_FILE).is_file():
        raise UserError(f"{out_dir}: not an exported ExecuTorch-flow directory (no {CONFIG_FILE} / {MODEL_FILE}); "
                        "export one with `amoeba-export --flow executorch --out DIR`")
    return read_json(out_dir / CONFIG_FILE)


def method(out_dir: Path, threads: int = 1):
    """The program's `forward`, its delegate's threadpool set to `threads` (process-wide)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    load_custom_ops()  # the program calls llama::update_cache / llama::custom_sdpa by name
    _unsafe_reset_threadpool(threads)
    return Runtime.get().load_program(str(Path(out_dir) / MODEL_FILE)).load_method(METHOD)


@dataclass
class CacheSteps:
    """`Steps` over the program: `position` is the next cache slot a call writes."""

    forward: object  # executorch.runtime.Method
    max_cache_len: int
    position: int = 0

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of `ids` [B, T] written at the next T slots."""
        T = ids.shape[1]
        if self.position + T > self.max_cache_len:
            raise UserError(f"the ExecuTorch program's KV cache holds {self.max_cache_len} positions; {self.position} "
                            f"are filled and {T} more were asked for: export with a longer --prompt-len / --gen-len")
        cache_position = torch.arange(self.position, self.position + T, dtype=torch.long)
        out = self.forward.execute([ids.to(torch.long).contiguous(), cache_position])[0]
        self.position += T
        return out

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return next_token(self.run(ids))

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return next_token(self.run(token))

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.position:
            raise ValueError(f"cannot rewind to {length}: {self.position} positions are cached")
        self.position = length


def next_token(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice from the last position: `[batch, 1]` ids."""
    return logits[:, -1, :].argmax(-1)[:, None]


def load(out_dir: Path):
    """The program as a logits function for verify: `ids [B, T] -> logits [B, T, V]` (float32),
    each sequence prefilled from an empty cache in one call. The program has a fixed batch (the
    workload's); `ids` go through it in groups of that many rows, the last group padded with
    copies of its last row."""
    config = read_config(out_dir)
    steps = CacheSteps(method(out_dir, 1), config["max_cache_len"])
    batch = config["batch_size"]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, ids.shape[0], batch):
            rows = ids[start:start + batch]
            n = rows.shape[0]
            if n < batch:
                rows = torch.cat([rows, rows[-1:].expand(batch - n, -1)])
            steps.rewind(0)
            out.append(steps.run(rows)[:n].float().clone())  # the output is the program's buffer
        return torch.cat(out)

    return logits


def open(out_dir: Path, workload: Workload, metrics: tuple[str, ...] | None = None, *, threads: int | None = None,
         seed: int = 0, device: str = "cpu") -> Opened:
    """The program opened for `profilers.timing.time_steps`: the workload's prompt as a tensor, the
    delegate pinned to `threads` (default: physical cores)."""
    from profilers.timing import resolve_threads

    if device != "cpu":
        raise UserError(f"the executorch profiler times the XNNPACK delegate on the CPU, not {device}")
    config = read_config(out_dir)
    if workload.batch != config["batch_size"]:
        raise UserError(f"{out_dir}: the ExecuTorch program runs batch {config['batch_size']}, the workload asks for "
                        f"{workload.batch}: export with --batch {workload.batch}")
    # what is timed must fit the cache (a decode past it is refused by CacheSteps.run)
    metrics, _ = workload.timed(metrics, config["max_cache_len"], "KV cache length (fixed at export: re-export)")
    n = resolve_threads(threads)
    steps = CacheSteps(method(out_dir, n), config["max_cache_len"])
    ids = torch.from_numpy(workload.prompt_ids(config["vocab_size"], seed))
    runtime = {
        "flow": "executorch", "device": "cpu", "backend": config.get("backend", "XnnpackBackend"),
        **package_versions(("executorch",)), "program": MODEL_FILE, "method": METHOD, "dtype": config["dtype"],
        "threads": n, "max_cache_len": config["max_cache_len"], "batch_size": config["batch_size"],
        "logits": "every position (prefill runs the LM head over the whole prompt)", "seed": seed,
    }
    return Opened(steps=steps, ids=ids, runtime=runtime, threads=n, metrics=metrics)
