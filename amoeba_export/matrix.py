"""`amoeba-export matrix FILE.toml`: a list of (target, flow, budget) artifacts built in one run, for CI.

The file names the artifacts; each row is the main command's options:

    dist = "dist"                     # optional: where the artifacts go (--out overrides)
    [defaults]                        # optional: applied to every row
    budget = "40ms"
    [[artifact]]
    target = "jetson-orin"
    flow = "mlc"
    budget = "40ms"                   # or shape = "24x0.75" (no search)
    runner = "hosted"                 # who builds it: "hosted" (export-only, any machine) or a device
                                      # label (e.g. "jetson-orin"): that runner profiles and builds
    # optional: name, dtype, layout, memory, metric, batch, prompt_len, gen_len

Every row is checked before anything runs (a bad row is one line, exit code 2, nothing built). Each
artifact goes into `DIST/<name>/` with its manifest; a failing row does not stop the others. The run
ends with `DIST/summary.md` (a Markdown table: target, flow, shape, parameters, predicted and measured
latency, whether the table was estimated or measured) and `DIST/summary.json`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from profilers.workload import Workload

from .errors import UserError
from .flows import Flow
from .io import dumps_json, write_text_atomic
from .shapes import Shape

KEYS = {"name", "target", "flow", "budget", "shape", "runner", "dtype", "layout", "memory", "metric", "batch",
        "prompt_len", "gen_len"}
HOSTED = "hosted"


@dataclass
class Row:
    name: str
    target: str
    flow: Flow  # resolved once, when the matrix is read
    runner: str = HOSTED
    budget_s: float | None = None
    shape: Shape | None = None
    memory: int | None = None
    dtype: str | None = None
    layout: str = "auto"
    workload: Workload = field(default_factory=Workload)

    def options(self) -> str:
        what = f"--shape {self.shape}" if self.shape else f"--budget {self.budget_s * 1e3:g}ms"
        return f"--target {self.target} --flow {self.flow} {what}"


def load(path: Path) -> tuple[list[Row], str | None]:
    """(rows, the file's dist folder) from a matrix file; every mistake is a UserError naming the row."""
    from targets import load_target

    from .flows import get_flow
    from .legalize import LAYOUTS
    from .search import parse_bytes, parse_time

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing matrix file {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"matrix file {path}: not valid TOML ({e})") from None
    unknown = set(data) - {"dist", "defaults", "artifact"}
    if unknown:
        raise UserError(
            f"matrix file {path}: unknown key(s) {', '.join(sorted(unknown))} (expected dist, defaults, artifact)"
        )
    items = data.get("artifact")
    if not isinstance(items, list) or not items:
        raise UserError(f"matrix file {path}: no [[artifact]] rows")
    rows, names = [], set()
    for i, item in enumerate(items, 1):
        where = f"matrix file {path}, artifact {i}"
        item = {**data.get("defaults", {}), **item}
        bad = set(item) - KEYS
        if bad:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(KEYS))})")
        for key in ("target", "flow"):
            if not isinstance(item.get(key), str):
                raise UserError(f"{where}: '{key}' is required (a string)")
        if ("budget" in item) == ("shape" in item):
            raise UserError(f"{where}: give exactly one of 'budget' or 'shape'")
        try:
            target = load_target(item["target"])
            flow = get_flow(item["flow"])
            if flow.name not in target["flows"]:
                raise UserError(f"flow {item['flow']!r} is not available on target {item['target']!r} "
                                f"(it has: {', '.join(target['flows'])})")
            wl = Workload(**{k: item[k] for k in ("batch", "prompt_len", "gen_len", "metric") if k in item})
            if item.get("layout", "auto") not in LAYOUTS:
                raise UserError(f"unknown layout {item['layout']!r}: choose one of {', '.join(LAYOUTS)}")
            row = Row(
                name=str(item.get("name") or _name(item)), target=item["target"], flow=flow,
                runner=str(item.get("runner", HOSTED)),
                budget_s=parse_time(str(item["budget"]), "budget") if "budget" in item else None,
                shape=Shape.parse(str(item["shape"])) if "shape" in item else None,
                memory=parse_bytes(str(item["memory"]), "memory") if "memory" in item else None,
                dtype=item.get("dtype"), layout=item.get("layout", "auto"), workload=wl,
            )
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if row.name in names:
            raise UserError(f"{where}: two rows are named {row.name!r}: give one a 'name'")
        names.add(row.name)
        rows.append(row)
    dist = data.get("dist")
    if dist is not None and not isinstance(dist, str):
        raise UserError(f"matrix file {path}: 'dist' must be a path string")
    return rows, dist


def _name(item: dict) -> str:
    what = item.get("shape") or str(item.get("budget")).replace(" ", "")
    return "-".join(str(p) for p in (item["target"], item["flow"], what, item.get("dtype")) if p)


def check(rows: list[Row], dist: Path, elastic, *, force: bool = False, protect=()) -> None:
    """Everything about the rows that can be checked without building one: each shape is in the
    strategy's space, each dtype is one the flow writes, and each row's output may be (re)written."""
    from targets import load_target

    from .io import check_destination
    from .manifest import is_artifact
    from .pipeline import split_dtype

    for k, row in enumerate(rows, 1):
        try:
            if row.shape is not None:
                elastic.strategy.resolve(row.shape)
            split_dtype(row.dtype, load_target(row.target), row.flow)
            check_destination(Path(dist) / row.name, ours=is_artifact, force=force, protect=protect)
        except UserError as e:
            raise UserError(f"matrix row {k} ({row.name}): {e}") from None


def run(rows: list[Row], dist: Path, elastic, strategy_dir: Path, *, build: bool = True, check: bool = True,
        notice=print, force: bool = False, tables: Path | None = None) -> list[dict]:
    """Build every row into `dist/<name>`; one summary dict per row (with "error" where it failed)."""
    from targets import load_target

    from .pipeline import compile_budget, compile_shape

    results = []
    for k, row in enumerate(rows, 1):
        notice(f"[{k}/{len(rows)}] {row.name}: {row.options()}")
        out = Path(dist) / row.name
        base = {"name": row.name, "target": row.target, "flow": row.flow.name, "runner": row.runner, "out": str(out),
                "budget_s": row.budget_s, "shape": str(row.shape) if row.shape else None}
        wl = row.workload
        try:
            target = load_target(row.target)
            if row.shape is None:  # the search's summary carries what the row reports
                m = searched = compile_budget(
                    elastic,
                    target,
                    row.flow,
                    wl,
                    row.budget_s,
                    out,
                    memory_budget=row.memory,
                    dtype=row.dtype,
                    check=check,
                    strategy_dir=strategy_dir,
                    layout=row.layout,
                    build=build,
                    notice=notice,
                    force=force,
                    tables=tables,
                )
            else:
                searched, m = {}, compile_shape(elastic, row.shape, row.flow, target, out, dtype=row.dtype, check=check,
                                                strategy_dir=strategy_dir, layout=row.layout, build=build,
                                                workload=wl, force=force).manifest
        except UserError as e:
            notice(f"{row.name}: error: {e}")
            results.append({**base, "error": str(e)})
            continue
        result = {
            **base,
            "shape": m["shape"],
            "dtype": m["dtype"],
            "parameters": m["parameters"],
            "metric": wl.metric,
            "predicted_latency_s": searched.get("predicted_latency_s"),
            "measured_latency_s": searched.get("measured_latency_s"),
            "table_source": searched.get("table_source"),
            "measure_command": searched.get("measure_command"),
            "parity": m["parity"],
            "engine": m["engine"],
            "warnings": list(searched.get("measure_warnings") or [])
            + [w for w in [(m["parity"] or {}).get("warning")] if w],
        }
        for w in result["warnings"]:
            notice(f"{row.name}: {w}")
        results.append(result)
    return results


def markdown(results: list[dict]) -> str:
    """The summary table (GitHub-flavoured Markdown)."""
    from .search import format_time

    def ms(v):
        return format_time(v) if v else "-"

    lines = [
        "| artifact | target | flow | dtype | shape | params | metric | predicted | measured | table | greedy "
        "agreement | engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['target']} | {r['flow']} | | failed: {r['error']} | | | | | | | |")
            continue
        engine = r.get("engine") or {}
        built = ", ".join(engine.get("built") or []) or ("script only: run build.sh on the device"
                                                         if engine.get("skipped") else "-")
        parity = f"{r['parity']['greedy_token_agreement']:.0%}" if r.get("parity") else "not checked"
        lines.append(
            f"| {r['name']} | {r['target']} | {r['flow']} | {r['dtype']} | {r['shape']} | "
            f"{r['parameters'] / 1e6:.1f}M | {r['metric']} | {ms(r.get('predicted_latency_s'))} | "
            f"{ms(r.get('measured_latency_s'))} | {r.get('table_source') or '- (fixed shape)'} | {parity} | {built} |"
        )
    commands = sorted({r["measure_command"] for r in results if r.get("measure_command")})
    if commands:
        lines += ["", "Estimated tables: measure each on its device with", ""] + [f"    {c}" for c in commands]
    return "\n".join(lines) + "\n"


def write_summary(results: list[dict], dist: Path) -> Path:
    write_text_atomic(Path(dist) / "summary.json", dumps_json(results))
    path = Path(dist) / "summary.md"
    write_text_atomic(path, markdown(results))
    return path
