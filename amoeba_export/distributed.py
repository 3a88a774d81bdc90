"""Evaluation split over the processes that `torchrun` or `accelerate launch` start.

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); a plain run is a
group of one. Work is split into units that every process can compute alone (a score shape, the
candidates of a DP row, batches of FLAP windows); each unit's numbers are computed exactly as one
process computes them, and gathered results are put back in the one-process order, so the tables
are identical whatever the number of processes (docs/reference-forward.md §4). Only rank 0 writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence) -> list:
        """This process's share: every world-th item from its rank, so shares differ by at most one."""
        return list(items[self.rank::self.world])

    def gather(self, value: Any) -> list:
        """Every process's value, in rank order."""
        if self.world == 1:
            return [value]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def merge(self, items: Sequence, values: list) -> list:
        """`values` (this process's, for `mine(items)`) gathered and put back in the order of `items`."""
        parts = self.gather(values)
        out: list = [None] * len(items)
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int | None:
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ and launched() else None


def group(device: str = "cpu") -> Group:
    """The process group of this launch (initialised once: NCCL for CUDA, gloo for the CPU)."""
    if not launched():
        return Group()
    dist = torch.distributed
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())
