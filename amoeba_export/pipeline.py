"""The one-shot compile: ElasticModel × Shape → materialize → emit → verify → manifest.

Everything is written into a temporary directory beside `out` and renamed into place at the end, the
manifest last; an interrupted run leaves no artifact that looks complete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from targets import default_format

from .elastic import ElasticModel
from .errors import UserError
from .exporters import get_exporter, write_artifact
from .io import atomic_dir
from .manifest import hash_inputs, write_manifest
from .materialize import DTYPES, DenseModel, materialize
from .shapes import Shape

VERIFY_TEXT = "The capital of France is Paris. Deployment engineers compile one elastic model for many devices."
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}  # verify's max |logit difference| by dtype
# With an adapter merged the artifact holds W + s·B·A rounded to fp32, while the reference adds
# s·B(Ax) unmerged: the two round differently. On SmolLM2-135M at 24x0.75 with a trained SMOL
# (logits up to 35) the export is 1.7e-4 from the fp32 reference, 1.75e-4 from a float64 one,
# and the fp32 reference is itself 8.5e-5 from the float64 one. A wrong gate or merge moves
# logits by whole units, so 1e-3 still catches it.
ADAPTER_FP32_TOLERANCE = 1e-3


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


def split_dtype(dtype: str | None, target: dict, flow: str, caps) -> tuple[str | None, str | None]:
    """(DenseModel dtype, exporter quant) from `--dtype` or the target's default for the flow.

    Float dtypes set the dense weights; anything else (q8_0, q4_k_m, ...) is the exporter's own
    format, applied to fp weights. The default is the target's, where the flow can write it.
    """
    if dtype is None:
        default = (default_format(target, flow) or "").lower()
        dtype = default if default in caps.quants else None
    if dtype is None:
        return None, None
    dtype = dtype.lower()
    if dtype not in caps.quants:
        raise UserError(f"flow {flow!r} cannot write dtype {dtype!r}: choose one of {', '.join(caps.quants)}")
    return (dtype, None) if dtype in DTYPES else (None, dtype)


def dense_perplexity(elastic: ElasticModel, windows: int = 4, seq_len: int = 256) -> Callable[[DenseModel], float]:
    """Held-out perplexity of a DenseModel built in memory (what legalize measures when it changes the model)."""
    from .exporters.pytorch import in_memory
    from .metrics import perplexity
    from .score import EvalConfig, eval_set

    ids: list[torch.Tensor] = []  # the held-out windows, read on first use (most compiles never measure)

    def ppl(dense: DenseModel) -> float:
        if not ids:
            ids.append(eval_set(elastic.tokenizer(), EvalConfig(ppl_windows=windows, seq_len=seq_len, mc_tasks=()))[0])
        model = in_memory(dense)
        with torch.inference_mode():
            return perplexity(lambda x: model(input_ids=x, use_cache=False).logits, ids[0])

    return ppl


def prepare(elastic: ElasticModel, shape: Shape, flow: str, target: dict, *, dtype: str | None = None,
            layout: str = "auto", strict: bool = False, measure: bool = True):
    """materialize → legalize: (DenseModel', LegalizeReport, quant). `measure`: measure the perplexity
    change of what legalize alters (the compile does; planning every shape for the search does not)."""
    from .legalize import legalize

    caps = get_exporter(flow).CAPS
    dense_dtype, quant = split_dtype(dtype, target, flow, caps)
    dense = materialize(elastic, shape, dense_dtype)
    dense, report = legalize(dense, caps, flow=flow, layout=layout, quant=quant, strict=strict,
                             perplexity=dense_perplexity(elastic) if measure else None)
    return dense, report, quant


@dataclass
class Plans:
    """Every shape's legalised DenseModel (what the flow would run: the search ranks these)."""

    shapes: dict[Shape, DenseModel]
    quant: str | None  # the exporter's own format, where not a float dtype
    fmt: str | None  # the weight format asked for (None: the flow's default on the target)
    variant: str | None  # latency-table variant: None for the flow's default artifact


def legal_plans(elastic: ElasticModel, flow: str, target: dict, *, dtype: str | None = None, layout: str = "auto",
                strict: bool = False) -> Plans:
    """Plan every shape for `flow` on `target`; what legalize would change is not measured here."""
    dense_dtype, quant = split_dtype(dtype, target, flow, get_exporter(flow).CAPS)
    shapes = {s: prepare(elastic, s, flow, target, dtype=dtype, layout=layout, strict=strict, measure=False)[0]
              for s in elastic.strategy.space}
    fmt = quant or dense_dtype
    fmt = fmt if fmt != (default_format(target, flow) or "").lower() else None
    variant = "-".join(p for p in (fmt, layout if layout != "auto" else None) if p) or None
    return Plans(shapes, quant, fmt, variant)


def compile_shape(elastic: ElasticModel, shape: Shape, flow: str, target: dict, out: Path,
                  dtype: str | None = None, check: bool = True, strategy_dir: Path | None = None,
                  adapter_dir: Path | None = None, layout: str = "auto", strict: bool = False, build: bool = True,
                  workload=None, before_manifest: Callable[[Path, dict], None] | None = None) -> Result:
    """Materialize, legalize, emit, build, verify and write the manifest (last). `workload`: what the
    artifact is sized for (default batch 1, prompt 128, 64 generated). `before_manifest(dir, body)` may
    add files and manifest fields (the search's plot, the artifact's measured latency)."""
    from profilers.workload import Workload

    workload = workload or Workload()
    exporter = get_exporter(flow)
    if flow not in target.get("flows", []):
        raise UserError(f"flow {flow!r} is not available on target {target['name']!r} (it has: {', '.join(target.get('flows', []))})")
    shape = elastic.strategy.resolve(shape)
    dense, report, quant = prepare(elastic, shape, flow, target, dtype=dtype, layout=layout, strict=strict)
    with atomic_dir(out) as tmp:
        files, built = write_artifact(exporter, dense, tmp, elastic.dir, target, quant=quant, workload=workload,
                                      build=build)
        parity = None
        if check:
            # the reference is the elastic model the dense model came from (legalize may re-select)
            parity = verify(dense._elastic, shape, exporter.load(tmp))
            # a quantised artifact has no logit tolerance: its greedy-token agreement is the figure
            limits = {**(TOLERANCE if quant is None else {}), **getattr(exporter, "TOLERANCE", {})}
            parity["tolerance"] = limits.get(quant or str(dense.dtype).removeprefix("torch."))
            if elastic.adapter is not None and quant is None and dense.dtype == torch.float32:
                parity["tolerance"] = max(parity["tolerance"], ADAPTER_FP32_TOLERANCE)
            if parity["greedy_token_agreement"] < 0.9:
                parity["warning"] = (f"{quant or dense.dtype} changes {1 - parity['greedy_token_agreement']:.0%} of the "
                                     f"greedy tokens on the verify prompt against the masked reference; the accuracy "
                                     f"table scores the unquantised model, so measure this format's accuracy before "
                                     f"shipping it, or choose a wider format with --dtype")
            if quant is None and dense.dtype == torch.float32 and parity["max_abs_logit_diff"] > parity["tolerance"]:
                raise UserError(f"parity check failed for {flow} at {shape}: max |logit difference| "
                                f"{parity['max_abs_logit_diff']:.3g} > {parity['tolerance']:g} against the masked "
                                "reference; nothing was written (--no-verify skips the check)")
        body = {
            "flow": flow,
            "target": target,
            "shape": str(shape),
            "dtype": quant or str(dense.dtype).removeprefix("torch."),
            "workload": workload.to_json(),
            "model": elastic.info,
            "inputs": hash_inputs({"model": elastic.dir, "strategy": strategy_dir, "adapter": adapter_dir}),
            "layers": [vars(s) for s in dense.layers],
            "parameters": dense.parameters(),
            "materialize": {k: v for k, v in dense.record.items() if k != "legalize"},
            "legalize": report.to_json(),
            "uniform": dense.uniform,
            "emitted": files,
            "engine": built,
            "parity": parity,
        }
        if before_manifest is not None:
            before_manifest(tmp, body)
        manifest = write_manifest(tmp, body)
    return Result(Path(out), shape, dense, manifest)


# ------------------------------------------------------------------ the budgeted compile

def memory_bytes(dense: DenseModel, workload, quant: str | None = None) -> int:
    """Weights (at the quant's bits per weight, where the exporter quantises) plus the KV cache of
    `batch` sequences of prompt_len + gen_len tokens."""
    from profilers.roofline import bits_per_weight

    kv = sum(2 * s.n_kv_heads * s.head_dim for s in dense.layers)
    item = dense.dtype.itemsize
    bits = bits_per_weight(quant)[0] if quant else 8 * item
    return int(dense.parameters() * bits / 8) + workload.batch * (workload.prompt_len + workload.gen_len) * kv * item


def latency_table(elastic: ElasticModel, target: dict, flow: str, workload, strategy_dir: Path | None,
                  plans: Plans, threads: int | None, notice: Callable[[str], None], *, command: str,
                  measurable: bool):
    """The stored table for target × flow × model × workload (× variant); else measure it (this
    machine can: `measurable`), or estimate. `command` measures it on the device."""
    from profilers.profile import profile_table
    from profilers.tables import LatencyTable, build_estimated, hardware_fingerprint, strategy_fingerprint

    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    sfp = strategy_fingerprint(strategy_dir)
    path = LatencyTable.path(target["name"], flow, elastic.info["name"], workload, variant=plans.variant)
    on_device = "" if target["name"] == "host" else f" on the {target['name']}"
    if path.is_file():
        table = LatencyTable.load(path)
        table.check(model, sfp)
        if table.source == "estimated" and measurable:
            notice(f"latency table {path} is ESTIMATED (roofline) and this machine can measure it: profiling now "
                   f"(the same as `{command}`)")
        elif table.source == "estimated":
            notice(f"latency table {path} is ESTIMATED (roofline); measure it{on_device} with: {command}")
            return table, path
        else:
            if target["name"] == "host" and table.provenance.get("hardware") != hardware_fingerprint(target):
                notice(f"latency table {path} was measured on other hardware ({table.provenance.get('hardware')}); "
                       f"re-measure here with: {command}")
            return table, path
    elif measurable:
        notice(f"no latency table for {target['name']}/{flow}/{workload.key()}: profiling this machine now "
               f"(the same as `{command}`)")
    if measurable:
        return profile_table(elastic, target, flow, workload, strategy_dir=strategy_dir, threads=threads,
                             plans=plans.shapes, quant=plans.quant, variant=plans.variant)
    table = build_estimated(plans.shapes, target=target, flow=flow, model=model, strategy=sfp, workload=workload,
                            fmt=plans.fmt)
    table.save(path)
    notice(f"no measured latency table for {target['name']}/{flow}: using an ESTIMATED roofline table ({path}); "
           f"measure it{on_device} with: {command}")
    return table, path


def table_threads(table) -> int | None:
    """The thread count a measured table was timed with, so the artifact is measured the same way."""
    counts = {e["measured"].get("threads") for e in table.entries.values() if "measured" in e}
    return counts.pop() if len(counts) == 1 else None


def accuracy_table(elastic: ElasticModel, strategy_dir: Path, notice: Callable[[str], None],
                   adapter_dir: Path | None = None):
    """The accuracy table of the strategy (and adapter: an adapter changes accuracy, so its tables
    are kept apart, keyed by the adapter's fingerprint in the file name)."""
    from .adapter import adapter_fingerprint
    from .score import AccuracyTable, EvalConfig, default_path, score_shapes, strategy_fingerprint

    afp = adapter_fingerprint(adapter_dir) if adapter_dir is not None else None
    path = default_path(strategy_dir, adapter=afp)
    ours = (lambda p: p.name.endswith(f"-adapter-{afp}.json")) if afp else (lambda p: "-adapter-" not in p.name)  # noqa: E731
    # The default eval set's table, else any complete table beside the strategy (e.g. a shipped one
    # scored on a smaller eval set), else score now.
    for candidate in [path] + sorted(p for p in Path(strategy_dir).glob("accuracy-*.json") if p != path and ours(p)):
        if candidate.is_file():
            table = AccuracyTable.load(candidate, elastic.info["fingerprint"], strategy_fingerprint(strategy_dir))
            if set(table.entries) >= set(elastic.strategy.space):
                return table
    notice(f"no accuracy table beside the strategy: scoring every shape now (resumable; `amoeba-export score`) -> {path}")
    return score_shapes(elastic, list(elastic.strategy.space), EvalConfig(), path)


def compile_budget(elastic: ElasticModel, target: dict, flow: str, workload, budget_s: float, out: Path | None, *,
                   memory_budget: int | None = None, dtype: str | None = None, threads: int | None = None,
                   dry_run: bool = False, check: bool = True, strategy_dir: Path | None = None,
                   adapter_dir: Path | None = None, layout: str = "auto", strict: bool = False, build: bool = True,
                   notice: Callable[[str], None] = print) -> dict:
    """score (cached) → latency table (stored, profiled or estimated) → search → compile → measure."""
    from profilers.profile import cannot_measure, time_artifact
    from profilers.tables import profile_command

    from .search import plot_pareto, search

    plans = legal_plans(elastic, flow, target, dtype=dtype, layout=layout, strict=strict)  # user errors first
    acc = accuracy_table(elastic, strategy_dir, notice, adapter_dir)
    command = profile_command(target, flow, plans.fmt, workload)  # what measures this table (on the device)
    measurable = cannot_measure(target, flow) is None
    table, table_path = latency_table(elastic, target, flow, workload, strategy_dir, plans, threads, notice,
                                      command=command, measurable=measurable)
    latency = table.as_mapping()
    mem = {s: memory_bytes(d, workload, plans.quant) for s, d in plans.shapes.items()} if memory_budget else None
    result = search(acc.scores(), latency, budget_s, mem, memory_budget)
    summary = {
        "target": target["name"], "flow": flow, "workload": workload.to_json(), "budget_s": budget_s,
        "memory_budget": memory_budget, "shape": str(result.shape), "predicted_latency_s": result.latency_s,
        "score": result.score, "score_definition": "-log(held-out perplexity)", "table": str(table_path),
        "table_source": table.source, "table_validation": table.validation, "search": result.as_dict(),
        "parameters": plans.shapes[result.shape].parameters(), "measured_latency_s": None, "out": None,
        "measure_command": None if table.source == "measured" else command,
    }
    if dry_run:
        return summary
    out = Path(out or f"out/{target['name']}-{flow}-{result.shape}")

    def finish(tmp: Path, body: dict) -> None:
        plot_pareto(tmp / "pareto.png", acc.scores(), latency, budget_s, result.shape,
                    f"{elastic.info['name']} on {target['name']} ({flow}, {workload.key()})", "-log(ppl)")
        measured = None
        if measurable:
            measured = time_artifact(tmp, flow, workload, threads=threads or table_threads(table), target=target)
        summary["measured_latency_s"] = measured["median"] if measured else None
        if measured:
            summary["measure_warnings"] = list(measured["environment"].get("warnings") or [])
            if measured["median"] > budget_s * 1.05:
                summary["measure_warnings"].append(
                    f"the artifact measured {measured['median'] * 1e3:.1f} ms against a {budget_s * 1e3:.1f} ms budget "
                    f"(predicted {result.latency_s * 1e3:.1f} ms): if the machine is busy, re-measure when idle; "
                    f"if not, re-profile: {command}")
        body["latency"] = {"metric": workload.metric, "workload": workload.to_json(), "budget_s": budget_s,
                           "predicted_s": result.latency_s, "table": str(table_path), "table_source": table.source,
                           "table_validation": table.validation, "measured": measured}
        body["search"] = result.as_dict()

    res = compile_shape(elastic, result.shape, flow, target, out, dtype=dtype, check=check, strategy_dir=strategy_dir,
                        adapter_dir=adapter_dir, layout=layout, strict=strict, build=build, workload=workload,
                        before_manifest=finish)
    summary["out"] = str(out)
    summary["dtype"] = res.manifest["dtype"]
    summary["legalize"] = res.manifest["legalize"]
    summary["engine"] = res.manifest["engine"]
    summary["parity"] = res.manifest["parity"]
    return summary
