"""The stage-2 objective (docs/amoeba-algorithm.md §7): sandwich sampling, in-place distillation and
loss-magnitude balancing, plus the MLFS stage schedule.

Sandwich: per micro-batch the largest shape, K random shapes and the smallest. Upstream draws the
random depths i.i.d. and uniformly below the full depth (randint(20, 32)) and the random widths
without replacement from the width choices, paired independently; so does `sandwich`, over the
strategy's own depths and widths.

Losses: the largest shape is the teacher, trained on the data's next-token cross-entropy over
response tokens; every other shape learns the soft cross-entropy -Σ p_T log p_S (temperature 1) to
the teacher's logits of the same step, detached, over the same positions. (Upstream averages its
KD term over positions whose *own* label is a response token, one position off the CE targets; we
use the positions that predict a response token for both.)

Balancing (on unless switched off): ℓ_i <- ℓ_i · stopgrad(ℓ_0) / stopgrad(ℓ_i) for every student,
so each student's loss takes the teacher's value and its gradient is scaled by ℓ_0/ℓ_i; the
subnets' gradients add up with no 1/K.

MLFS ("Efficiently Distilling LLMs for Edge Applications"): the shapes, largest first by parameter
count, are released to training in `stages` equal steps of the run, each stage adding the next
smaller slice; the sandwich is drawn from the shapes released so far, the teacher is always the
largest.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from amoeba_export.errors import UserError
from amoeba_export.shapes import Shape

from .instruct import IGNORE


def sandwich(pool: list[Shape], k: int, rng: np.random.Generator) -> list[Shape]:
    """[largest, k random, smallest] of `pool` (shapes on a depth x width grid or a subset of it)."""
    if k < 0:
        raise UserError(f"--random-subnets must be 0 or more (got {k})")
    largest = max(pool, key=lambda s: (s.depth, s.width))
    smallest = min(pool, key=lambda s: (s.depth, s.width))
    depths = sorted({s.depth for s in pool if s.depth < largest.depth}) or [largest.depth]
    widths = sorted({s.width for s in pool}, reverse=True)
    members = set(pool)
    out = [largest]
    if k:
        ws = rng.choice(widths, size=k, replace=k > len(widths))
        for w in ws:
            ds = [d for d in depths if Shape(d, float(w)) in members] or [largest.depth]
            out.append(Shape(int(rng.choice(ds)), float(w)))
    if smallest != largest:
        out.append(smallest)
    return out


def mlfs_pool(shapes: list[Shape], params: dict[Shape, int], step: int, steps: int, stages: int) -> list[Shape]:
    """The shapes training may draw from at `step` of an MLFS schedule with `stages` stages."""
    if stages < 1:
        raise UserError(f"--stages must be at least 1 (got {stages})")
    ranked = sorted(shapes, key=lambda s: (-params[s], -s.depth, -s.width))
    stage = min(stages - 1, step * stages // max(steps, 1))
    return ranked[:max(2, math.ceil(len(ranked) * (stage + 1) / stages))]


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Mask [B, T-1] of the positions whose next token is a response token."""
    return labels[:, 1:] != IGNORE


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens."""
    mask = _targets(labels)
    return F.cross_entropy(logits[:, :-1][mask].float(), labels[:, 1:][mask])


def teacher_probs(teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_T [positions, V] at the positions `response_ce` averages, detached: computed once per
    micro-batch and shared by its students."""
    return torch.softmax(teacher[:, :-1][_targets(labels)].detach().float(), dim=-1)


def soft_ce_to(student: torch.Tensor, p_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -Σ_v p_T(v) log p_S(v) over the positions of `teacher_probs`."""
    return -(p_t * torch.log_softmax(student[:, :-1][_targets(labels)].float(), dim=-1)).sum(-1).mean()


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the student to the teacher's logits (detached)."""
    return soft_ce_to(student, teacher_probs(teacher, labels), labels)


def balanced(loss: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """ℓ · stopgrad(ℓ_ref) / stopgrad(ℓ): the value of the reference, the gradient scaled by ℓ_ref/ℓ."""
    return loss * (reference.detach() / loss.detach())
