"""The adapter interface: what materialize and the reference forward need from a fine-tuned adapter.

For a fixed shape an adapter is, per kept layer and projection, one low-rank update
`ΔW = scale · B @ A` (for SMOL, A and B are the gate-mixed expert matrices of method.md §5-6, so the
cross-expert terms are included). Materialize merges it into the dense weight in fp32; the masked
reference forward applies it unmerged, `y += scale · B (A x)`, so the two are independent checks of
each other. The SMOL adapter itself arrives with the fine-tuning issue; `LoRA` here is one plain,
shape-independent low-rank update per projection.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .shapes import Shape

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weight_name(layer: int, proj: str) -> str:
    """HF name of a projection's weight: attention projections live under self_attn, the rest under mlp."""
    block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
    return f"model.layers.{layer}.{block}.{proj}.weight"


@dataclass
class LoRADelta:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def weight(self) -> torch.Tensor:
        """The dense update in fp32 (method.md pitfall 6: merge in fp32, then cast)."""
        return self.scale * (self.B.double() @ self.A.double()).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * ((x.to(self.A.dtype) @ self.A.T) @ self.B.T).to(x.dtype)


class Adapter:
    """Base class: `delta` gives the update of one projection of one base layer for a shape."""

    def delta(self, shape: Shape, layer: int, proj: str) -> LoRADelta | None:
        raise NotImplementedError

    def record(self, shape: Shape) -> dict:
        """What the manifest says about how the adapter was applied (gate, experts, ...)."""
        return {}


@dataclass
class LoRA(Adapter):
    """One plain LoRA, the same for every shape: {(layer, proj): LoRADelta}."""

    deltas: dict[tuple[int, str], LoRADelta] = field(default_factory=dict)

    def delta(self, shape: Shape, layer: int, proj: str) -> LoRADelta | None:
        return self.deltas.get((layer, proj))

    def record(self, shape: Shape) -> dict:
        return {"kind": "lora", "projections": len(self.deltas)}
