"""`amoeba-export profile`: regenerate a latency table on the machine at hand.

Each measured shape is exported by the flow's own exporter into a temporary directory and timed by
the flow's profiler from there: what ships is what was timed. Measurements checkpoint one shape at
a time beside the table, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import os
from pathlib import Path

from amoeba_export.errors import UserError
from amoeba_export.flows import Flow, write_artifact
from amoeba_export.io import scratch_dir
from amoeba_export.materialize import materialize
from amoeba_export.shared_types import Workload

from .tables import LatencyTable, build_measured, profile_command, strategy_fingerprint
from .timing import (
    environment,
    load_snapshot,
    other_load,
    profile_record,
    quiet_enough,
    resolve_threads,
    time_steps,
    wait_for_quiet,
)

# Every artifact timing spans at least this long: a shared machine's speed drifts over seconds, and a
# handful of fast samples catches one moment of it (docs/budgets.md).
MIN_TIMED_SECONDS = 0.5


def profile_artifact(flow: Flow, path: str | Path, workload: Workload, *, threads: int | None = None, seed: int = 0,
                     metrics: tuple[str, ...] | None = None, device: str = "cpu", **measure_kwargs) -> dict:
    """Time `workload` on an exported artifact with the flow's runtime: the one step loop
    (`timing.time_steps`) where the flow opens a stepped runtime, else the flow's own profiler.

    Returns a JSON-serialisable record: {"workload", "timings": {metric: Timing fields},
    "environment", "artifact", "runtime", "measure"}.
    """
    if flow.open is None:
        return flow.profile(path, workload, threads=threads, seed=seed, metrics=metrics, **measure_kwargs)
    opened = flow.open(path, workload, metrics, threads=threads, seed=seed, device=device)
    try:
        env = environment(opened.threads)  # inside the pin: records the thread count the run uses
        timings = time_steps(opened.steps, opened.ids, workload, opened.metrics, **opened.measure, **measure_kwargs)
    finally:
        opened.close()
    return profile_record(path, workload, timings, env, opened.runtime, measure_kwargs)


def cannot_measure(target: dict, flow: Flow) -> str | None:
    """Why this machine cannot measure `flow` on `target`, or None.

    The host is measured with the CPU profilers. A named GPU target is measured only on that device:
    a visible GPU of the target's arch, and a profiler that times on the GPU (TensorRT-LLM, MLC-LLM,
    PyTorch on CUDA); the ONNX Runtime and llama.cpp profilers time the CPU.
    """
    from targets import detect_gpu

    devices = flow.devices
    if target["name"] != "host":
        if target.get("kind") != "gpu" or "cuda" not in devices:
            return f"the {flow} profiler times the CPU, not the {target['name']}'s GPU"
        gpu = detect_gpu()
        if gpu is None:
            return f"this machine has no visible GPU (the {target['name']} is {target.get('arch')})"
        if gpu["arch"] != target.get("arch"):
            return (
                f"this machine's GPU is {gpu['name']} ({gpu['arch']}), not the {target['name']} ({target.get('arch')})"
            )
    elif "cpu" not in devices:
        return f"the {flow} profiler times a GPU: name the device as the target (e.g. --target a5000) and run it there"
    return flow.unavailable()


def time_artifact(path: Path, flow: Flow, workload: Workload, *, threads=None, target: dict | None = None,
                  notice=None, **measure_kwargs) -> dict:
    """Time `workload.metric` on an exported artifact: the Timing fields, the environment, the threads,
    and the other processes' load while it ran (`other_load`, `noisy`). On a named GPU target a
    profiler that can time either (PyTorch) times CUDA."""
    if target is not None and target["name"] != "host" and "cpu" in flow.devices:
        measure_kwargs.setdefault("device", "cuda")
    measure_kwargs.setdefault("min_seconds", MIN_TIMED_SECONDS)
    on_cpu = measure_kwargs.get("device", "cpu") == "cpu"
    if on_cpu:  # other processes on the cores skew a CPU timing: give them a chance to finish first
        wait_for_quiet(resolve_threads(threads), notice=notice)
    before = load_snapshot()
    record = profile_artifact(flow, path, workload, threads=threads, metrics=(workload.metric,), **measure_kwargs)
    timing = dict(record["timings"][workload.metric])
    timing["environment"] = record["environment"]
    timing["threads"] = record["runtime"]["threads"]
    # the CPUs other processes kept busy while this ran; noisy: they took cores the timing needed
    timing["other_load"] = other_load(before) if on_cpu else None
    timing["noisy"] = on_cpu and not quiet_enough(timing["threads"] or resolve_threads(threads), timing["other_load"])
    return timing


def measure_shape(dense, flow: Flow, workload: Workload, tokenizer_dir: Path, *, quant=None, threads=None,
                  target: dict | None = None, **measure_kwargs) -> dict:
    """Export the (legalised) DenseModel for `flow` into a temporary directory, build it as the
    compile would for `target` (default: the host), and time `workload` on it."""
    target = target or {"name": "host", "kind": "cpu"}
    with scratch_dir("amoeba-profile-") as tmp:
        _, built = write_artifact(flow, dense, Path(tmp), tokenizer_dir, target, quant=quant, workload=workload,
                                  build=flow.times_build, **flow.profile_emit)
        if built and built.get("skipped"):
            raise UserError(f"cannot time {flow}: {built['skipped']}")
        return time_artifact(Path(tmp), flow, workload, threads=threads, target=target, **measure_kwargs)


def profile_table(
    elastic,
    target: dict,
    flow: Flow,
    workload: Workload,
    *,
    strategy_dir: Path | None = None,
    dtype=None,
    threads=None,
    n_validate: int = 10,
    measure_all: bool = False,
    root: Path | None = None,
    plans: dict | None = None,
    quant: str | None = None,
    variant: str | None = None,
    notice=None,
    passes: int = 1,
    **measure_kwargs,
) -> tuple[LatencyTable, Path]:
    """Measure and store the table. `plans`: every shape's legalised DenseModel (default: as
    materialized, for flows that take every shape as it is), exported with `quant`."""
    reason = cannot_measure(target, flow)
    if reason:
        where = "" if target["name"] == "host" else f" on the {target['name']}"
        raise UserError(
            f"profiling measures the machine it runs on, and {reason}: "
            f"run `{profile_command(target, flow.name, None, workload)}`{where}"
        )
    plans = plans or {s: materialize(elastic, s, dtype) for s in elastic.strategy.space}
    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    path = LatencyTable.path(target["name"], flow.name, elastic.info["name"], workload, root, variant)
    path.parent.mkdir(parents=True, exist_ok=True)  # before any measuring: a folder we cannot write fails now
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write latency tables into {path.parent}: it is read-only for this user")
    checkpoint = path.with_name(f".{path.name}.checkpoint")

    def measure(shape):
        """One shape, measured again once if other processes took cores meanwhile; a table is never
        written from a noisy measurement."""
        for _ in range(2):
            timing = measure_shape(plans[shape], flow, workload, elastic.dir, quant=quant, threads=threads,
                                   target=target, notice=notice, **measure_kwargs)
            if not timing.get("noisy"):
                return timing
        raise UserError(f"other processes kept {timing['other_load']:.1f} CPUs busy while {shape} was timed: a table "
                        "measured now would be wrong, so none was written (the shapes measured so far are kept); "
                        "rerun when the machine is idle, or with fewer --threads")

    table = build_measured(
        plans, measure,
        target=target, flow=flow.name, model=model, strategy=strategy_fingerprint(strategy_dir), workload=workload,
        n_validate=n_validate, measure_all=measure_all, checkpoint=checkpoint, notice=notice, passes=passes,
    )
    table.provenance["artifact"] = {"quant": quant, "variant": variant}
    table.save(path)
    checkpoint.unlink(missing_ok=True)
    return table, path
