"""Perplexity and zero-shot multiple-choice accuracy over any logits function.

`logits_fn(input_ids: LongTensor[B, T]) -> FloatTensor[B, T, V]` is supplied by the caller (a
dense model, a pruned shape, an exported artifact), so the same scoring code compares all of them
and nothing here depends on model code. Every batch is made before the first is scored, so a
function that can run them together (`many`, the layer-wise reference) reads each layer once. Log-probabilities
are taken in the logits' own precision
(half precision is upcast to float32) and summed in float64, so the result does not depend on the
batch size.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import UserError

if TYPE_CHECKING:  # typing only: amoeba_export must not import trainer at runtime
    from trainer.data import MCItem

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch")


def _logits(logits_fn: LogitsFn, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, logits) per batch. A logits function with a `many` method (the masked reference) gets
    every batch at once, so it can run them layer by layer; others are called per batch."""
    many = getattr(logits_fn, "many", None)
    outs = many(batches) if many is not None else map(logits_fn, batches)
    for ids, out in zip(batches, outs):
        if out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"logits_fn returned shape {tuple(out.shape)} for input {tuple(ids.shape)}")
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        yield ids, out


def nll_per_window(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 4,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (float64, [n]) and the number of predicted tokens ([n]) per window."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise UserError(f"perplexity needs windows of shape [n, T>=2], got {tuple(windows.shape)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    windows = windows.long()
    n, t = windows.shape
    sums = torch.zeros(n, dtype=torch.float64)
    starts = range(0, n, batch_size)
    batches = [windows[s:s + batch_size] for s in starts]
    with torch.inference_mode():
        for s, (ids, logits) in zip(
            starts, _progress(_logits(logits_fn, batches), progress, "perplexity", len(starts))
        ):
            logits = logits[:, :-1]
            targets = ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="none")
            sums[s:s + len(ids)] = nll.view(len(ids), t - 1).double().sum(1).cpu()
    return sums, torch.full((n,), t - 1, dtype=torch.long)


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 4,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) over every position of every window."""
    if len(windows) == 0:
        raise UserError("no windows to score; give more text or a shorter sequence length")
    sums, counts = nll_per_window(logits_fn, windows, batch_size, progress)
    return math.exp(sums.sum().item() / counts.sum().item())


def choice_logprobs(logits_fn: LogitsFn, tokenizer, items: list["MCItem"], batch_size: int = 8,
                    progress: bool = False) -> list[torch.Tensor]:
    """Summed log-prob of each choice's tokens given the context (float64 [n_choices] per item).

    Context and continuation are tokenized separately and their ids concatenated, so the
    continuation tokens are exactly the tokens of the choice text (as lm-eval-harness does when
    choices start with a space); tokenizing the joined string could merge tokens across the
    boundary and blur which tokens belong to the answer.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    if not items:
        raise UserError("no multiple-choice items to score")
    # One request per (item, choice): (token ids, index of the first continuation token).
    reqs: list[tuple[list[int], int]] = []
    for i, it in enumerate(items):
        ctx = tokenizer(it.context, add_special_tokens=False)["input_ids"]
        if not ctx:
            raise UserError(f"item {i} has an empty context; the first answer token needs a prefix")
        for choice in it.choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise UserError(f"item {i} has an empty choice {choice!r}; remove it")
            reqs.append((list(ctx) + list(cont), len(ctx)))

    scores = torch.empty(len(reqs), dtype=torch.float64)
    starts = range(0, len(reqs), batch_size)
    batches = []
    for s in starts:
        batch = reqs[s:s + batch_size]
        # Right padding (id 0): a causal model's earlier positions never see it.
        ids = torch.zeros(len(batch), max(len(seq) for seq, _ in batch), dtype=torch.long)
        for j, (seq, _) in enumerate(batch):
            ids[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        batches.append(ids)
    with torch.inference_mode():
        for s, (_, logits) in zip(
            starts, _progress(_logits(logits_fn, batches), progress, "multiple choice", len(starts))
        ):
            batch = reqs[s:s + batch_size]
            for j, (seq, c0) in enumerate(batch):
                # Position p predicts token p+1: continuation tokens c0..L-1 come from c0-1..L-2.
                lg = logits[j, c0 - 1:len(seq) - 1]
                tgt = torch.tensor(seq[c0:], device=lg.device)
                lp = lg.gather(-1, tgt[:, None])[:, 0] - torch.logsumexp(lg, dim=-1)
                scores[s + j] = lp.double().sum().cpu()
    return list(scores.split([len(it.choices) for it in items]))


def mc_accuracy(logits_fn: LogitsFn, tokenizer, items: list["MCItem"], batch_size: int = 8,
                progress: bool = False) -> dict:
    """Zero-shot accuracy: pick the choice with the highest summed continuation log-prob ("acc"),
    or the highest log-prob per character of the continuation ("acc_norm", which removes the
    bias towards short answers). Ties go to the first choice.
    """
    scores = choice_logprobs(logits_fn, tokenizer, items, batch_size, progress)
    correct = correct_norm = 0
    for it, sc in zip(items, scores):
        chars = torch.tensor([float(len(c)) for c in it.choices], dtype=torch.float64)
        correct += int(int(sc.argmax()) == it.gold)
        correct_norm += int(int((sc / chars).argmax()) == it.gold)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
