"""Latency tables: per target × flow × model × workload, measured on the device or estimated.

A measured table is built from a few end-to-end measurements of exported shapes, through a
per-component model

    latency ≈ fixed + Σ_kept layers (per_layer + per_query_head·h + per_kv_head·kv + per_channel·I)

fitted by non-negative least squares (`FEATURES`), then checked against measurements of *other* shapes: the
table carries those validation figures (median absolute error, share within ±10%), so a user sees
how far to trust a prediction. An estimated table comes from the roofline (profilers/roofline.py)
and says so everywhere. Files: `<target>/<flow>/<model>/<workload>.json` under the user's tables
folder (written) or the package's `latency_tables/` (shipped, read-only); never pickle.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from amoeba_export.errors import UserError
from amoeba_export.io import dumps_json, read_json, write_text_atomic
from amoeba_export.locations import SHIPPED_TABLES, tables_dir
from amoeba_export.shapes import Shape

from .workload import Workload

SCHEMA = 1
FEATURES = ("fixed", "per_layer", "per_query_head", "per_kv_head", "per_channel")


def features(dense) -> list[float]:
    """The per-component model's inputs for a dense shape (what actually runs, padding included)."""
    L = dense.layers
    return [
        1.0,
        float(len(L)),
        float(sum(s.n_heads for s in L)),
        float(sum(s.n_kv_heads for s in L)),
        float(sum(s.n_ff for s in L)),
    ]


def fit(X: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares (a simple active set: drop the most negative term, refit).

    Every term is a real cost, so none may be negative; with features as correlated as layers,
    heads and channels of real shapes, plain least squares trades a negative term for a larger one
    and extrapolates badly. Columns are scaled first so the solve is well conditioned.
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    scale = np.abs(X).max(0)
    scale[scale == 0] = 1
    A = X / scale
    cols = list(range(A.shape[1]))
    while True:
        c, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
        if (c >= 0).all() or len(cols) == 1:
            coef = np.zeros(A.shape[1])
            coef[cols] = np.maximum(c, 0)
            return (coef / scale).tolist()
        cols.pop(int(np.argmin(c)))


def predict(coef: list[float], x: list[float]) -> float:
    return float(np.dot(coef, x))


def validation_figures(predicted: list[float], measured: list[float]) -> dict:
    err = np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured)
    return {"n": len(err), "median_abs_rel_error": float(np.median(err)) if len(err) else None,
            "max_abs_rel_error": float(err.max()) if len(err) else None,
            "within_10pct": float((err <= 0.10).mean()) if len(err) else None}


def profile_command(target: dict, flow: str, fmt: str | None = None, workload: Workload | None = None) -> str:
    """The one command that measures this table (run on the device for a named target)."""
    cmd = f"amoeba-export profile --target {target['name']} --flow {flow}"
    if fmt:
        cmd += f" --dtype {fmt}"
    default = Workload()
    for name in ("batch", "prompt_len", "gen_len", "metric"):
        if workload is not None and getattr(workload, name) != getattr(default, name):
            cmd += f" --{name.replace('_', '-')} {getattr(workload, name)}"
    return cmd


def strategy_fingerprint(strategy_dir: Path | None) -> str | None:
    """The strategy's fingerprint (as the accuracy table records it), None without a strategy."""
    from amoeba_export.score import strategy_fingerprint as fingerprint

    return None if strategy_dir is None else fingerprint(strategy_dir)


# How far the host's measured copy bandwidth may move before its tables count as from other hardware
# (the probe's run-to-run spread on one idle machine is a few percent; a different memory system or
# a busy neighbour moves it by more).
BANDWIDTH_TOLERANCE = 0.25
SAME_HARDWARE = ("cpu", "cpu_flags", "cores", "arch", "memory_gib", "gpu")


def hardware_fingerprint(target: dict) -> dict:
    """What a table's latencies depend on: CPU model and flags, cores, memory (GiB, rounded: two
    machines of one type differ by a few KiB), GPU, and the measured memory bandwidth."""
    out = {k: target.get(k) for k in ("name", "cpu", "cpu_flags", "cores", "arch") if target.get(k) is not None}
    if target.get("memory_bytes"):
        out["memory_gib"] = round(target["memory_bytes"] / 2**30)
    gpu = target.get("gpu")
    if isinstance(gpu, dict):
        out["gpu"] = {"name": gpu.get("name"), "arch": gpu.get("arch")}
    if target.get("bandwidth_gbs") is not None:
        out["bandwidth_gbs"] = target["bandwidth_gbs"]
    return out


def hardware_differences(recorded: dict | None, now: dict) -> list[str]:
    """How the machine a table was measured on differs from `now` (both `hardware_fingerprint`s), in
    words; [] when it is the same machine type. What a table does not record counts as different."""
    if not recorded:
        return ["the table records no hardware"]
    out = []
    for k in SAME_HARDWARE:
        a, b = recorded.get(k), now.get(k)
        if a != b:
            out.append(f"{k.replace('_', ' ')} {'not recorded' if a is None else a} (here {b})" if k != "cpu_flags"
                       else ("CPU flags not recorded" if a is None else "CPU flags differ"))
    a, b = recorded.get("bandwidth_gbs"), now.get("bandwidth_gbs")
    if a is None and b is not None:
        out.append("memory bandwidth not recorded")
    elif b is not None and abs(b / a - 1) > BANDWIDTH_TOLERANCE:
        out.append(f"memory bandwidth {a:g} GB/s (here {b:g})")
    return out


@dataclass
class LatencyTable:
    target: str
    flow: str
    model: dict  # name, fingerprint
    strategy: str | None
    workload: dict
    source: str  # "measured" | "estimated"
    entries: dict[str, dict]  # shape -> {"predicted": s, "measured": {median, p10, p90, samples, ...}?}
    component: dict = field(default_factory=dict)  # {"features", "coef", "fit_shapes"}
    validation: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    schema: int = SCHEMA

    def latency(self, shape: Shape) -> float:
        """Measured median where measured, else the model's prediction (seconds)."""
        e = self.entries[str(shape)]
        return e["measured"]["median"] if "measured" in e else e["predicted"]

    def as_mapping(self) -> dict[Shape, float]:
        return {Shape.parse(k): self.latency(Shape.parse(k)) for k in self.entries}

    @staticmethod
    def path(target: str, flow: str, model_name: str, workload: Workload, root: Path | None = None,
             variant: str | None = None) -> Path:
        """Where the table is written: under `root` (`--tables`), else the user's tables folder
        (locations.tables_dir). `variant` names an artifact other than the flow's default (another
        dtype or layout)."""
        return tables_dir(root) / LatencyTable.relative(target, flow, model_name, workload, variant)

    @staticmethod
    def relative(target: str, flow: str, model_name: str, workload: Workload, variant: str | None = None) -> Path:
        return Path(target) / flow / model_name / f"{workload.key()}{'-' + variant if variant else ''}.json"

    @staticmethod
    def find(target: str, flow: str, model_name: str, workload: Workload, root: Path | None = None,
             variant: str | None = None) -> Path | None:
        """The table to read: the user's (written by profile or an earlier run), else the one shipped
        in the package; None when neither exists."""
        rel = LatencyTable.relative(target, flow, model_name, workload, variant)
        for base in (tables_dir(root), SHIPPED_TABLES):
            if (base / rel).is_file():
                return base / rel
        return None

    def save(self, path: Path) -> None:
        write_text_atomic(path, dumps_json(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        """Read a table, checked as data: every latency a positive finite number of seconds."""
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise UserError(f"corrupt latency table {path}: expected a JSON object")
        if doc.get("schema") != SCHEMA:
            raise UserError(f"latency table {path} has schema {doc.get('schema')}; this version reads {SCHEMA}")
        try:
            table = cls(**doc)
        except TypeError as e:
            raise UserError(f"corrupt latency table {path}: {e}") from None
        problem = _invalid(table)
        if problem:
            raise UserError(f"corrupt latency table {path}: {problem}; re-measure it with `amoeba-export profile` "
                            "or delete the file")
        return table

    def check(self, model: dict, strategy: str | None, shapes=None) -> None:
        """Refuse a table for another model or strategy, or one that does not list exactly `shapes`."""
        if self.model.get("fingerprint") != model.get("fingerprint") or (
            strategy and self.strategy and self.strategy != strategy
        ):
            raise UserError("stale latency table for another model or strategy: rerun `amoeba-export profile`")
        if shapes is not None:
            want, have = {str(s) for s in shapes}, set(self.entries)
            if want != have:
                diff = sorted(want - have) or sorted(have - want)
                raise UserError(f"latency table for {self.target}/{self.flow} does not match the strategy's shapes "
                                f"({'lacks' if want - have else 'has extra'} {', '.join(diff[:4])}"
                                f"{' ...' if len(diff) > 4 else ''}): rerun `amoeba-export profile`")


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _invalid(table: LatencyTable) -> str | None:
    """What makes a loaded table unusable as data, or None."""
    if table.source not in ("measured", "estimated"):
        return f"source is {table.source!r}, not measured or estimated"
    if not isinstance(table.entries, dict) or not table.entries:
        return "no entries"
    for key, e in table.entries.items():
        try:
            Shape.parse(key)
        except UserError:
            return f"entry {key!r} is not a shape"
        predicted = e.get("predicted") if isinstance(e, dict) else e
        if not _seconds(predicted):
            return f"entry {key}: predicted latency {predicted!r} is not a positive number of seconds"
        m = e.get("measured")
        median = m.get("median") if isinstance(m, dict) else m
        if m is not None and not _seconds(median):
            return f"entry {key}: measured median {median!r} is not a positive number of seconds"
    return None


def fit_and_validate_shapes(space, n_validate: int, seed: int = 0) -> tuple[list[Shape], list[Shape]]:
    """A small spread of shapes to fit (corners, middle) and a disjoint random sample to validate."""
    depths, widths = sorted(space.depths), sorted(space.widths)
    d_mid, w_mid = depths[len(depths) // 2], widths[len(widths) // 2]
    fit_set = []
    for s in (Shape(depths[0], widths[0]), Shape(depths[0], widths[-1]), Shape(depths[-1], widths[0]),
              Shape(depths[-1], widths[-1]), Shape(d_mid, w_mid), Shape(d_mid, widths[0]), Shape(depths[0], w_mid),
              Shape(depths[-1], w_mid)):
        if s not in fit_set:
            fit_set.append(s)
    rest = [s for s in space if s not in fit_set]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(rest), min(n_validate, len(rest)), replace=False).tolist())
    return fit_set, [rest[i] for i in pick]


# A machine whose timings drift from one shape's measurement to the next (a VM sharing its host)
# shows it in the validation. Above this median |error|, with `passes` > 1 (`profile --passes N`),
# every shape is measured again, in reverse order, and the samples pooled (docs/budgets.md).
REPEAT_ERROR = 0.10


def pool_timings(a: dict, b: dict) -> dict:
    """Two timing records of one shape as one: samples pooled, statistics recomputed, the environment
    of the first, the worst load of either."""
    from .timing import Timing

    t = Timing.from_samples(a["samples"] + b["samples"], stop_reason=b.get("stop_reason", "stable"),
                            warmup=a.get("warmup", 0), timer=a.get("timer", "perf_counter")).to_dict()
    loads = [x["other_load"] for x in (a, b) if x.get("other_load") is not None]
    return {**a, **t, "other_load": max(loads) if loads else None, "noisy": bool(a.get("noisy") or b.get("noisy")),
            "passes": a.get("passes", 1) + b.get("passes", 1)}


def build_measured(plans: dict[Shape, object], measure: Callable[[Shape], dict], *, target: dict, flow: str,
                   model: dict, strategy: str | None, workload: Workload, n_validate: int = 10,
                   measure_all: bool = False, checkpoint: Path | None = None, progress: bool = True,
                   notice: Callable[[str], None] | None = None, passes: int = 1) -> LatencyTable:
    """Measure the fit shapes (and validation shapes, or every shape), fit, predict the rest.

    `plans` maps every shape to its DenseModel plan (for features); `measure(shape)` returns the
    timing record of the workload's metric ({median, p10, p90, samples, ...}, seconds). With a
    checkpoint, every measurement is saved at once and reused by a rerun with the same settings.
    When the fit misses the validation shapes by more than REPEAT_ERROR (median), the machine's
    timings are drifting: with `passes` > 1 every shape is measured again (up to `passes` times in
    all) and the samples pooled; with one pass, the notice says so.
    """
    from tqdm import tqdm

    from amoeba_export.shapes import ShapeSpace

    space = ShapeSpace(tuple(sorted({s.depth for s in plans})), tuple(sorted({s.width for s in plans})))
    fit_set, val_set = fit_and_validate_shapes(space, n_validate)
    todo = list(space) if measure_all else fit_set + val_set
    settings = {"target": target["name"], "flow": flow, "model": model.get("fingerprint"), "strategy": strategy,
                "workload": workload.to_json()}
    hardware = hardware_fingerprint(target)
    done: dict[str, dict] = {}
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            saved = read_json(checkpoint)
            if saved.get("settings") == json.loads(json.dumps(settings)) and not hardware_differences(
                saved.get("hardware"), hardware
            ):
                done = {k: v for k, v in saved["measured"].items() if isinstance(v, dict) and _seconds(v.get("median"))}
        except (UserError, AttributeError, TypeError) as e:  # an unreadable checkpoint is measured again
            if notice is not None:
                notice(f"unreadable profiling checkpoint {checkpoint} ({e}): measuring every shape again")
    def save():
        if checkpoint is not None:
            write_text_atomic(checkpoint, json.dumps({"settings": settings, "hardware": hardware, "measured": done}))

    bar = tqdm(todo, desc=f"profiling {flow} on {target['name']}", unit="shape", disable=not progress)
    for shape in bar:
        if str(shape) in done:
            continue
        done[str(shape)] = measure(shape)
        save()
    checked = [s for s in (list(space) if measure_all else val_set) if s not in fit_set]
    coef, entries, validation = _fitted(plans, fit_set, checked, done)
    done_passes = 1
    while done_passes < passes and (validation["median_abs_rel_error"] or 0) > REPEAT_ERROR:
        done_passes += 1
        if notice is not None:
            notice(f"the fit misses the validation shapes by {validation['median_abs_rel_error']:.0%} (median): this "
                   f"machine's timings drift, so every shape is measured again and the samples pooled (pass "
                   f"{done_passes} of {passes})")
        for shape in tqdm(
            list(reversed(todo)), desc=f"profiling pass {done_passes}", unit="shape", disable=not progress
        ):
            done[str(shape)] = pool_timings(done[str(shape)], measure(shape))
            save()
        coef, entries, validation = _fitted(plans, fit_set, checked, done)
    error = validation["median_abs_rel_error"]
    if error is not None and error > REPEAT_ERROR and notice is not None:
        notice(f"the fit misses the validation shapes by {error:.0%} (median) after {done_passes} pass"
               f"{'es' if done_passes > 1 else ''}: this machine's timings drift, and predictions carry that error"
               + ("; `amoeba-export profile --passes 3` measures every shape three times and pools them"
                  if done_passes == 1 else ""))
    validation.update(shapes=[str(s) for s in checked], passes=done_passes)
    table = LatencyTable(
        target=target["name"],
        flow=flow,
        model=model,
        strategy=strategy,
        workload=workload.to_json(),
        source="measured",
        entries=entries,
        component={"features": list(FEATURES), "coef": coef, "fit_shapes": [str(s) for s in fit_set]},
        validation=validation,
        provenance=_provenance(target, done),
    )
    return table


def _fitted(plans: dict, fit_set: list[Shape], checked: list[Shape], done: dict) -> tuple[list[float], dict, dict]:
    """(the per-component model fitted on `fit_set`, every shape's entry, the validation figures on
    `checked`) from the measurements `done`."""
    coef = fit([features(plans[s]) for s in fit_set], [done[str(s)]["median"] for s in fit_set])
    entries = {}
    for shape, dense in plans.items():
        e = {"predicted": predict(coef, features(dense))}
        if str(shape) in done:
            e["measured"] = done[str(shape)]
        entries[str(shape)] = e
    validation = validation_figures([entries[str(s)]["predicted"] for s in checked],
                                    [done[str(s)]["median"] for s in checked])
    return coef, entries, validation


def build_estimated(plans: dict[Shape, object], *, target: dict, flow: str, model: dict, strategy: str | None,
                    workload: Workload, fmt: str | None = None) -> LatencyTable:
    from .roofline import estimate

    entries, detail = {}, None
    for shape, dense in plans.items():
        seconds, detail = estimate(dense, target, flow, workload, fmt)
        entries[str(shape)] = {"predicted": seconds}
    detail = {k: v for k, v in (detail or {}).items() if k not in ("seconds", "tpot_bytes", "tpot_bound", "ttft_bound")}
    return LatencyTable(
        target=target["name"],
        flow=flow,
        model=model,
        strategy=strategy,
        workload=workload.to_json(),
        source="estimated",
        entries=entries,
        component={"roofline": detail},
        validation={
            "note": f"estimated, not measured: run `{profile_command(target, flow, fmt, workload)}` on the device"
        },
        provenance=_provenance(target, {}),
    )


def _provenance(target: dict, measured: dict) -> dict:
    from amoeba_export.manifest import versions

    env = next((m.get("environment") for m in measured.values() if m.get("environment")), None)
    return {
        "hardware": hardware_fingerprint(target),
        "environment": env,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["amoeba-export"] + sys.argv[1:]),
    }
