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

from .compute import Compute
from .elastic import ElasticModel
from .errors import UserError
from .flows import Flow, write_artifact
from .io import atomic_dir
from .manifest import hash_inputs, is_artifact, write_manifest
from .materialize import DTYPES, materialize
from .shapes import Shape
from .shared_types import DenseModel

VERIFY_TEXT = "The capital of France is Paris. Deployment engineers compile one elastic model for many devices."
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}  # verify's max |logit difference| by dtype
# With an adapter merged the artifact holds W + s·B·A rounded to fp32, while the reference adds
# s·B(Ax) unmerged: the two round differently. On SmolLM2-135M at 24x0.75 with a trained SMOL
# (logits up to 35) the export is 1.7e-4 from the fp32 reference, 1.75e-4 from a float64 one,
# and the fp32 reference is itself 8.5e-5 from the float64 one. A wrong gate or merge moves
# logits by whole units, so 1e-3 still catches it.
ADAPTER_FP32_TOLERANCE = 1e-3
# A quantised artifact has no logit limit. Its figure is the share of verify-prompt positions where
# its greedy token is among the reference's TOP_K; under this floor it is refused. On SmolLM2-135M
# sound 4-bit artifacts score 72-100% and broken ones 11-39% (docs/verify.md).
TOP_K = 5
QUANT_FLOOR = 0.5
# The most legalize may raise held-out perplexity where a flow cannot run the shape exactly
# (dropped compensation biases, re-selection); beyond it the compile is refused. Measured on
# SmolLM2-135M for MLC: -3.5% and +2% at widths 0.75-0.875, +284% and +1032% at 0.625-0.5
# (docs/verify.md).
MAX_LEGALIZE_LOSS = 0.25


def parity_limits(flow: Flow, quant: str | None, dense: DenseModel, adapter: bool, compute: Compute) -> dict:
    """{"tolerance": max |Δlogit| allowed, or None for a quantised format, "floor": the least top-5
    agreement allowed where there is no logit limit, "reference": how the reference was computed}.
    A reference computed in half precision carries its own rounding, which the tolerance adds to
    the artifact's (docs/reference-forward.md §3)."""
    limits = {**(TOLERANCE if quant is None else {}), **flow.tolerance}
    fmt = quant or str(dense.dtype).removeprefix("torch.")
    tolerance = limits.get(fmt)
    if tolerance is not None and adapter and quant is None and dense.dtype == torch.float32:
        tolerance = max(tolerance, ADAPTER_FP32_TOLERANCE)
    if tolerance is not None:
        tolerance += compute.reference_error
    return {"tolerance": tolerance, "floor": None if tolerance is not None else QUANT_FLOOR,
            "reference": {**compute.to_json(), "tolerance_added": compute.reference_error}}


def parity_failure(parity: dict, fmt: str) -> str | None:
    """Why the artifact fails its limit, or None."""
    if parity["tolerance"] is not None and not parity["max_abs_logit_diff"] <= parity["tolerance"]:
        return (f"max |logit difference| {parity['max_abs_logit_diff']:.3g} > {parity['tolerance']:g} ({fmt}) against "
                "the masked reference")
    top = parity[f"top{TOP_K}_agreement"]
    if parity["floor"] is not None and top < parity["floor"]:
        return (f"{fmt}'s greedy token is among the masked reference's top {TOP_K} at {top:.0%} of the positions, "
                f"under the {parity['floor']:.0%} floor for quantised formats")
    return None


def legalize_failure(report, flow: Flow, shape: Shape) -> str | None:
    """Why what legalize changed costs too much (measured held-out perplexity), or None."""
    before, after = report.perplexity_before, report.perplexity_after
    if before is None or after is None or after <= before * (1 + MAX_LEGALIZE_LOSS):
        return None
    return (f"{flow} cannot run {shape} exactly, and {report.inexact} raises held-out perplexity "
            f"{before:.3f} -> {after:.3f} (+{after / before - 1:.0%}, over the {MAX_LEGALIZE_LOSS:.0%} limit)")


class LegalizeLoss(UserError):
    """The flow cannot run the shape without costing more accuracy than MAX_LEGALIZE_LOSS."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; nothing was written: export a width-1 shape, use a flow that takes the shape "
                         "as it is (pytorch, onnx, gguf), or pass --accept-parity-loss")
        self.reason = reason


@dataclass
class Result:
    out: Path
    shape: Shape
    dense: DenseModel
    manifest: dict


def verify(reference: ElasticModel, shape: Shape, load: Callable[[], Callable]) -> dict:
    """Compare the artifact's logits (its runtime made by `load()`) with the masked reference forward
    of `reference` at `shape` on a fixed prompt. The reference runs first and a streamed one is released before
    the artifact
    is loaded, so the two never hold memory together."""
    tok = reference.tokenizer()
    ids = torch.tensor([tok(VERIFY_TEXT, add_special_tokens=False)["input_ids"]])
    ref = reference.logits(ids, shape).float()
    reference.release()
    got = load()(ids).float()
    top = ref.topk(min(TOP_K, ref.shape[-1]), dim=-1).indices
    return {
        "prompt_tokens": int(ids.shape[1]),
        "reference_forward": "resident" if reference.stack().resident else "layer by layer",
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "greedy_token_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        # the artifact's greedy token is among the reference's TOP_K: near-ties that a quantised
        # format flips still count, a broken artifact's tokens do not
        f"top{TOP_K}_agreement": float((top == got.argmax(-1, keepdim=True)).any(-1).float().mean()),
    }


def split_dtype(dtype: str | None, target: dict, flow: Flow) -> tuple[str | None, str | None]:
    """(DenseModel dtype, exporter quant) from `--dtype` or the target's default for the flow.

    Float dtypes set the dense weights; anything else (q8_0, q4_k_m, ...) is the exporter's own
    format, applied to fp weights. The default is the target's, where the flow can write it.
    """
    if dtype is None:
        default = (default_format(target, flow.name) or "").lower()
        dtype = default if default in flow.caps.quants else None
    if dtype is None:
        return None, None
    dtype = dtype.lower()
    if dtype not in flow.caps.quants:
        raise UserError(f"flow {flow.name!r} cannot write dtype {dtype!r}: choose one of {', '.join(flow.caps.quants)}")
    return (dtype, None) if dtype in DTYPES else (None, dtype)


def dense_perplexity(elastic: ElasticModel, windows: int = 4, seq_len: int = 256) -> Callable[[DenseModel], float]:
    """Held-out perplexity of what a DenseModel computes (what legalize measures when it changes the
    model): the masked reference of the elastic model it was made from, run layer by layer, so
    measuring never holds a whole model."""
    from .metrics import perplexity
    from .score import EvalConfig, eval_set

    ids: list[torch.Tensor] = []  # the held-out windows, read on first use (most compiles never measure)
    seen: dict[int, tuple[DenseModel, float]] = {}  # legalize may ask twice about one model (auto tries two layouts)

    def ppl(dense: DenseModel) -> float:
        if id(dense) in seen:
            return seen[id(dense)][1]
        if not ids:
            ids.append(eval_set(elastic.tokenizer(), EvalConfig(ppl_windows=windows, seq_len=seq_len, mc_tasks=()))[0])
        value = perplexity(dense.source.elastic.logits_fn(dense.source.shape), ids[0])
        seen[id(dense)] = (dense, value)  # the model is kept so its id is not reused
        return value

    return ppl


@dataclass
class Prepared:
    """What the compile exports: the legalised DenseModel, what legalize did, the exporter's own
    format (where not a float dtype), and the elastic model whose masked forward at the shape is the
    reference the artifact is verified against (legalize's re-selection or dropped biases included)."""

    dense: DenseModel
    report: object  # LegalizeReport
    quant: str | None
    reference: ElasticModel


def prepare(elastic: ElasticModel, shape: Shape, flow: Flow, target: dict, *, dtype: str | None = None,
            layout: str = "auto", strict: bool = False, measure: bool = True) -> Prepared:
    """materialize → legalize. `measure`: measure the perplexity change of what legalize alters (the
    compile does; planning every shape for the search does not)."""
    from .legalize import legalize

    dense_dtype, quant = split_dtype(dtype, target, flow)
    dense = materialize(elastic, shape, dense_dtype)
    dense, report = legalize(dense, flow.caps, flow=flow.name, layout=layout, quant=quant, strict=strict,
                             perplexity=dense_perplexity(elastic) if measure else None)
    return Prepared(dense, report, quant, dense.source.elastic)


@dataclass
class Plans:
    """Every shape's legalised DenseModel (what the flow would run: the search ranks these)."""

    shapes: dict[Shape, DenseModel]
    quant: str | None  # the exporter's own format, where not a float dtype
    fmt: str | None  # the weight format asked for (None: the flow's default on the target)
    variant: str | None  # latency-table variant: None for the flow's default artifact


def legal_plans(elastic: ElasticModel, flow: Flow, target: dict, *, dtype: str | None = None, layout: str = "auto",
                strict: bool = False) -> Plans:
    """Plan every shape for `flow` on `target`; what legalize would change is not measured here."""
    dense_dtype, quant = split_dtype(dtype, target, flow)
    shapes = {s: prepare(elastic, s, flow, target, dtype=dtype, layout=layout, strict=strict, measure=False).dense
              for s in elastic.strategy.space}
    fmt = quant or dense_dtype
    fmt = fmt if fmt != (default_format(target, flow.name) or "").lower() else None
    variant = "-".join(p for p in (fmt, layout if layout != "auto" else None) if p) or None
    return Plans(shapes, quant, fmt, variant)


def compile_shape(elastic: ElasticModel, shape: Shape, flow: Flow, target: dict, out: Path,
                  dtype: str | None = None, check: bool = True, strategy_dir: Path | None = None,
                  adapter_dir: Path | None = None, layout: str = "auto", strict: bool = False, build: bool = True,
                  workload=None, before_manifest: Callable[[Path, dict], None] | None = None,
                  force: bool = False, accept_parity_loss: bool = False) -> Result:
    """Materialize, legalize, emit, build, verify and write the manifest (last). `workload`: what the
    artifact is sized for (default batch 1, prompt 128, 64 generated). `before_manifest(dir, body)` may
    add files and manifest fields (the search's plot, the artifact's measured latency). `out` may
    replace only an earlier artifact, and only with `force`; never an input. An artifact that fails
    its flow's parity limit, or whose legalisation costs more than `MAX_LEGALIZE_LOSS`, is not
    written unless `accept_parity_loss` (then the manifest says so)."""
    from profilers.workload import Workload

    workload = workload or Workload()
    if flow.name not in target.get("flows", []):
        raise UserError(f"flow {flow.name!r} is not available on target {target['name']!r} (it has: "
                        f"{', '.join(target.get('flows', []))})")
    shape = elastic.strategy.resolve(shape)
    prepared = prepare(elastic, shape, flow, target, dtype=dtype, layout=layout, strict=strict)
    dense, report, quant = prepared.dense, prepared.report, prepared.quant
    elastic.release()  # what legalize measured: the export streams, and needs none of it
    accepted: list[str] = []  # what --accept-parity-loss let through, for the manifest
    failure = legalize_failure(report, flow, shape)
    if failure is not None and not accept_parity_loss:
        raise LegalizeLoss(failure)
    if failure is not None:
        accepted.append(f"legalize: {failure}")
    with atomic_dir(out, ours=is_artifact, force=force, protect=(elastic.dir, strategy_dir, adapter_dir)) as tmp:
        emitted, built = write_artifact(flow, dense, tmp, elastic.dir, target, quant=quant, workload=workload,
                                        build=build)
        parity = None
        if check:
            # The reference is what legalize made (the elastic model the dense model came from, with any
            # re-selection or dropped biases), so this checks the export exactly; legalize's own cost
            # was measured and judged above.
            parity = verify(prepared.reference, shape, lambda: flow.load(tmp))
            parity.update(parity_limits(flow, quant, dense, elastic.adapter is not None, elastic.compute))
            fmt = quant or str(dense.dtype).removeprefix("torch.")
            failure = parity_failure(parity, fmt)
            if failure is not None and not accept_parity_loss:
                raise UserError(f"parity check failed for {flow} at {shape}: {failure}; nothing was written "
                                "(--accept-parity-loss ships it anyway and records that in the manifest)")
            if failure is not None:
                accepted.append(f"parity: {failure}")
            if parity["greedy_token_agreement"] < 0.9:
                parity["warning"] = (
                    f"{fmt} changes {1 - parity['greedy_token_agreement']:.0%} of the greedy tokens on "
                    "the verify prompt against the masked reference of the exported model; the "
                    "accuracy table scores the unquantised model, so measure this format's accuracy "
                    "before shipping it, or choose a wider format with --dtype"
                )
        body = {
            "flow": flow.name,
            "target": target,
            "shape": str(shape),
            "dtype": quant or str(dense.dtype).removeprefix("torch."),
            "workload": workload.to_json(),
            "model": elastic.info,
            "inputs": hash_inputs({"model": elastic.dir, "strategy": strategy_dir, "adapter": adapter_dir}),
            # a strategy or adapter made for other weights, used by --allow-other-weights: role -> its fingerprint
            "allowed_other_weights": dict(elastic.other_weights) or None,
            "layers": [vars(s) for s in dense.layers],
            "parameters": dense.parameters(),
            "materialize": {**{k: v for k, v in dense.record.items() if k != "legalize"},
                            **({flow.name: emitted.record} if emitted.record is not None else {})},
            "legalize": report.to_json(),
            "uniform": dense.uniform,
            "emitted": emitted.files,
            "engine": built,
            "parity": parity,
            "accepted_parity_loss": accepted or None,
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


def latency_table(elastic: ElasticModel, target: dict, flow: Flow, workload, strategy_dir: Path | None,
                  plans: Plans, threads: int | None, notice: Callable[[str], None], *, command: str,
                  measurable: bool, tables: Path | None = None, correct: bool = True):
    """The table for target × flow × model × workload (× variant): the user's or the shipped one,
    spot-checked here when it was measured on other hardware (`correct`); else measured here (this
    machine can: `measurable`), or estimated. `command` measures it on the device. Tables are
    written under `tables` (default: the user's tables folder), never into the package."""
    from profilers.profile import profile_table
    from profilers.tables import (
        LatencyTable,
        build_estimated,
        hardware_differences,
        hardware_fingerprint,
        strategy_fingerprint,
    )

    from .feedback import SPOT_SHAPES, rescaled, spot_check

    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    sfp = strategy_fingerprint(strategy_dir)
    args = (target["name"], flow.name, elastic.info["name"], workload)
    path = LatencyTable.path(*args, root=tables, variant=plans.variant)  # where a table made here goes
    found = LatencyTable.find(*args, root=tables, variant=plans.variant)
    on_device = "" if target["name"] == "host" else f" on the {target['name']}"
    if found is not None:
        table = LatencyTable.load(found)
        table.check(model, sfp, plans.shapes)
        if table.source == "estimated" and measurable:
            notice(f"latency table {found} is ESTIMATED (roofline) and this machine can measure it: profiling now "
                   f"(the same as `{command}`)")
        elif table.source == "estimated":
            notice(f"latency table {found} is ESTIMATED (roofline); measure it{on_device} with: {command}")
            return table, found
        else:
            here = hardware_fingerprint(target)
            diffs = hardware_differences(table.provenance.get("hardware"), here) if target["name"] == "host" else []
            if not diffs:
                return table, found
            if not (measurable and correct):
                notice(
                    f"latency table {found} was measured on other hardware ({'; '.join(diffs)}): its predictions may "
                    f"not hold here; re-measure with: {command}"
                )
                return table, found
            notice(f"latency table {found} was measured on other hardware ({'; '.join(diffs)}): spot-checking "
                   f"{SPOT_SHAPES} shapes here")
            check = spot_check(table, shape_timer(elastic, plans, flow, workload, target,
                                                  threads or table_threads(table), notice))
            if check.noisy:
                notice(f"spot check taken while other processes held the cores ({check.describe()}): not acted on; "
                       f"re-measure when the machine is idle with: {command}")
                return table, found
            if check.consistent:
                new = rescaled(table, check, here, str(found))
                new.save(path)
                notice(f"spot check: {check.describe()}; one factor explains them, so the table is rescaled by "
                       f"x{check.factor:.2f} for this machine -> {path}")
                return new, path
            notice(f"spot check: {check.describe()}; no single factor explains them, so this machine is re-profiled "
                   f"(the same as `{command}`)")
    elif measurable:
        notice(f"no latency table for {target['name']}/{flow}/{workload.key()}: profiling this machine now "
               f"(the same as `{command}`)")
    if measurable:
        return profile_table(elastic, target, flow, workload, strategy_dir=strategy_dir, threads=threads,
                             plans=plans.shapes, quant=plans.quant, variant=plans.variant, root=tables, notice=notice)
    table = build_estimated(plans.shapes, target=target, flow=flow.name, model=model, strategy=sfp, workload=workload,
                            fmt=plans.fmt)
    table.save(path)
    notice(f"no measured latency table for {target['name']}/{flow}: using an ESTIMATED roofline table ({path}); "
           f"measure it{on_device} with: {command}")
    return table, path


def shape_timer(elastic: ElasticModel, plans: Plans, flow: Flow, workload, target: dict, threads: int | None,
                notice: Callable[[str], None]) -> Callable[[Shape], dict]:
    """Time a planned shape here as `profile` does (exported to scratch, built as for the table): what
    the spot check and the feedback rounds measure."""
    from profilers.profile import measure_shape

    return lambda shape: measure_shape(plans.shapes[shape], flow, workload, elastic.dir, quant=plans.quant,
                                       threads=threads, target=target, notice=notice)


def table_threads(table) -> int | None:
    """The thread count a measured table was timed with, so the artifact is measured the same way."""
    counts = {e["measured"].get("threads") for e in table.entries.values() if "measured" in e}
    return counts.pop() if len(counts) == 1 else None


def accuracy_table(elastic: ElasticModel, strategy_dir: Path, notice: Callable[[str], None],
                   adapter_dir: Path | None = None):
    """The accuracy table of the strategy (and adapter: an adapter changes accuracy, so its tables
    are kept apart, keyed by the adapter's fingerprint in the file name)."""
    from .adapter import adapter_fingerprint
    from .score import AccuracyTable, EvalConfig, default_path, score_shapes, scored_tables, strategy_fingerprint

    afp = adapter_fingerprint(adapter_dir) if adapter_dir is not None else None
    mfp = elastic.info["fingerprint"] if "strategy" in elastic.other_weights else None  # --allow-other-weights
    path = default_path(strategy_dir, adapter=afp, model=mfp)
    # The default eval set's table, else any complete table scored on the strategy (e.g. a shipped
    # one scored on a smaller eval set), else score now.
    for candidate in [path] + [p for p in scored_tables(strategy_dir, afp, mfp) if p != path]:
        if candidate.is_file():
            table = AccuracyTable.load(candidate, elastic.info["fingerprint"], strategy_fingerprint(strategy_dir))
            if set(table.entries) >= set(elastic.strategy.space):
                return table
    notice(f"no accuracy table for the strategy: scoring every shape now (resumable; `amoeba-export score`) -> {path}")
    return score_shapes(elastic, list(elastic.strategy.space), EvalConfig(), path, strategy_dir=strategy_dir)


def compile_budget(elastic: ElasticModel, target: dict, flow: Flow, workload, budget_s: float, out: Path | None, *,
                   memory_budget: int | None = None, dtype: str | None = None, threads: int | None = None,
                   dry_run: bool = False, check: bool = True, strategy_dir: Path | None = None,
                   adapter_dir: Path | None = None, layout: str = "auto", strict: bool = False, build: bool = True,
                   notice: Callable[[str], None] = print, force: bool = False, accept_parity_loss: bool = False,
                   tables: Path | None = None, feedback: bool = True) -> dict:
    """score (cached) → latency table (stored, spot-checked, profiled or estimated) → search → compile
    → measure, and with `feedback`, correct and pick again when the artifact measures over budget."""
    from profilers.profile import cannot_measure, time_artifact
    from profilers.tables import profile_command

    from .feedback import Feedback, OverBudget
    from .search import plot_pareto, search

    plans = legal_plans(elastic, flow, target, dtype=dtype, layout=layout, strict=strict)  # user errors first
    acc = accuracy_table(elastic, strategy_dir, notice, adapter_dir)
    command = profile_command(target, flow.name, plans.fmt, workload)  # what measures this table (on the device)
    measurable = cannot_measure(target, flow) is None
    table, table_path = latency_table(elastic, target, flow, workload, strategy_dir, plans, threads, notice,
                                      command=command, measurable=measurable, tables=tables, correct=feedback)
    latency = table.as_mapping()
    mem = {s: memory_bytes(d, workload, plans.quant) for s, d in plans.shapes.items()} if memory_budget else None
    refused: set[Shape] = set()  # shapes the flow cannot run without too much accuracy lost (LegalizeLoss)

    def pick(lat: dict):
        return search({s: v for s, v in acc.scores().items() if s not in refused}, lat, budget_s, mem, memory_budget)

    result = pick(latency)
    summary = {
        "target": target["name"], "flow": flow.name, "workload": workload.to_json(), "budget_s": budget_s,
        "memory_budget": memory_budget, "shape": str(result.shape), "predicted_latency_s": result.latency_s,
        "score": result.score, "score_definition": "-log(held-out perplexity)", "table": str(table_path),
        "table_source": table.source, "table_validation": table.validation, "search": result.as_dict(),
        "parameters": plans.shapes[result.shape].parameters(), "measured_latency_s": None, "out": None,
        "measure_command": None if table.source == "measured" else command,
    }
    if dry_run:
        return summary
    threads = threads or table_threads(table)
    loop = Feedback(budget_s, latency, enabled=feedback and measurable)

    def finish(tmp: Path, body: dict) -> None:
        measured = None
        if measurable:
            def timed() -> dict:
                return time_artifact(tmp, flow, workload, threads=threads, target=target, notice=notice)

            measured = loop.confirm(timed(), timed) if loop.enabled else timed()
            if loop.can_act() and not loop.rounds and not measured["noisy"] and loop.over(measured["median"]):
                raise OverBudget(measured)  # discards this artifact: feedback picks again
        plot_pareto(tmp / "pareto.png", acc.scores(), loop.corrected(), budget_s, result.shape,
                    f"{elastic.info['name']} on {target['name']} ({flow}, {workload.key()})", "-log(ppl)")
        summary["measured_latency_s"] = measured["median"] if measured else None
        if measured:
            summary["measure_warnings"] = list(measured["environment"].get("warnings") or [])
            if measured["noisy"]:
                summary["measure_warnings"].append(
                    f"other processes kept {measured['other_load']:.1f} CPUs busy while the artifact was timed: the "
                    "measurement is slower than the machine is")
            if loop.over(measured["median"]):
                summary["measure_warnings"].append(
                    f"the artifact measured {measured['median'] * 1e3:.1f} ms against a {budget_s * 1e3:.1f} ms budget "
                    f"(predicted {result.latency_s * 1e3:.1f} ms)" + (
                        f" after {len(loop.rounds)} feedback rounds" if loop.rounds else
                        "" if loop.enabled else "; feedback is off") +
                    f": if the machine is busy, re-measure when idle; if not, re-profile: {command}")
        body["latency"] = {"metric": workload.metric, "workload": workload.to_json(), "budget_s": budget_s,
                           "predicted_s": result.latency_s, "table": str(table_path), "table_source": table.source,
                           "table_validation": table.validation, "measured": measured, "feedback": loop.to_json()}
        body["search"] = result.as_dict()

    measure = shape_timer(elastic, plans, flow, workload, target, threads, notice)
    while True:
        dest = Path(out or f"out/{target['name']}-{flow}-{result.shape}")
        try:
            res = compile_shape(elastic, result.shape, flow, target, dest, dtype=dtype, check=check,
                                strategy_dir=strategy_dir, adapter_dir=adapter_dir, layout=layout, strict=strict,
                                build=build, workload=workload, before_manifest=finish, force=force,
                                accept_parity_loss=accept_parity_loss)
            break
        except OverBudget as e:
            result = loop.repick(pick, measure, result, e.measured["median"], notice)
        except LegalizeLoss as e:
            refused.add(result.shape)
            notice(f"{e.reason}: searching again without it")
            try:
                result = pick(loop.corrected())
            except UserError as nothing:
                raise UserError(f"{nothing} ({flow} cannot run {', '.join(map(str, sorted(refused)))} without losing "
                                "more accuracy than allowed)") from None
    summary.update(shape=str(result.shape), predicted_latency_s=result.latency_s, score=result.score,
                   search=result.as_dict(), parameters=plans.shapes[result.shape].parameters(), out=str(dest),
                   feedback=loop.to_json())
    summary["dtype"] = res.manifest["dtype"]
    summary["legalize"] = res.manifest["legalize"]
    summary["engine"] = res.manifest["engine"]
    summary["parity"] = res.manifest["parity"]
    return summary
