"""The one-shot compile: ElasticModel × Shape → materialize → emit → verify → manifest.

Everything is written into a temporary directory beside `out` and renamed into place at the end, the
manifest last; an interrupted run leaves no artifact that looks complete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .elastic import ElasticModel
from .errors import UserError
from .exporters import get_exporter
from .io import atomic_dir
from .manifest import hash_inputs, write_manifest
from .materialize import DenseModel, materialize
from .shapes import Shape

VERIFY_TEXT = "The capital of France is Paris. Deployment engineers compile one elastic model for many devices."
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


@dataclass
class Result:
    out: Path
    shape: Shape
    dense: DenseModel
    manifest: dict


def verify(elastic: ElasticModel, shape: Shape, logits_fn) -> dict:
    """Compare the artifact's logits with the masked reference forward on a fixed prompt."""
    tok = elastic.tokenizer()
    ids = torch.tensor([tok(VERIFY_TEXT, add_special_tokens=False)["input_ids"]])
    ref = elastic.logits(ids, shape).float()
    got = logits_fn(ids).float()
    return {
        "prompt_tokens": int(ids.shape[1]),
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "greedy_token_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
    }


def compile_shape(elastic: ElasticModel, shape: Shape, flow: str, target: dict, out: Path,
                  dtype: str | None = None, check: bool = True, strategy_dir: Path | None = None,
                  adapter_dir: Path | None = None,
                  before_manifest: Callable[[Path, dict], None] | None = None) -> Result:
    """Materialize, emit, verify and write the manifest (last). `before_manifest(dir, body)` may add
    files and manifest fields (the search's plot, the artifact's measured latency)."""
    exporter = get_exporter(flow)
    if flow not in target.get("flows", []):
        raise UserError(f"flow {flow!r} is not available on target {target['name']!r} (it has: {', '.join(target.get('flows', []))})")
    shape = elastic.strategy.resolve(shape)
    dense = materialize(elastic, shape, dtype)
    with atomic_dir(out) as tmp:
        exporter.emit(dense, tmp, elastic.dir)
        parity = None
        if check:
            parity = verify(elastic, shape, exporter.load(tmp))
            parity["tolerance"] = TOLERANCE[dense.dtype]
            if dense.dtype == torch.float32 and parity["max_abs_logit_diff"] > parity["tolerance"]:
                raise RuntimeError(f"parity check failed: {parity}")
        body = {
            "flow": flow,
            "target": target,
            "shape": str(shape),
            "dtype": str(dense.dtype).removeprefix("torch."),
            "model": elastic.info,
            "inputs": hash_inputs({"model": elastic.dir, "strategy": strategy_dir, "adapter": adapter_dir}),
            "layers": [vars(s) for s in dense.layers],
            "parameters": dense.parameters(),
            "materialize": dense.record,
            "uniform": dense.uniform,
            "parity": parity,
        }
        if before_manifest is not None:
            before_manifest(tmp, body)
        manifest = write_manifest(tmp, body)
    return Result(Path(out), shape, dense, manifest)


# ------------------------------------------------------------------ the budgeted compile

def memory_bytes(dense: DenseModel, workload) -> int:
    """Weights plus the KV cache of `batch` sequences of prompt_len + gen_len tokens."""
    kv = sum(2 * s.n_kv_heads * s.head_dim for s in dense.layers)
    item = dense.dtype.itemsize
    return dense.parameters() * item + workload.batch * (workload.prompt_len + workload.gen_len) * kv * item


def latency_table(elastic: ElasticModel, target: dict, flow: str, workload, strategy_dir: Path | None,
                  plans: dict, dtype: str | None, threads: int | None, notice: Callable[[str], None]):
    """The stored table for target × flow × model × workload; else profile the host, or estimate.
    `plans` maps every shape to its DenseModel plan."""
    from profilers.profile import PROFILERS, profile_table
    from profilers.tables import LatencyTable, build_estimated, hardware_fingerprint, strategy_fingerprint

    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    sfp = strategy_fingerprint(strategy_dir)
    path = LatencyTable.path(target["name"], flow, elastic.info["name"], workload)
    if path.is_file():
        table = LatencyTable.load(path)
        table.check(model, sfp)
        if table.source == "estimated":
            notice(f"latency table {path} is ESTIMATED (roofline); measure it on the device: "
                   f"amoeba-export profile --target host --flow {flow}")
        elif target["name"] == "host" and table.provenance.get("hardware") != hardware_fingerprint(target):
            notice(f"latency table {path} was measured on other hardware ({table.provenance.get('hardware')}); "
                   f"re-measure here with: amoeba-export profile --target host --flow {flow}")
        return table, path
    if target["name"] == "host" and flow in PROFILERS:
        notice(f"no latency table for host/{flow}/{workload.key()}: profiling this machine now "
               f"(the same as `amoeba-export profile --target host --flow {flow}`)")
        return profile_table(elastic, target, flow, workload, strategy_dir=strategy_dir, dtype=dtype, threads=threads,
                             plans=plans)
    table = build_estimated(plans, target=target, flow=flow, model=model, strategy=sfp, workload=workload)
    table.save(path)
    notice(f"no measured latency table for {target['name']}/{flow}: using an ESTIMATED roofline table ({path}); "
           f"measure it on the device with: amoeba-export profile --target host --flow {flow}")
    return table, path


def accuracy_table(elastic: ElasticModel, strategy_dir: Path, notice: Callable[[str], None]):
    from .score import AccuracyTable, EvalConfig, default_path, score_shapes, strategy_fingerprint

    path = default_path(strategy_dir)
    # The default eval set's table, else any complete table beside the strategy (e.g. a shipped one
    # scored on a smaller eval set), else score now.
    for candidate in [path] + sorted(p for p in Path(strategy_dir).glob("accuracy-*.json") if p != path):
        if candidate.is_file():
            table = AccuracyTable.load(candidate, elastic.info["fingerprint"], strategy_fingerprint(strategy_dir))
            if set(table.entries) >= set(elastic.strategy.space):
                return table
    notice(f"no accuracy table beside the strategy: scoring every shape now (resumable; `amoeba-export score`) -> {path}")
    return score_shapes(elastic, list(elastic.strategy.space), EvalConfig(), path)


def compile_budget(elastic: ElasticModel, target: dict, flow: str, workload, budget_s: float, out: Path | None, *,
                   memory_budget: int | None = None, dtype: str | None = None, threads: int | None = None,
                   dry_run: bool = False, check: bool = True, strategy_dir: Path | None = None,
                   notice: Callable[[str], None] = print) -> dict:
    """score (cached) → latency table (stored, profiled or estimated) → search → compile → measure."""
    from profilers.profile import PROFILERS, time_artifact

    from .search import plot_pareto, search

    get_exporter(flow)
    acc = accuracy_table(elastic, strategy_dir, notice)
    plans = {s: materialize(elastic, s, dtype) for s in elastic.strategy.space}
    table, table_path = latency_table(elastic, target, flow, workload, strategy_dir, plans, dtype, threads, notice)
    latency = table.as_mapping()
    mem = {s: memory_bytes(d, workload) for s, d in plans.items()} if memory_budget else None
    result = search(acc.scores(), latency, budget_s, mem, memory_budget)
    summary = {
        "target": target["name"], "flow": flow, "workload": workload.to_json(), "budget_s": budget_s,
        "memory_budget": memory_budget, "shape": str(result.shape), "predicted_latency_s": result.latency_s,
        "score": result.score, "score_definition": "-log(held-out perplexity)", "table": str(table_path),
        "table_source": table.source, "table_validation": table.validation, "search": result.as_dict(),
        "parameters": plans[result.shape].parameters(), "measured_latency_s": None, "out": None,
    }
    if dry_run:
        return summary
    out = Path(out or f"out/{target['name']}-{flow}-{result.shape}")

    def finish(tmp: Path, body: dict) -> None:
        plot_pareto(tmp / "pareto.png", acc.scores(), latency, budget_s, result.shape,
                    f"{elastic.info['name']} on {target['name']} ({flow}, {workload.key()})", "-log(ppl)")
        measured = None
        if target["name"] == "host" and flow in PROFILERS:
            measured = time_artifact(tmp, flow, workload, threads=threads)
        summary["measured_latency_s"] = measured["median"] if measured else None
        body["latency"] = {"metric": workload.metric, "workload": workload.to_json(), "budget_s": budget_s,
                           "predicted_s": result.latency_s, "table": str(table_path), "table_source": table.source,
                           "table_validation": table.validation, "measured": measured}
        body["search"] = result.as_dict()

    compile_shape(elastic, result.shape, flow, target, out, dtype=dtype, check=check, strategy_dir=strategy_dir,
                  before_manifest=finish)
    summary["out"] = str(out)
    return summary
