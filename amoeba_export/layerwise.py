"""The base model run one decoder layer at a time, from its memory-mapped weights.

The layer-wise schedule of layer-wise pruning methods (docs/reference-forward.md §1): every
sequence of a pass goes through layer i before layer i+1 is read, so a pass reads each layer once
and memory holds one layer plus the activations. The modules are the model's own Hugging Face
classes, built empty on the meta device and filled from safetensors when a layer is needed, so
the numbers are those of the whole model's forward.

A `LayerStack` is *resident* when the model fits comfortably in the compute device's memory: a
layer read once stays loaded (the whole-model forward, without its load-time copies). Otherwise
each layer goes back to the meta device after use.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .compute import Compute, available_bytes

# Resident when the weights in the compute dtype take at most this share of the free memory: the
# rest holds activations, logits, the artifact's own runtime during verify and the page cache.
RESIDENT_SHARE = 0.4


@dataclass
class State:
    """One batch in flight: its hidden states and what every layer needs besides them."""

    hidden: torch.Tensor
    positions: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]


class LayerStack:
    def __init__(self, model_dir: Path, weights, compute: Compute, resident: bool | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights():  # parameters on the meta device, buffers (RoPE's) real
            model = AutoModelForCausalLM.from_config(config, dtype=compute.torch_dtype, attn_implementation="sdpa")
        self.model = model.eval().requires_grad_(False)
        self.weights, self.compute = weights, compute
        self.model.model.rotary_emb.to(compute.torch_device)
        self._own_head = "lm_head.weight" in weights and not getattr(config, "tie_word_embeddings", False)
        self.resident = self.fits() if resident is None else resident
        self._loaded: set[int] = set()
        self._ends = False  # embeddings, final norm and LM head loaded

    def layer_bytes(self) -> int:
        """All decoder layers' weights in the compute dtype."""
        blocks = self.model.model.layers
        return sum(p.numel() for b in blocks for p in b.parameters()) * self.compute.torch_dtype.itemsize

    def fits(self) -> bool:
        return self.layer_bytes() <= RESIDENT_SHARE * available_bytes(self.compute)

    @property
    def n_layers(self) -> int:
        return len(self.model.model.layers)

    def _load_ends(self) -> None:
        if self._ends:
            return
        m = self.model
        self._fill(m.model.embed_tokens, "model.embed_tokens.")
        self._fill(m.model.norm, "model.norm.")
        if self._own_head:
            self._fill(m.lm_head, "lm_head.")
        else:
            m.lm_head.weight = m.model.embed_tokens.weight
        self._ends = True

    def release(self) -> None:
        """Drop every loaded weight (used again, the stack reads them again): between the reference
        and the artifact's own runtime in verify, so the two never hold memory together."""
        m = self.model
        for i in self._loaded:
            m.model.layers[i].to_empty(device="meta")
        for module in (m.model.embed_tokens, m.model.norm, m.lm_head):
            module.to_empty(device="meta")
        self._loaded.clear()
        self._ends = False

    def _fill(self, module: torch.nn.Module, prefix: str) -> None:
        c = self.compute
        state = {k: self.weights.get(prefix + k).to(c.torch_device, c.torch_dtype) for k in module.state_dict()}
        module.load_state_dict(state, assign=True)

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[torch.nn.Module]:
        """Decoder layer i with its weights loaded; back on the meta device afterwards unless resident."""
        block = self.model.model.layers[i]
        if i not in self._loaded:
            self._fill(block, f"model.layers.{i}.")
            self._loaded.add(i)
        try:
            yield block
        finally:
            if not self.resident:
                block.to_empty(device="meta")
                self._loaded.discard(i)

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> State:
        self._load_ends()
        ids = ids.to(self.compute.torch_device)
        hidden = self.model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return State(hidden, positions, self.model.model.rotary_emb(hidden, position_ids=positions))

    @torch.inference_mode()
    def step(self, block: torch.nn.Module, s: State) -> State:
        """One layer over one batch: causal attention without a mask (sdpa), as the whole model runs it."""
        out = block(s.hidden, attention_mask=None, position_embeddings=s.rope, position_ids=s.positions)
        return State(out[0] if isinstance(out, tuple) else out, s.positions, s.rope)

    @torch.inference_mode()
    def run(
        self, states: list[State], layers, hooks: Callable[[int, torch.nn.Module], list] | None = None
    ) -> list[State]:
        """`states` through `layers` in order, every batch through a layer before the next is read.
        `hooks(i, block)` registers what layer i needs (masks, biases, adapters) and returns the handles."""
        for i in layers:
            with self.layer(i) as block:
                handles = hooks(i, block) if hooks is not None else []
                try:
                    states = [self.step(block, s) for s in states]
                finally:
                    for h in handles:
                        h.remove()
        return states

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._load_ends()
        return self.model.lm_head(self.model.model.norm(hidden))
