"""`amoeba-export profile`: regenerate a latency table on the machine at hand.

Each measured shape is exported by the flow's own exporter into a temporary directory and timed by
the flow's profiler from there: what ships is what was timed. Measurements checkpoint one shape at
a time beside the table, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from amoeba_export.errors import UserError
from amoeba_export.exporters import get_exporter
from amoeba_export.materialize import materialize

from . import gguf, onnx, pytorch
from .tables import LatencyTable, build_measured, strategy_fingerprint
from .workload import Workload

PROFILERS = {"pytorch": pytorch, "onnx": onnx, "gguf": gguf}


def time_artifact(path: Path, flow: str, workload: Workload, *, threads=None, **measure_kwargs) -> dict:
    """Time `workload.metric` on an exported artifact: the Timing fields, the environment, the threads."""
    if flow not in PROFILERS:
        raise UserError(f"no profiler for flow {flow!r} on this machine (have: {', '.join(PROFILERS)})")
    record = PROFILERS[flow].profile_artifact(path, workload, threads=threads, metrics=(workload.metric,), **measure_kwargs)
    timing = dict(record["timings"][workload.metric])
    timing["environment"] = record["environment"]
    timing["threads"] = record["runtime"]["threads"]
    return timing


def measure_shape(dense, flow: str, workload: Workload, tokenizer_dir: Path, *, quant=None, threads=None,
                  **measure_kwargs) -> dict:
    """Export the (legalised) DenseModel for `flow` into a temporary directory, build it as the
    compile would, and time `workload` on it."""
    exporter = get_exporter(flow)
    with tempfile.TemporaryDirectory(prefix="amoeba-profile-") as tmp:
        profiler = PROFILERS.get(flow)
        exporter.emit(dense, Path(tmp), tokenizer_dir, quant=quant, **getattr(profiler, "EMIT_OPTIONS", {}))
        if getattr(profiler, "TIMES_BUILD", False):  # the profiler times what the build makes
            exporter.build(Path(tmp), {"name": "host"}, quant=quant)
        return time_artifact(Path(tmp), flow, workload, threads=threads, **measure_kwargs)


def profile_table(elastic, target: dict, flow: str, workload: Workload, *, strategy_dir: Path | None = None,
                  dtype=None, threads=None, n_validate: int = 10, measure_all: bool = False,
                  root: Path | None = None, plans: dict | None = None, quant: str | None = None,
                  variant: str | None = None, **measure_kwargs) -> tuple[LatencyTable, Path]:
    """Measure and store the table. `plans`: every shape's legalised DenseModel (default: as
    materialized, for flows that take every shape as it is), exported with `quant`."""
    if target["name"] != "host":
        raise UserError(f"profiling measures the machine it runs on: use --target host here, or run this command on the {target['name']}")
    plans = plans or {s: materialize(elastic, s, dtype) for s in elastic.strategy.space}
    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    path = LatencyTable.path(target["name"], flow, elastic.info["name"], workload, root, variant)
    checkpoint = path.with_name(f".{path.name}.partial")
    table = build_measured(
        plans, lambda s: measure_shape(plans[s], flow, workload, elastic.dir, quant=quant, threads=threads,
                                       **measure_kwargs),
        target=target, flow=flow, model=model, strategy=strategy_fingerprint(strategy_dir), workload=workload,
        n_validate=n_validate, measure_all=measure_all, checkpoint=checkpoint,
    )
    table.provenance["artifact"] = {"quant": quant, "variant": variant}
    table.save(path)
    checkpoint.unlink(missing_ok=True)
    return table, path
