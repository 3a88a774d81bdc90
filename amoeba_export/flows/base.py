"""What a flow is: one registered `Flow` object, and the step interface its CPU runtime offers.

A flow ties together what was once joined only by a name: the writer that emits the artifact, the
build that runs here or the script that runs on the device, the runtime that loads the artifact for
verify, and the runtime that is timed. `amoeba_export.flows.FLOWS` holds one per name; the command
line and the matrix resolve a name once (`get_flow`) and hand the object on.

Every CPU runtime is timed by one loop (`time_steps`) over three steps:
- `prefill(ids) -> token`: evaluate `ids` [batch, T] after what the cache holds; the greedy next token;
- `decode(token) -> token`: one step of one token per sequence;
- `rewind(length)`: drop every cached position from `length` on (0 empties the cache).
Runtimes that only serve whole requests (vLLM, TensorRT-LLM, MLC-LLM) use `timing.time_requests`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..shared_types import FlowCaps, Workload


@dataclass(frozen=True)
class Emitted:
    """What a writer wrote: the file names (relative to the artifact folder) and its record for the
    manifest (None where there is nothing to say beyond the files)."""

    files: list[str]
    record: dict | None = None


class Steps(Protocol):
    """A loaded artifact as its runtime steps it (see the module docstring)."""

    def prefill(self, ids) -> Any: ...

    def decode(self, token) -> Any: ...

    def rewind(self, length: int) -> None: ...


@dataclass(frozen=True)
class Opened:
    """A runtime opened for timing: its steps, the prompt in the form it takes, what the profile
    record says about the runtime, and the threads it was pinned to."""

    steps: Steps
    ids: Any
    runtime: dict
    threads: int
    metrics: tuple[str, ...]  # what is timed, checked against the artifact's context length
    measure: dict = field(default_factory=dict)  # options `timing.measure` needs here (a CUDA sync)
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Flow:
    """One inference flow. Writers, builds and runtimes are plain functions of the flow's package:

    - `emit(dense, out_dir, tokenizer_dir, quant=None, workload=None, **options) -> Emitted`;
    - `build(out_dir, target, quant=None) -> dict | None`: what was built here, with which toolchain;
    - `script(out_dir, target, quant=None, workload=None) -> list[str]`: the device's build script,
      for toolchains that live on the device;
    - `load(out_dir) -> logits_fn`: the artifact in the flow's own runtime, `ids [B, T] -> logits
      [B, T, V]` (a torch tensor), for verify;
    - `open(out_dir, workload, metrics, threads=, seed=, device=) -> Opened`: a runtime for `time_steps`, or
      `profile(out_dir, workload, threads=, seed=, metrics=, **measure) -> record` for a runtime
      timed its own way (whole requests, a device);
    - `unavailable() -> str | None`: why this machine cannot run the timed runtime.
    """

    name: str
    caps: FlowCaps
    emit: Callable[..., Emitted]
    load: Callable[[Path], Callable]
    tolerance: dict[str, float] = field(default_factory=dict)  # verify's limit per dtype, over the defaults
    build: Callable[..., dict | None] | None = None
    script: Callable[..., list[str]] | None = None
    open: Callable[..., Opened] | None = None
    profile: Callable[..., dict] | None = None
    unavailable: Callable[[], str | None] = lambda: None
    devices: tuple[str, ...] = ("cpu",)  # what its profiler times: "cpu" on the host, "cuda" on a GPU target
    times_build: bool = False  # the timed artifact is what `build` makes, so profiling builds first
    profile_emit: dict = field(default_factory=dict)  # emit options for an artifact made only to be timed

    def __str__(self) -> str:
        return self.name


__all__ = ["Emitted", "Flow", "FlowCaps", "Opened", "Steps", "Workload"]
