"""Search: pick the shape that fits a latency (and memory) budget, and the Pareto front.

Inputs are two per-shape tables that come from different passes: `score` (device-independent,
higher is better, e.g. accuracy) and `latency` (per device, flow and workload, in seconds), plus
optionally a per-shape `memory` figure in bytes. The answer is the best-scoring shape whose
latency is at most the budget.

Two searches run and must agree:

- *Hierarchical* (docs/amoeba-algorithm.md §9): prune whole depths by their fastest variant, then pick a
  width per surviving depth. It needs fewer latency values than there are shapes, which matters
  when each value is a build plus a measurement on a slow device (Jetson). `SearchResult.evaluated`
  says how many it needed.
- *Exhaustive*: argmax over every shape that fits. With 52-60 shapes it is cheap, so it always runs
  as the reference; a disagreement is a bug (`RuntimeError`), never a user error.

Budgets are parsed here too (`parse_time`, `parse_bytes`), because the units rule (a unit is
required, a bare or non-positive number is an error) belongs to the budget, not to the CLI.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

from .errors import UserError
from .io import write_atomic
from .shapes import Shape

# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

_NUMBER_UNIT = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\s\d.+-][^\s]*)?\s*")

# Keys are lower-case: a time unit is unambiguous in any case ("40MS" is not megaseconds to anyone
# typing a latency budget). Both micro signs are accepted: U+00B5 (keyboard) and U+03BC (Greek mu).
_TIME_UNITS = {"s": Decimal(1), "ms": Decimal("1e-3"), "us": Decimal("1e-6"),
               "\u00b5s": Decimal("1e-6"), "\u03bcs": Decimal("1e-6")}

# Memory follows IEC: GiB = 2**30, GB = 10**9 (device spec sheets use GB, runtimes report GiB).
_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def _split_number_unit(text: str, what: str, example: str, kind: str) -> tuple[Decimal, str, str]:
    """Return (value, unit, stripped text) or raise the one-line error for garbage and bare numbers.

    Shared by `parse_time` and `parse_bytes` so both reject the same inputs with the same wording.
    The number stays a Decimal so "0.3ms" scales exactly and rounds once (to 0.0003, not
    0.00030000000000000003).
    """
    if text is None or not str(text).strip():
        raise UserError(f"{what} is empty: give a {kind} with a unit, e.g. {example}")
    text = str(text).strip()
    m = _NUMBER_UNIT.fullmatch(text)
    if not m:
        raise UserError(f"{what} {text!r} is not a {kind}: write a number and a unit, e.g. {example}")
    number, unit = m.group(1), m.group(2)
    if unit is None:
        raise UserError(f"{what} {text!r} needs a unit, e.g. {example}")
    return Decimal(number), unit, text


def parse_time(text: str, what: str = "--budget") -> float:
    """Parse a duration with a required unit ("40ms", "40 ms", "0.04s", "500us", "500µs") to seconds.

    A bare number is refused rather than guessed: "40" could mean 40 ms or 40 s, and guessing wrong
    silently picks a different model. `what` names the option in the error line.
    """
    example = "40ms, 0.04s or 40000us"
    value, unit, text = _split_number_unit(text, what, example, "time")
    scale = _TIME_UNITS.get(unit.lower())
    if scale is None:
        raise UserError(f"{what} {text!r} has an unknown unit {unit!r}: use s, ms or us, e.g. {example}")
    if value <= 0:
        raise UserError(f"{what} {text!r} must be positive, e.g. {example}")
    try:
        seconds = float(value * scale)
    except ArithmeticError:  # decimal overflow on an exponent such as 1e999999999
        seconds = math.inf
    if not 0 < seconds < math.inf:  # an exponent such as 1e999 or 1e-999
        raise UserError(f"{what} {text!r} is out of range, e.g. {example}")
    return seconds


def parse_bytes(text: str, what: str = "--memory") -> int:
    """Parse a memory size with a required unit ("6GiB", "512MiB", "6GB" = 6e9, "1.5 GiB") to bytes.

    GB and GiB differ by 7%, enough to flip a fit on a 8 GB board, so both are accepted and kept
    distinct; a bare number is refused for the same reason as in `parse_time`.
    """
    example = "6GiB, 512MiB or 6GB"
    value, unit, text = _split_number_unit(text, what, example, "size")
    scale = _BYTE_UNITS.get(unit.lower())
    if scale is None:
        raise UserError(f"{what} {text!r} has an unknown unit {unit!r}: use B, KiB, MiB, GiB, "
                        f"KB, MB or GB, e.g. {example}")
    if value <= 0:
        raise UserError(f"{what} {text!r} must be positive, e.g. {example}")
    try:
        exact = value * scale
        too_big = exact > 2**64  # also keeps round() from building a billion-digit int
    except ArithmeticError:  # decimal overflow on an exponent such as 1e999999999
        too_big = True
    if too_big:
        raise UserError(f"{what} {text!r} is out of range, e.g. {example}")
    n = int(round(exact))
    if n < 1:
        raise UserError(f"{what} {text!r} is less than one byte, e.g. {example}")
    return n


def format_time(seconds: float) -> str:
    """Human form of a duration: "850 us", "38.2 ms", "1.20 s" (the unit moves before the digits overflow)."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    us = seconds * 1e6
    if abs(round(us)) < 1000:
        return f"{us:.0f} us"
    ms = seconds * 1e3
    if abs(round(ms, 1)) < 1000:
        return f"{ms:.1f} ms"
    return f"{seconds:.2f} s"


def format_bytes(n: float) -> str:
    """Human form of a size in binary units with 3 significant digits: "512 MiB", "1.3 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 999.5:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


def _suggest_time(seconds: float) -> str:
    """The smallest round budget (in the unit `format_time` would use) that `seconds` fits under."""
    # round() first so 0.007 s (7.000000000000001 ms in floats) suggests 7ms, not 8ms.
    if seconds < 1e-3:
        text, step, unit = f"{math.ceil(round(seconds * 1e6, 6))}", 1, "us"
    elif seconds < 1.0:
        text, step, unit = f"{math.ceil(round(seconds * 1e3, 6))}", 1, "ms"
    else:
        text, step, unit = f"{math.ceil(round(seconds * 10, 6)) / 10:.1f}", 0.1, "s"
    value = float(text)
    while parse_time(f"{text}{unit}") < seconds:  # float round-off: never suggest a budget that fails
        value += step
        text = f"{value:.1f}" if unit == "s" else f"{value:.0f}"
    return f"{text}{unit}"


def _suggest_bytes(n: int) -> str:
    """The smallest size with one decimal in the unit `format_bytes` would use that `n` fits under."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = math.ceil(round(n / scale * 10, 6)) / 10
            while parse_bytes(f"{value:.1f}{unit}") < n:
                value += 0.1
            return f"{value:.1f}".removesuffix(".0") + unit
    return f"{n}B"


# ---------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------

def pareto_front(points: dict[Shape, tuple[float, float]]) -> list[Shape]:
    """Shapes not dominated in (latency lower-is-better, score higher-is-better), sorted by latency.

    A shape is dominated when another is at most as slow and at least as good, and strictly better
    in one of the two. Exact duplicates do not dominate each other, so both stay. Points with a NaN
    are ignored (a failed measurement is not a point). Quadratic, which is fine for 60 shapes and
    keeps the definition visible.
    """
    pts = {s: (float(lat), float(sc)) for s, (lat, sc) in points.items()
           if _is_number(lat) and _is_number(sc)}

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1]) for b in pts.values())

    front = [s for s, p in pts.items() if not dominated(p)]
    return sorted(front, key=lambda s: (pts[s][0], -pts[s][1], s))


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """The chosen shape and the evidence for it.

    `evaluated` is the number of distinct latency values the hierarchical decision depended on,
    i.e. how many builds and measurements it would take to fill the table on demand; compare it
    with `space_size`. `feasible` lists every shape that fits (sorted by (depth, width)); `pareto`
    is the front over all shapes present in both tables, whether they fit or not.
    `nonmonotone_depths` are the depths where latency was not monotone in width, so hierarchical
    checked every width there.
    """

    shape: Shape
    latency_s: float
    score: float
    feasible: list[Shape]
    pareto: list[Shape]
    method: str = "hierarchical"
    evaluated: int = 0
    agrees_with_exhaustive: bool = True
    space_size: int = 0
    budget_s: float = 0.0
    memory_budget: int | None = None
    nonmonotone_depths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready form (shapes as "24x0.75") for `--json` and the manifest."""
        d = asdict(self)
        d["shape"] = str(self.shape)
        d["feasible"] = [str(s) for s in self.feasible]
        d["pareto"] = [str(s) for s in self.pareto]
        return d


def _rank(shape: Shape, latency_s: float, score: float) -> tuple:
    """Sort key, larger is better: score, then lower latency, then larger depth, then larger width.

    Both searches use this one key, so ties are resolved identically and the results can be
    compared shape for shape. Width is the last resort only so that the order is total.
    """
    return (score, -latency_s, shape.depth, shape.width)


def _is_number(x) -> bool:
    try:
        return not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _candidates(score: dict[Shape, float], latency: dict[Shape, float],
                memory: dict[Shape, int] | None, memory_budget: int | None) -> list[Shape]:
    """Shapes present in every table that applies, with real numbers (NaN = not measured)."""
    shapes = [s for s in score if s in latency and _is_number(score[s]) and _is_number(latency[s])]
    if not shapes:
        def sample(table):
            return ", ".join(str(s) for s in sorted(table)[:3]) or "none"
        raise UserError(
            f"the accuracy and latency tables share no shape (accuracy: {len(score)} shapes, e.g. "
            f"{sample(score)}; latency: {len(latency)} shapes, e.g. {sample(latency)}): score and "
            f"profile the same model and shape space"
        )
    if memory_budget is not None:
        if memory is None:
            raise ValueError("memory_budget given without a per-shape memory table")
        with_memory = [s for s in shapes if s in memory and _is_number(memory[s])]
        if not with_memory:
            raise UserError("no shape has a memory figure, so --memory cannot be checked: "
                            "estimate memory for the shape space or drop --memory")
        shapes = with_memory
    return sorted(shapes)


def _exhaustive(shapes: list[Shape], score: dict[Shape, float], latency: dict[Shape, float],
                budget_s: float) -> Shape | None:
    """Reference answer: best `_rank` among all shapes within the budget."""
    fits = [s for s in shapes if latency[s] <= budget_s]
    return max(fits, key=lambda s: _rank(s, latency[s], score[s]), default=None)


def _hierarchical(shapes: list[Shape], score: dict[Shape, float], latency: dict[Shape, float],
                  budget_s: float) -> tuple[Shape | None, set[Shape], list[int]]:
    """The hierarchical search of docs/amoeba-algorithm.md §9, made exact. Returns (winner, shapes whose
    latency was read, fallback depths).

    Assumed, and checked on the table before it is relied on: at a fixed depth, latency does not
    decrease as width grows. Where that holds, the fastest variant of a depth is its smallest
    width, and once some width fits, every smaller width fits too, so their latencies need not be
    read. Where it does not hold (noisy measurements), every width of that depth is read instead.

    Not assumed: that score grows with width (a calibrated width can score above a wider one, and
    score tables are noisy), nor anything across depths (each depth is pruned on its own values).
    Among the widths that fit at a depth the best score wins; its latency, and those of any widths
    tied with it on score, are read for the tie-break.

    The score table is device-independent and already complete, so reading it costs nothing; only
    latency reads are counted.
    """
    read: set[Shape] = set()

    def lat(s: Shape) -> float:
        read.add(s)
        return latency[s]

    by_depth: dict[int, list[Shape]] = {}
    for s in shapes:
        by_depth.setdefault(s.depth, []).append(s)

    winners: list[Shape] = []
    fallback: list[int] = []
    for depth in sorted(by_depth):
        row = sorted(by_depth[depth], key=lambda s: s.width)  # narrowest (fastest) first
        # The table is complete here (exhaustive reads it anyway), so the monotonicity assumption is
        # checked on it rather than trusted; this check is not counted as a lookup.
        if any(latency[a] > latency[b] for a, b in zip(row, row[1:])):
            fallback.append(depth)
            fits = [s for s in row if lat(s) <= budget_s]
        else:
            # (1) Depth level: drop the depth if even its fastest variant is too slow.
            if lat(row[0]) > budget_s:
                continue
            # (2) Width level: widest first; the first that fits bounds the feasible widths.
            widest_fit = next(i for i in range(len(row) - 1, -1, -1) if lat(row[i]) <= budget_s)
            fits = row[: widest_fit + 1]
        if not fits:
            continue
        best_score = max(score[s] for s in fits)
        tied = [s for s in fits if score[s] == best_score]
        winners.append(max(tied, key=lambda s: _rank(s, lat(s), score[s])))

    # (3) Across depths: the same ranking as exhaustive.
    winner = max(winners, key=lambda s: _rank(s, lat(s), score[s]), default=None)
    return winner, read, fallback


def _infeasible(shapes: list[Shape], latency: dict[Shape, float], budget_s: float,
                memory: dict[Shape, int] | None, memory_budget: int | None) -> UserError:
    """The one-line error for a budget nothing fits, naming the nearest miss and a budget that works."""
    def fastest(pool):
        return min(pool, key=lambda s: (latency[s], s))

    def smallest(pool):
        return min(pool, key=lambda s: (memory[s], s))

    in_time = [s for s in shapes if latency[s] <= budget_s]
    if not in_time:
        f = fastest(shapes)
        return UserError(f"no shape fits {format_time(budget_s)}: the fastest is {f} at "
                         f"{format_time(latency[f])} (try --budget {_suggest_time(latency[f])} "
                         f"or a faster flow)")
    in_memory = [s for s in shapes if memory[s] <= memory_budget]
    if not in_memory:
        m = smallest(shapes)
        return UserError(f"no shape fits {format_bytes(memory_budget)} of memory: the smallest is "
                         f"{m} at {format_bytes(memory[m])} (try --memory {_suggest_bytes(memory[m])})")
    f, m = fastest(in_memory), smallest(in_time)
    return UserError(f"no shape fits both {format_time(budget_s)} and {format_bytes(memory_budget)} "
                     f"of memory: within the memory the fastest is {f} at {format_time(latency[f])}, "
                     f"within the time the smallest is {m} at {format_bytes(memory[m])} (try "
                     f"--budget {_suggest_time(latency[f])} or --memory {_suggest_bytes(memory[m])})")


def search(score: dict[Shape, float], latency: dict[Shape, float], budget_s: float,
           memory: dict[Shape, int] | None = None, memory_budget: int | None = None) -> SearchResult:
    """Best-scoring shape with latency <= `budget_s` (and memory <= `memory_budget` when given).

    Only shapes present in both tables (and in `memory` when a memory budget is set) count; NaN
    entries count as missing. A shape whose latency equals the budget fits. Ties: higher score,
    then lower latency, then larger depth, then larger width.

    Memory is an analytic figure (weights plus KV cache), cheap to compute for every shape, so it
    is applied exactly as a filter before the latency search rather than assumed monotone.

    Raises `UserError` when nothing fits or the tables share no shape, `RuntimeError` if the
    hierarchical and exhaustive answers ever differ (a bug).
    """
    if not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    space = _candidates(score, latency, memory, memory_budget)
    pareto = pareto_front({s: (latency[s], score[s]) for s in score if s in latency})
    shapes = space if memory_budget is None else [s for s in space if memory[s] <= memory_budget]

    exhaustive = _exhaustive(shapes, score, latency, budget_s)
    hierarchical, read, fallback = _hierarchical(shapes, score, latency, budget_s)
    if hierarchical != exhaustive:
        raise RuntimeError(f"search bug: hierarchical chose {hierarchical}, exhaustive chose "
                           f"{exhaustive} (budget {format_time(budget_s)})")
    if exhaustive is None:
        raise _infeasible(space, latency, budget_s, memory, memory_budget)

    return SearchResult(
        shape=exhaustive,
        latency_s=float(latency[exhaustive]),
        score=float(score[exhaustive]),
        feasible=[s for s in shapes if latency[s] <= budget_s],
        pareto=pareto,
        method="hierarchical",
        evaluated=len(read),
        agrees_with_exhaustive=True,
        space_size=len(space),
        budget_s=float(budget_s),
        memory_budget=memory_budget,
        nonmonotone_depths=fallback,
    )


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def summary_rows(result: SearchResult, score: dict[Shape, float],
                 latency: dict[Shape, float]) -> list[dict]:
    """Printable rows (strings) of the Pareto front, fastest first, the chosen shape marked.

    The chosen shape is always on the front unless a memory budget pushed it off (a faster,
    better shape exists but does not fit in memory); it is then added in latency order so the
    table always shows what was picked.
    """
    shapes = list(result.pareto)
    if result.shape not in shapes:
        shapes = sorted(shapes + [result.shape], key=lambda s: (latency[s], -score[s], s))
    return [
        {
            "shape": str(s),
            "latency": format_time(latency[s]),
            "score": f"{score[s]:.4g}",
            "fits": "yes" if latency[s] <= result.budget_s else "no",
            "chosen": "<- chosen" if s == result.shape else "",
        }
        for s in shapes
    ]


def plot_pareto(path: str | os.PathLike, score: dict[Shape, float], latency: dict[Shape, float],
                budget_s: float, chosen: Shape | None, title: str,
                score_label: str = "accuracy") -> Path:
    """Write a PNG of score against latency: every shape, the Pareto front, the budget, the choice.

    Uses the Agg canvas on a bare `Figure` instead of pyplot, so it works headless and never
    changes the process-wide backend or leaks figures. Deterministic: the PNG carries no
    Software/version text, so the same inputs give the same bytes. Written to a temporary file
    beside `path` and renamed, so a crash never leaves a half-written plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the Pareto plot needs matplotlib: pip install matplotlib") from None

    path = Path(path)
    shapes = sorted(s for s in score if s in latency and _is_number(score[s])
                    and _is_number(latency[s]) and math.isfinite(latency[s]))
    if chosen is not None and chosen not in shapes:
        raise ValueError(f"chosen shape {chosen} is not in both tables")
    front = pareto_front({s: (latency[s], score[s]) for s in shapes})

    fig = Figure(figsize=(7.0, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [latency[s] * 1e3 for s in shapes]
    ys = [score[s] for s in shapes]
    widths = sorted({s.width for s in shapes})
    w_lo, w_hi = widths[0], widths[-1]

    def size(w: float) -> float:  # marker area grows with width so both axes of the shape show
        return 20 + 100 * ((w - w_lo) / (w_hi - w_lo) if w_hi > w_lo else 1.0)

    if shapes:
        pts = ax.scatter(xs, ys, c=[s.depth for s in shapes], s=[size(s.width) for s in shapes],
                         cmap="viridis", alpha=0.85, edgecolors="white", linewidths=0.5, zorder=2)
        fig.colorbar(pts, ax=ax, label="depth (layers)")
        for w in (w_hi, w_lo) if w_hi > w_lo else (w_hi,):  # legend for the size encoding
            ax.scatter([], [], s=size(w), c="grey", alpha=0.6, label=f"width {w:g}")
    if front:
        ax.plot([latency[s] * 1e3 for s in front], [score[s] for s in front], "-",
                color="tab:orange", linewidth=1.5, zorder=1, label="Pareto front")
    budget_ms = budget_s * 1e3
    budget_label = re.sub(r"\.0+ ", " ", format_time(budget_s))  # "40 ms", not "40.0 ms"
    ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"budget {budget_label}")
    ax.margins(x=0.06, y=0.12)  # headroom so the annotation stays inside the axes
    lo, hi = ax.get_xlim()
    if budget_ms < hi:  # shade what does not fit
        ax.axvspan(budget_ms, hi, color="tab:red", alpha=0.06, linewidth=0)
    ax.set_xlim(lo, max(hi, budget_ms * 1.02))
    if chosen is not None:
        cx, cy = latency[chosen] * 1e3, score[chosen]
        ax.scatter([cx], [cy], s=260, facecolors="none", edgecolors="tab:red", linewidths=2,
                   zorder=3, label=f"chosen {chosen}")
        # Point the label towards the middle of the cloud so it never leaves the axes.
        right = cx > (min(xs) + max(xs)) / 2
        top = cy > (min(ys) + max(ys)) / 2
        ax.annotate(f"{chosen}\n{format_time(latency[chosen])}", (cx, cy),
                    xytext=(-16 if right else 16, -26 if top else 16), textcoords="offset points",
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize=9,
                    color="tab:red", fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
                    arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.8})
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(score_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()

    write_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    return path
