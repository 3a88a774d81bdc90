"""Budgets that hold on this machine: latency predictions corrected by measurements taken here.

A latency table predicts; the machine the artifact runs on decides. Two corrections, both on a
machine that can time the flow (docs/budgets.md):

- **Spot check.** A host table measured on other hardware (or one that does not record its
  hardware) is checked on `SPOT_SHAPES` shapes here. When their measured/predicted ratios agree
  within `SPOT_SPREAD`, the table is rescaled by the median ratio and saved as this machine's
  table; when they disagree, a uniform factor cannot fix it and the machine is re-profiled.
- **Feedback.** When the compiled artifact measures over the budget (more than `BUDGET_SLACK`
  over), every prediction is rescaled by measured/predicted, the search picks again and the new
  pick is measured, at most `MAX_ROUNDS` rounds in all. A measurement over budget is repeated once
  and the faster counts (the machine's speed spikes); one taken while other processes held the
  cores is not acted on.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from .errors import UserError
from .shapes import Shape

SPOT_SHAPES = 3
SPOT_SPREAD = 0.15  # max/min of the spot ratios below 1 + this: one factor explains them
BUDGET_SLACK = 0.05  # a measurement within budget × (1 + this) meets the budget
MAX_ROUNDS = 3


def spot_shapes(shapes) -> list[Shape]:
    """The largest, the smallest and the middle shape, in (depth, width) order."""
    ordered = sorted(shapes)
    picks = [ordered[-1], ordered[0], ordered[len(ordered) // 2]]
    return list(dict.fromkeys(picks))[:SPOT_SHAPES]


@dataclass
class SpotCheck:
    shapes: list[str]
    predicted: list[float]  # the table's latency (s)
    measured: list[float]  # here (s)
    noisy: bool = False  # other processes held the cores: the check is not acted on
    threads: int | None = None  # what the spot shapes were timed with (the table's own)

    @property
    def ratios(self) -> list[float]:
        return [m / p for m, p in zip(self.measured, self.predicted)]

    @property
    def factor(self) -> float:
        return statistics.median(self.ratios)

    @property
    def consistent(self) -> bool:
        r = self.ratios
        return max(r) / min(r) <= 1 + SPOT_SPREAD

    def to_json(self) -> dict:
        return {**asdict(self), "ratios": self.ratios, "factor": self.factor, "consistent": self.consistent}

    def describe(self) -> str:
        return ", ".join(f"{s} {m * 1e3:.1f} ms (table {p * 1e3:.1f}, x{m / p:.2f})"
                         for s, p, m in zip(self.shapes, self.predicted, self.measured))


def spot_check(table, measure: Callable[[Shape], dict]) -> SpotCheck:
    """Measure the spot shapes of a table here (`measure(shape)` -> timing record)."""
    shapes = spot_shapes([Shape.parse(k) for k in table.entries])
    predicted, measured, noisy, threads = [], [], False, None
    for s in shapes:
        timing = measure(s)
        predicted.append(table.latency(s))
        measured.append(timing["median"])
        noisy = noisy or bool(timing.get("noisy"))
        threads = timing.get("threads")
    return SpotCheck([str(s) for s in shapes], predicted, measured, noisy, threads)


def rescaled(table, check: SpotCheck, hardware: dict, source_path: str):
    """A new table for this machine: every latency times the spot check's factor, the spot shapes
    measured here. The measured entries of the old table were taken elsewhere, so they become
    predictions; the validation figures are the spot check's own (said so)."""
    from profilers.tables import validation_figures

    k = check.factor
    here = dict(zip(check.shapes, check.measured))
    entries = {}
    for key in table.entries:
        e = {"predicted": table.latency(Shape.parse(key)) * k}
        if key in here:
            e["measured"] = {"median": here[key], "threads": check.threads, "spot_check": True}
        entries[key] = e
    component = dict(table.component)
    if isinstance(component.get("coef"), list):
        component["coef"] = [c * k for c in component["coef"]]
    validation = validation_figures([entries[s]["predicted"] for s in check.shapes], check.measured)
    validation.update(shapes=list(check.shapes), note="the spot check's own shapes: the factor was fitted on them")
    provenance = {**table.provenance, "hardware": hardware,
                  "rescaled": {"from": source_path, "from_hardware": table.provenance.get("hardware"),
                               "spot_check": check.to_json()}}
    return replace(table, entries=entries, component=component, validation=validation, provenance=provenance)


@dataclass
class Round:
    """One feedback measurement: the shape picked, what the (corrected) table predicted, what it measured."""

    shape: str
    predicted_s: float
    measured_s: float
    factor: float  # the correction applied to every prediction after this round

    def describe(self, budget_s: float) -> str:
        return (f"{self.shape} measured {self.measured_s * 1e3:.1f} ms against the {budget_s * 1e3:.1f} ms budget "
                f"(predicted {self.predicted_s * 1e3:.1f} ms)")


class OverBudget(Exception):
    """Raised from inside a compile (so its artifact is discarded) when feedback can still act."""

    def __init__(self, measured: dict):
        super().__init__("over budget")
        self.measured = measured


@dataclass
class Feedback:
    """The feedback loop's state across the rounds of one budgeted compile."""

    budget_s: float
    raw: dict  # the table's latency per shape (s), uncorrected
    enabled: bool = True
    rounds: list[Round] = field(default_factory=list)

    def over(self, measured_s: float) -> bool:
        return measured_s > self.budget_s * (1 + BUDGET_SLACK)

    def can_act(self) -> bool:
        return self.enabled and len(self.rounds) < MAX_ROUNDS

    @property
    def measured(self) -> dict:
        """Shape -> its median measured here, from the rounds."""
        return {Shape.parse(r.shape): r.measured_s for r in self.rounds}

    @property
    def factor(self) -> float:
        """Measured over predicted, pooled over every shape measured here."""
        return self._factor(self.measured)

    def _factor(self, measured: dict) -> float:
        return sum(measured.values()) / sum(self.raw[s] for s in measured) if measured else 1.0

    def corrected(self) -> dict:
        """Every shape's latency: measured here where it was, else the table's times the factor."""
        k = self.factor
        return {s: self.measured.get(s, v * k) for s, v in self.raw.items()}

    def confirm(self, timing: dict, again: Callable[[], dict]) -> dict:
        """A measurement over budget is taken once more before it is acted on: a shared machine's
        speed spikes for seconds at a time, and one spike should not shrink the model. The faster
        of the two counts."""
        if timing.get("noisy") or not self.over(timing["median"]):
            return timing
        return min((timing, again()), key=lambda t: t["median"])

    def record(self, shape: Shape, predicted_s: float, measured_s: float) -> Round:
        r = Round(str(shape), predicted_s, measured_s, self._factor({**self.measured, shape: measured_s}))
        self.rounds.append(r)
        return r

    def repick(self, search: Callable[[dict], object], measure: Callable[[Shape], dict], result,
               measured_s: float, notice: Callable[[str], None]):
        """After `result` measured `measured_s` over budget: correct, search again, and measure the
        new pick (cheaply, without a full compile) until one fits or the rounds run out. Returns the
        search result to compile."""
        while True:
            r = self.record(result.shape, result.latency_s, measured_s)
            notice(f"feedback round {len(self.rounds)}: {r.describe(self.budget_s)}; correcting the table by "
                   f"x{r.factor:.2f} and searching again")
            try:
                result = search(self.corrected())
            except UserError as e:
                raise UserError(f"{e} (after correcting the latency table by x{r.factor:.2f}, measured here)") from None
            if str(result.shape) == r.shape or not self.can_act():
                return result
            shape = result.shape
            timing = self.confirm(measure(shape), lambda: measure(shape))
            if timing.get("noisy"):
                notice(f"{result.shape} was measured while other processes held the cores: not acted on")
                return result
            measured_s = timing["median"]
            if not self.over(measured_s):
                notice(f"feedback: {result.shape} measured {measured_s * 1e3:.1f} ms, within the budget")
                return result

    def to_json(self) -> dict:
        return {"enabled": self.enabled, "rounds": [asdict(r) for r in self.rounds], "factor": self.factor,
                "slack": BUDGET_SLACK, "max_rounds": MAX_ROUNDS}
