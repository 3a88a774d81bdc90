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

from . import pytorch
from .tables import LatencyTable, build_measured, strategy_fingerprint
from .workload import Workload

PROFILERS = {"pytorch": pytorch}


def time_artifact(path: Path, flow: str, workload: Workload, *, threads=None, **measure_kwargs) -> dict:
    """Time `workload.metric` on an exported artifact: the Timing fields, the environment, the threads."""
    if flow not in PROFILERS:
        raise UserError(f"no profiler for flow {flow!r} on this machine (have: {', '.join(PROFILERS)})")
    record = PROFILERS[flow].profile_artifact(path, workload, threads=threads, metrics=(workload.metric,), **measure_kwargs)
    timing = dict(record["timings"][workload.metric])
    timing["environment"] = record["environment"]
    timing["threads"] = record["runtime"]["threads"]
    return timing


def measure_shape(elastic, shape, flow: str, workload: Workload, *, dtype=None, threads=None, **measure_kwargs) -> dict:
    """Export `shape` for `flow` into a temporary directory and time `workload` on it."""
    exporter = get_exporter(flow)
    with tempfile.TemporaryDirectory(prefix="amoeba-profile-") as tmp:
        exporter.emit(materialize(elastic, shape, dtype), Path(tmp), elastic.dir)
        return time_artifact(Path(tmp), flow, workload, threads=threads, **measure_kwargs)


def profile_table(elastic, target: dict, flow: str, workload: Workload, *, strategy_dir: Path | None = None,
                  dtype=None, threads=None, n_validate: int = 10, measure_all: bool = False,
                  root: Path | None = None, plans: dict | None = None, **measure_kwargs) -> tuple[LatencyTable, Path]:
    if target["name"] != "host":
        raise UserError(f"profiling measures the machine it runs on: use --target host here, or run this command on the {target['name']}")
    plans = plans or {s: materialize(elastic, s, dtype) for s in elastic.strategy.space}
    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    path = LatencyTable.path(target["name"], flow, elastic.info["name"], workload, root)
    checkpoint = path.with_name(f".{path.name}.partial")
    table = build_measured(
        plans, lambda s: measure_shape(elastic, s, flow, workload, dtype=dtype, threads=threads, **measure_kwargs),
        target=target, flow=flow, model=model, strategy=strategy_fingerprint(strategy_dir), workload=workload,
        n_validate=n_validate, measure_all=measure_all, checkpoint=checkpoint,
    )
    table.save(path)
    checkpoint.unlink(missing_ok=True)
    return table, path
