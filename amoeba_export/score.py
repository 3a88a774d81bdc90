"""score: the AccuracyTable, per shape held-out perplexity and multiple-choice accuracy.

Accuracy does not depend on the device, so the table is built once per (model, strategy, eval set)
and shared by every target and flow (docs/amoeba-algorithm.md §9). It lives beside the strategy
(`default_path`), so the shipped strategy ships with its table and search never has to score.

Every shape is scored with the masked reference forward (`ElasticModel.logits_fn`), the same
ground truth every exported artifact is checked against, on the *same* windows and items, so the
numbers differ only by the shape. Scoring 60 shapes on a CPU takes a while: the table is written
atomically after every shape and a rerun skips the shapes already in it.

Determinism: the table's body (model, strategy, eval set, entries) is a pure function of its
inputs; wall-clock facts (date, seconds per shape, versions, command) live only in `provenance`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import distributed
from .errors import UserError
from .errors import notice as default_notice
from .io import dumps_json, read_json, write_json_atomic, write_text_atomic
from .locations import data_dir, shipped
from .metrics import mc_accuracy, perplexity
from .shapes import Shape

FORMAT = "amoeba-export/accuracy"
VERSION = 1
# The multiple-choice number that `mc_mean_acc` averages: accuracy by log-prob per character of
# the answer, which removes the bias towards short answers (the convention for PIQA, HellaSwag and
# ARC reporting); one metric for every task keeps the mean comparable across task mixes.
MC_METRIC = "acc_norm"
# What `AccuracyTable.score` returns; recorded in the table so a reader knows what search maximised.
SCORE = "-log(ppl)"
STALE = "stale accuracy table for another model/strategy: rerun amoeba-export score"


@dataclass(frozen=True)
class EvalConfig:
    """The eval set (what defines the numbers) plus batch sizes (how fast they are computed).

    The defaults are the eval set of the table shipped beside the default strategy (sized so that
    all 60 shapes score in about half an hour on a 2-core CPU: 8x512 held-out tokens, 50 items
    each of ARC-Easy and PIQA), so `default_path(strategy_dir)` finds it without scoring.

    Batch sizes are left out of `key()` and `to_json()`: the metrics sum log-probabilities in
    float64 per window and per choice, so they change no number beyond float rounding of the
    forward, and a resumed run may use other ones. They are recorded in the provenance block.
    """

    heldout: str = "boolq"  # bundled text source ("boolq", "lambada", "squad") or a .txt/.jsonl path
    ppl_windows: int = 8
    seq_len: int = 512
    seed: int = 0
    mc_tasks: tuple[str, ...] = ("arc_easy", "piqa")
    mc_limit: int = 50
    ppl_batch: int = 4
    mc_batch: int = 4  # fastest on a 2-core CPU: less right-padding than 8, same numbers

    def __post_init__(self):
        object.__setattr__(self, "mc_tasks", tuple(self.mc_tasks))
        for name in ("ppl_windows", "seq_len", "mc_limit", "ppl_batch", "mc_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"eval {name} must be at least 1 (got {getattr(self, name)})")

    def _is_file(self) -> bool:
        return Path(self.heldout).suffix.lower() in (".txt", ".jsonl")

    def to_json(self) -> dict:
        """The eval set. A user text file is identified by its content hash, not its path, so
        moving it keeps the table and editing it invalidates the table."""
        d = {k: v for k, v in asdict(self).items() if k not in ("ppl_batch", "mc_batch")}
        d["mc_tasks"] = list(self.mc_tasks)
        if self._is_file():
            p = Path(self.heldout)
            if not p.is_file():
                raise UserError(f"text file {p} not found; check the path")
            d["heldout"] = f"file:{p.name}"
            d["heldout_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        return d

    def key(self) -> str:
        """Readable, filename-safe name of the eval set, e.g. boolq-16x512-arc_easy+piqa-200-s0."""
        if self._is_file():
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.heldout).stem)
            src = f"{stem}-{self.to_json()['heldout_sha256'][:8]}"
        else:
            src = self.heldout
        tasks = "+".join(self.mc_tasks) or "nomc"
        return f"{src}-{self.ppl_windows}x{self.seq_len}-{tasks}-{self.mc_limit}-s{self.seed}"


def strategy_fingerprint(strategy_dir: Path) -> str:
    """sha256 over strategy.json and strategy.safetensors (first 16 hex): a recalibrated or
    edited strategy gets a new fingerprint, which makes the tables scored on the old one stale."""
    strategy_dir = Path(strategy_dir)
    h = hashlib.sha256()
    for name in ("strategy.json", "strategy.safetensors"):
        f = strategy_dir / name
        if not f.is_file():
            raise UserError(f"missing file {f}: pass the strategy directory the table belongs to")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def table_dir(strategy_dir: Path) -> Path:
    """Where tables scored on a strategy are written: beside it, or, for a strategy shipped inside
    the package (read-only), in the user's data folder."""
    strategy_dir = Path(strategy_dir)
    return data_dir() / "accuracy" / strategy_dir.name if shipped(strategy_dir) else strategy_dir


def default_path(strategy_dir: Path, cfg: EvalConfig | None = None, adapter: str | None = None,
                 model: str | None = None) -> Path:
    """Where a strategy's table is written: one file per eval set, and per adapter fingerprint (an
    adapter changes every shape's accuracy) and per model fingerprint when the strategy is used on
    other weights than it was made for (--allow-other-weights)."""
    suffix = (f"-model-{model}" if model else "") + (f"-adapter-{adapter}" if adapter else "")
    return table_dir(strategy_dir) / f"accuracy-{(cfg or EvalConfig()).key()}{suffix}.json"


def scored_tables(strategy_dir: Path, adapter: str | None = None, model: str | None = None) -> list[Path]:
    """The tables already scored on the strategy for this adapter and model (beside the strategy,
    shipped or not, and in its table folder)."""
    def owner(name: str):
        return tuple(
            (m.group(1) if (m := re.search(rf"-{k}-([0-9a-f]+)", name)) else None) for k in ("model", "adapter")
        )

    folders = dict.fromkeys([Path(strategy_dir), table_dir(strategy_dir)])
    return sorted(p for d in folders for p in d.glob("accuracy-*.json") if owner(p.name) == (model, adapter))


@dataclass
class AccuracyTable:
    model: dict  # {"name", "fingerprint"}
    strategy_fingerprint: str
    eval: dict  # EvalConfig.to_json()
    # shape -> {"ppl", "ppl_tokens", "mc": {task: {"acc", "acc_norm", "n"}}, "mc_mean_acc"}
    entries: dict[Shape, dict] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # date, versions, command, seconds per shape
    version: int = VERSION

    def score(self, shape: Shape) -> float:
        """The number search maximises: -log(perplexity), the mean held-out log-likelihood per token.

        Why not accuracy: at 135M parameters zero-shot multiple choice sits a few points above
        chance, and with a few hundred items its standard error (~2-3 points) is as large as the
        gap between neighbouring shapes, so argmax over accuracy would pick noise. Perplexity over
        thousands of tokens is smooth and moves with every layer and channel removed. The log makes
        it additive (differences are nats per token) and higher-is-better. MC accuracy is kept
        beside it (`mc_mean_acc`) for reports and as a sanity check.
        """
        return -math.log(self.entries[shape]["ppl"])

    def scores(self) -> dict[Shape, float]:
        """`score` for every shape in the table: the `score` input of `search.search`."""
        return {s: self.score(s) for s in self.entries}

    def to_json(self, provenance: bool = True) -> dict:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "model": dict(self.model),
            "strategy": {"fingerprint": self.strategy_fingerprint},
            "eval": dict(self.eval),
            "score": SCORE,
            "mc_metric": MC_METRIC,
            "entries": {str(s): e for s, e in sorted(self.entries.items(), reverse=True)},
        }
        if provenance:
            doc["provenance"] = self.provenance
        return doc

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file beside `path`, renamed over it when complete."""
        write_text_atomic(Path(path), dumps_json(self.to_json()))

    @classmethod
    def load(cls, path: Path, model_fingerprint: str | None = None,
             strategy_fingerprint: str | None = None) -> "AccuracyTable":
        """Read a table; with fingerprints given, refuse one scored for another model or strategy."""
        path = Path(path)
        doc = read_json(path)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise UserError(f"{path} is not an amoeba-export accuracy table; rerun amoeba-export score")
        if doc.get("version") != VERSION:
            raise UserError(f"accuracy table {path} has version {doc.get('version')} (expected {VERSION}); "
                            "rerun amoeba-export score")
        try:
            entries = {}
            for k, e in doc["entries"].items():
                if not isinstance(e, dict) or not isinstance(e.get("ppl"), (int, float)) or not e["ppl"] > 0:
                    raise ValueError(f"entry {k} has no positive ppl")
                entries[Shape.parse(k)] = e
            table = cls(model={"name": doc["model"]["name"], "fingerprint": doc["model"]["fingerprint"]},
                        strategy_fingerprint=doc["strategy"]["fingerprint"], eval=dict(doc["eval"]),
                        entries=entries, provenance=doc.get("provenance", {}))
        except (KeyError, TypeError, AttributeError, ValueError, UserError) as e:
            raise UserError(f"corrupt accuracy table {path} ({e}); rerun amoeba-export score") from None
        if (model_fingerprint is not None and table.model["fingerprint"] != model_fingerprint) or (
                strategy_fingerprint is not None and table.strategy_fingerprint != strategy_fingerprint):
            raise UserError(f"{STALE} ({path})")
        return table


def eval_set(tokenizer, cfg: EvalConfig):
    """The held-out windows [n, seq_len] and the MC items per task: seeded, identical every run."""
    from trainer.data import load_texts, mc_items, pack_tokens  # data loaders live in trainer

    windows = pack_tokens(load_texts(cfg.heldout), tokenizer, cfg.seq_len, cfg.ppl_windows, cfg.seed)
    items = {task: mc_items(task, cfg.mc_limit, cfg.seed) for task in cfg.mc_tasks}
    return windows, items


def score_shape(logits_fn, tokenizer, windows, items: dict, cfg: EvalConfig) -> dict:
    """One entry: perplexity on the windows and accuracy on every task's items."""
    entry = {"ppl": perplexity(logits_fn, windows, cfg.ppl_batch),
             "ppl_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "mc": {}}
    for task, its in items.items():
        entry["mc"][task] = mc_accuracy(logits_fn, tokenizer, its, cfg.mc_batch)
    accs = [m[MC_METRIC] for m in entry["mc"].values()]
    entry["mc_mean_acc"] = sum(accs) / len(accs) if accs else None
    return entry


def _provenance(table: AccuracyTable, cfg: EvalConfig) -> dict:
    import torch

    from .manifest import versions

    prov = dict(table.provenance)
    prov.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "",
        "batch": {"ppl": cfg.ppl_batch, "mc": cfg.mc_batch},
        "torch_threads": torch.get_num_threads(),
    })
    prov.setdefault("seconds", {})
    return prov


def score_shapes(elastic, shapes, cfg: EvalConfig, out_path: Path, progress: bool = True,
                 strategy_dir: Path | None = None, notice=default_notice) -> AccuracyTable:
    """Score `shapes` into the table at `out_path`, resuming from what it already holds.

    The table is checkpointed after every shape; a rerun with the same model, strategy and eval
    set skips the shapes already scored. A table at `out_path` for another model, strategy or eval
    set (or an unreadable one) is replaced: it is exactly what rerunning score is meant to fix.
    `strategy_dir` (default: the table's directory, where `default_path` puts it) is what the
    strategy fingerprint is taken from.
    """
    out_path = Path(out_path)
    sdir = Path(strategy_dir) if strategy_dir is not None else out_path.parent
    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    sfp = strategy_fingerprint(sdir)
    ev = cfg.to_json()
    shapes = [elastic.strategy.resolve(s) for s in shapes]

    table = None
    if out_path.is_file():
        try:
            old = AccuracyTable.load(out_path, model["fingerprint"], sfp)
            if old.eval == ev:
                table = old
        except UserError as e:
            notice(f"{e}: scoring every shape again into {out_path}")
    if table is None:
        table = AccuracyTable(model=model, strategy_fingerprint=sfp, eval=ev)
    todo = [s for s in shapes if s not in table.entries]
    if not todo:
        return table

    tok = elastic.tokenizer()
    windows, items = eval_set(tok, cfg)
    table.provenance = _provenance(table, cfg)
    table.provenance["compute"] = elastic.compute.to_json()  # a half-precision reference scores slightly differently
    group = distributed.group(elastic.compute.device)
    if group.world > 1:
        return _score_split(elastic, todo, tok, windows, items, cfg, table, out_path, group, notice)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes), initial=len(shapes) - len(todo), desc="score", unit="shape")
    try:
        for shape in todo:
            t0 = time.perf_counter()
            entry = score_shape(elastic.logits_fn(shape), tok, windows, items, cfg)
            table.entries[shape] = entry
            table.provenance["seconds"][str(shape)] = round(time.perf_counter() - t0, 3)
            table.provenance["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            table.save(out_path)
            if bar is not None:
                mc = entry["mc_mean_acc"]
                bar.set_postfix_str(f"{shape} ppl={entry['ppl']:.2f}" + (f" mc={mc:.3f}" if mc is not None else ""))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return table


def _score_split(elastic, todo, tok, windows, items, cfg: EvalConfig, table: AccuracyTable, out_path: Path,
                 group: distributed.Group, notice) -> AccuracyTable:
    """Each process scores its share of `todo`, saving every finished shape as a part file beside
    the table (so a process that dies loses only the shape it was on); rank 0 then folds the parts
    into the table. Parts of an earlier run with the same model, strategy and eval set are used."""
    parts = out_path.parent / f".{out_path.name}.parts"
    key = {"model": table.model, "strategy_fingerprint": table.strategy_fingerprint, "eval": table.eval}
    done = _read_parts(parts, key)
    mine = group.mine([s for s in todo if str(s) not in done])
    if group.main:
        parts.mkdir(parents=True, exist_ok=True)
    group.barrier()
    for i, shape in enumerate(mine):
        t0 = time.perf_counter()
        entry = score_shape(elastic.logits_fn(shape), tok, windows, items, cfg)
        write_json_atomic(parts / f"{shape}.json", {**key, "shape": str(shape), "entry": entry,
                                                     "seconds": round(time.perf_counter() - t0, 3)})
        notice(f"score [rank {group.rank}, {i + 1}/{len(mine)}]: {shape} ppl={entry['ppl']:.2f}")
    group.barrier()
    if group.main:
        done = _read_parts(parts, key)
        for shape in todo:
            part = done[str(shape)]
            table.entries[shape] = part["entry"]
            table.provenance["seconds"][str(shape)] = part["seconds"]
        table.provenance["processes"] = group.world
        table.provenance["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        table.save(out_path)
        shutil.rmtree(parts, ignore_errors=True)
    group.barrier()
    return table


def _read_parts(parts: Path, key: dict) -> dict[str, dict]:
    """shape -> part, for the readable parts made with `key` (others are scored again)."""
    out = {}
    for f in sorted(parts.glob("*.json")) if parts.is_dir() else []:
        try:
            part = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(part, dict) and all(part.get(k) == json.loads(json.dumps(v)) for k, v in key.items()):
            out[part["shape"]] = part
    return out
