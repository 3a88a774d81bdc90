"""Stage-1 depth: the dynamic-programming layer selection of AmoebaLLM (docs/amoeba-algorithm.md §2), exactly.

Layers are visited from the back. Cell (n, m) holds the best mask that removes m layers among the
last n eligible ones; it either keeps layer ℓ = N − n (copy of cell (n−1, m)) or removes it on top
of cell (n−1, m−1), whichever scores strictly better. The last `keep_last` layers are never removed.

Evaluation trick (exact): every candidate at step n keeps all layers before ℓ, so the hidden state
entering layer ℓ is computed once for all steps, and a candidate only runs layers ℓ+1..L−1. The
candidates of a row are run together, layer by layer, so each layer is read once per row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from amoeba_export.distributed import Group
from amoeba_export.errors import notice as default_notice
from amoeba_export.io import write_text_atomic


class LayerRunner:
    """Runs the base model (a LayerStack) layer by layer from a cached hidden state, on fixed inputs."""

    def __init__(self, stack, input_ids: torch.Tensor):
        self.stack, self.ids = stack, input_ids
        self.start = stack.embed(input_ids)

    def run(self, state, layers):
        return self.stack.run([state], layers)[0]

    def prefixes(self) -> list:
        """state[ℓ] = the input of layer ℓ with every earlier layer active (ℓ = 0..L)."""
        out, s = [self.start], self.start
        for i in range(self.stack.n_layers):
            s = self.run(s, [i])
            out.append(s)
        return out

    def run_row(self, start, kept_sets: list[list[int]], first: int) -> list:
        """Every candidate of a DP row from the same cached input, each layer read once for all of them."""
        states, kept = [start] * len(kept_sets), [set(k) for k in kept_sets]
        for j in range(first + 1, self.stack.n_layers):
            users = [c for c, k in enumerate(kept) if j in k]
            if users:
                with self.stack.layer(j) as block:
                    for c in users:
                        states[c] = self.stack.step(block, states[c])
        return states

    def logits(self, state) -> torch.Tensor:
        return self.stack.logits(state.hidden)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood."""
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device), reduction="mean"
        )
    )


@dataclass
class DPTables:
    """d[n][m] metric and strategy[n][m] mask (over the N eligible layers), as in the upstream code."""

    metric: list[list[float | None]]
    masks: list[list[str | None]]  # "1101…" strings; None where the cell is not reachable

    def to_json(self) -> dict:
        return {"metric": self.metric, "masks": self.masks}


def dp_select(n_layers: int, min_depth: int, keep_last: int, evaluate: Callable[[int, list[int]], float],
              higher_is_better: bool, checkpoint: Path | None = None, rows: int | None = None,
              notice: Callable[[str], None] = default_notice, group: Group = Group()) -> DPTables:
    """Fill the DP tables. `evaluate(first_changed, kept_layers)` scores one candidate.

    `rows` stops after that many steps (used by the test that re-runs a slice). With `checkpoint`,
    each finished row is saved (atomically, by rank 0) and a rerun resumes after the last saved
    row; an unreadable checkpoint is reported and the DP starts over. With a `group` of several
    processes, each scores its share of a row's candidates and all take the gathered row.
    """
    N, M = n_layers - keep_last, n_layers - min_depth
    worst = -np.inf if higher_is_better else np.inf
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)

    def empty():
        S: list[list[np.ndarray | None]] = [[np.ones(N, dtype=np.int8)] + [None] * M for _ in range(N + 1)]
        return [[worst] * (M + 1) for _ in range(N + 1)], S, 1

    d, S, start = empty()
    if checkpoint is not None and checkpoint.is_file():
        try:
            saved = json.loads(checkpoint.read_text())
            rows_d, rows_s = list(saved["metric"]), list(saved["masks"])
            if len(rows_d) != len(rows_s) or len(rows_d) > N + 1 or any(len(r) != M + 1 for r in rows_d + rows_s):
                raise ValueError("its tables do not fit this model and depth range")
            for n, (drow, srow) in enumerate(zip(rows_d, rows_s)):
                d[n] = [worst if v is None else float(v) for v in drow]
                S[n] = [None if s is None else np.array([int(c) for c in s], np.int8) for s in srow]
                if any(m is not None and m.shape != (N,) for m in S[n]):
                    raise ValueError("a mask has the wrong length")
            start = max(1, len(rows_d))
        except (OSError, ValueError, KeyError, TypeError) as e:
            notice(f"unreadable depth DP checkpoint {checkpoint} ({type(e).__name__}: {e}): starting the DP over")
            d, S, start = empty()
    last = N if rows is None else min(N, rows)
    total = sum(min(n, M) for n in range(start, last + 1))
    bar = tqdm(total=total, desc="depth DP", unit="eval", disable=total == 0 or not group.main)
    for n in range(start, last + 1):
        layer = N - n
        cands = []
        for m in range(1, min(n, M) + 1):
            cand = S[n - 1][m - 1].copy()
            cand[layer] = 0
            cands.append(cand)
        kept = [[i for i in range(N) if c[i]] + list(range(N, n_layers)) for c in cands]
        row = getattr(evaluate, "row", None)  # a whole row at once: each layer read once for the row
        mine = group.mine(kept)
        vals = group.merge(kept, row(layer, mine) if row is not None else [evaluate(layer, k) for k in mine])
        bar.update(len(cands))
        for m, (cand, val) in enumerate(zip(cands, vals), start=1):
            if better(val, d[n - 1][m]):
                d[n][m], S[n][m] = val, cand
            else:
                d[n][m], S[n][m] = d[n - 1][m], S[n - 1][m]
        if checkpoint is not None and group.main:
            tables = _tables(d[: n + 1], S[: n + 1], worst)
            write_text_atomic(checkpoint, json.dumps(tables.to_json()))
    bar.close()
    return _tables(d[: last + 1], S[: last + 1], worst)


def _tables(d, S, worst) -> DPTables:
    metric = [[None if v == worst else float(v) for v in row] for row in d]
    masks = [[None if s is None else "".join(map(str, s.tolist())) for s in row] for row in S]
    return DPTables(metric, masks)


def kept_layers(tables: DPTables, n_layers: int, keep_last: int) -> dict[int, list[int]]:
    """depth -> kept layer indices, from the last DP row (depth L keeps everything)."""
    N = n_layers - keep_last
    out = {n_layers: list(range(n_layers))}
    for m, mask in enumerate(tables.masks[-1]):
        if m and mask is not None:
            out[n_layers - m] = [i for i in range(N) if mask[i] == "1"] + list(range(N, n_layers))
    return out


def ppl_evaluator(runner: LayerRunner) -> Callable[[int, list[int]], float]:
    """Score = calibration perplexity; each candidate starts from the cached input of its first
    removed layer. `evaluate.row(first, kept_sets)` scores a DP row's candidates together."""
    prefixes = runner.prefixes()

    def ppl(state) -> float:
        return float(np.exp(nll(runner.logits(state), runner.ids)))

    def evaluate(first_removed: int, kept: list[int]) -> float:
        return ppl(runner.run(prefixes[first_removed], [i for i in kept if i > first_removed]))

    def row(first_removed: int, kept_sets: list[list[int]]) -> list[float]:
        return [ppl(s) for s in runner.run_row(prefixes[first_removed], kept_sets, first_removed)]

    evaluate.row = row
    return evaluate
