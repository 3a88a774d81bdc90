"""Latency tables: per target × flow × model × workload, measured on the device or estimated.

A measured table is built from a few end-to-end measurements of exported shapes, through a
per-component model

    latency ≈ fixed + Σ_kept layers (per_layer + per_query_head·h + per_kv_head·kv + per_channel·I)

fitted by non-negative least squares (`FEATURES`), then checked against measurements of *other* shapes: the
table carries those validation figures (median absolute error, share within ±10%), so a user sees
how far to trust a prediction. An estimated table comes from the roofline (profilers/roofline.py)
and says so everywhere. Files: `latency_tables/<target>/<flow>/<model>/<workload>.json`; never
pickle.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from amoeba_export.errors import UserError
from amoeba_export.io import dumps_json, read_json, write_text_atomic
from amoeba_export.shapes import Shape

from .workload import Workload

SCHEMA = 1
FEATURES = ("fixed", "per_layer", "per_query_head", "per_kv_head", "per_channel")
ROOT = Path(__file__).resolve().parent.parent / "latency_tables"


def features(dense) -> list[float]:
    """The per-component model's inputs for a dense shape (what actually runs, padding included)."""
    L = dense.layers
    return [1.0, float(len(L)), float(sum(s.n_heads for s in L)), float(sum(s.n_kv_heads for s in L)), float(sum(s.n_ff for s in L))]


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


def hardware_fingerprint(target: dict) -> dict:
    keys = ("name", "cpu", "cores", "arch", "gpu", "memory_bytes")
    return {k: target.get(k) for k in keys if target.get(k) is not None}


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
        """`variant` names an artifact other than the flow's default (another dtype or layout)."""
        root = root or Path(os.environ.get("AMOEBA_EXPORT_TABLES") or ROOT)
        return Path(root) / target / flow / model_name / f"{workload.key()}{'-' + variant if variant else ''}.json"

    def save(self, path: Path) -> None:
        write_text_atomic(path, dumps_json(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        doc = read_json(path)
        if doc.get("schema") != SCHEMA:
            raise UserError(f"latency table {path} has schema {doc.get('schema')}; this version reads {SCHEMA}")
        try:
            return cls(**doc)
        except TypeError as e:
            raise UserError(f"corrupt latency table {path}: {e}") from None

    def check(self, model: dict, strategy: str | None) -> None:
        if self.model.get("fingerprint") != model.get("fingerprint") or (strategy and self.strategy and self.strategy != strategy):
            raise UserError("stale latency table for another model or strategy: rerun `amoeba-export profile`")


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


def build_measured(plans: dict[Shape, object], measure: Callable[[Shape], dict], *, target: dict, flow: str,
                   model: dict, strategy: str | None, workload: Workload, n_validate: int = 10,
                   measure_all: bool = False, checkpoint: Path | None = None, progress: bool = True) -> LatencyTable:
    """Measure the fit shapes (and validation shapes, or every shape), fit, predict the rest.

    `plans` maps every shape to its DenseModel plan (for features); `measure(shape)` returns the
    timing record of the workload's metric ({median, p10, p90, samples, ...}, seconds). With a
    checkpoint, every measurement is saved at once and reused by a rerun with the same settings.
    """
    from tqdm import tqdm

    from amoeba_export.shapes import ShapeSpace

    space = ShapeSpace(tuple(sorted({s.depth for s in plans})), tuple(sorted({s.width for s in plans})))
    fit_set, val_set = fit_and_validate_shapes(space, n_validate)
    todo = list(space) if measure_all else fit_set + val_set
    settings = {"target": target["name"], "flow": flow, "model": model.get("fingerprint"), "strategy": strategy,
                "workload": workload.to_json(), "hardware": hardware_fingerprint(target)}
    done: dict[str, dict] = {}
    if checkpoint is not None and Path(checkpoint).is_file():
        with contextlib.suppress(UserError):  # an unreadable checkpoint is measured again
            saved = read_json(checkpoint)
            if saved.get("settings") == json.loads(json.dumps(settings)):
                done = saved["measured"]
    bar = tqdm(todo, desc=f"profiling {flow} on {target['name']}", unit="shape", disable=not progress)
    for shape in bar:
        if str(shape) in done:
            continue
        done[str(shape)] = measure(shape)
        if checkpoint is not None:
            write_text_atomic(checkpoint, json.dumps({"settings": settings, "measured": done}))
    coef = fit([features(plans[s]) for s in fit_set], [done[str(s)]["median"] for s in fit_set])
    entries = {}
    for shape, dense in plans.items():
        e = {"predicted": predict(coef, features(dense))}
        if str(shape) in done:
            e["measured"] = done[str(shape)]
        entries[str(shape)] = e
    checked = [s for s in (list(space) if measure_all else val_set) if s not in fit_set]
    validation = validation_figures([entries[str(s)]["predicted"] for s in checked], [done[str(s)]["median"] for s in checked])
    validation["shapes"] = [str(s) for s in checked]
    table = LatencyTable(
        target=target["name"], flow=flow, model=model, strategy=strategy, workload=workload.to_json(), source="measured",
        entries=entries, component={"features": list(FEATURES), "coef": coef, "fit_shapes": [str(s) for s in fit_set]},
        validation=validation, provenance=_provenance(target, done),
    )
    return table


def build_estimated(plans: dict[Shape, object], *, target: dict, flow: str, model: dict, strategy: str | None,
                    workload: Workload, fmt: str | None = None) -> LatencyTable:
    from .roofline import estimate

    entries, detail = {}, None
    for shape, dense in plans.items():
        seconds, detail = estimate(dense, target, flow, workload, fmt)
        entries[str(shape)] = {"predicted": seconds}
    detail = {k: v for k, v in (detail or {}).items() if k not in ("seconds", "tpot_bytes", "tpot_bound", "ttft_bound")}
    return LatencyTable(
        target=target["name"], flow=flow, model=model, strategy=strategy, workload=workload.to_json(), source="estimated",
        entries=entries, component={"roofline": detail},
        validation={"note": f"estimated, not measured: run `{profile_command(target, flow, fmt, workload)}` on the device"},
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
