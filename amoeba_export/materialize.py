"""Materialize: ElasticModel × Shape → DenseModel, a physically smaller model streamed tensor by tensor.

For every kept layer (renumbered 0..d-1) the adapter update is merged in fp32 (`W + s·B@A`), then
rows of q/k/v and gate/up and columns of o and down are sliced, and the compensation biases become
o_proj / down_proj biases. Memory holds one weight at a time, so a 7B model exports in well under
its own size.

Two exact paddings happen here, because no runtime can express their absence (docs/flow-internals.md §2):
- GQA groups: runtimes map query head i to KV head i // G with one G per layer. When FLAP keeps an
  uneven number of query heads per KV group, each kept group is filled up to the largest group
  with zero query heads (zero q rows, zero o columns: their output is discarded exactly).
- Empty sub-blocks: a layer with no kept head (or channel) keeps one zero head (or channel), so the
  block still adds its compensation bias (docs/amoeba-algorithm.md §6).
Both are counted in `DenseModel.record["padding"]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .adapter import weight_name
from .elastic import ElasticModel
from .shapes import Shape
from .shared_types import DenseModel, LayerSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _LayerPlan:
    source: int
    q_heads: list[int | None]  # source query head per slot (None = zero padding)
    kv_heads: list[int | None]
    channels: list[int | None]
    o_bias: np.ndarray
    down_bias: np.ndarray


@dataclass(frozen=True)
class Slicing:
    """A DenseModel's `TensorSource`: which units of which source layer each dense layer keeps, over
    the elastic model (its weights, and its adapter merged per shape). It is also the masked
    reference of what the dense model computes (`elastic` at `shape`), which verify compares with."""

    elastic: ElasticModel
    plans: list[_LayerPlan]
    shape: Shape

    def tensors(self, dense: DenseModel) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in `dense.tensor_specs()` order, one weight in memory at a time."""
        em, w, dt = self.elastic, self.elastic.weights, dense.dtype
        yield "model.embed_tokens.weight", w.get("model.embed_tokens.weight").to(dt)
        for j, (plan, spec) in enumerate(zip(self.plans, dense.layers)):
            src, dst = f"model.layers.{plan.source}.", f"model.layers.{j}."
            D = spec.head_dim
            yield dst + "input_layernorm.weight", w.get(src + "input_layernorm.weight").to(dt)
            for proj, heads in (("q_proj", plan.q_heads), ("k_proj", plan.kv_heads), ("v_proj", plan.kv_heads)):
                weight = _gather(self._merged(plan.source, proj), heads, D)
                yield dst + f"self_attn.{proj}.weight", weight.to(dt)
                if spec.attn_bias:
                    n = em.info["n_heads" if proj == "q_proj" else "n_kv_heads"] * D
                    base = _base_bias(w, src + f"self_attn.{proj}.bias", n)
                    yield dst + f"self_attn.{proj}.bias", _gather(base, heads, D).to(dt)
            o = self._merged(plan.source, "o_proj")
            yield dst + "self_attn.o_proj.weight", _gather(o, plan.q_heads, D, dim=1).to(dt)
            if spec.attn_bias:
                yield (
                    dst + "self_attn.o_proj.bias",
                    (
                        _base_bias(w, src + "self_attn.o_proj.bias", dense.hidden_size) + torch.from_numpy(plan.o_bias)
                    ).to(dt),
                )
            yield dst + "post_attention_layernorm.weight", w.get(src + "post_attention_layernorm.weight").to(dt)
            for proj in ("gate_proj", "up_proj"):
                yield dst + f"mlp.{proj}.weight", _gather(self._merged(plan.source, proj), plan.channels, 1).to(dt)
                if spec.mlp_bias:
                    base = _base_bias(w, src + f"mlp.{proj}.bias", em.info["n_ff"])
                    yield dst + f"mlp.{proj}.bias", _gather(base, plan.channels, 1).to(dt)
            down = self._merged(plan.source, "down_proj")
            yield dst + "mlp.down_proj.weight", _gather(down, plan.channels, 1, dim=1).to(dt)
            if spec.mlp_bias:
                yield (
                    dst + "mlp.down_proj.bias",
                    (
                        _base_bias(w, src + "mlp.down_proj.bias", dense.hidden_size) + torch.from_numpy(plan.down_bias)
                    ).to(dt),
                )
        yield "model.norm.weight", w.get("model.norm.weight").to(dt)
        if not dense.tied:
            yield "lm_head.weight", w.get("lm_head.weight").to(dt)

    def _merged(self, layer: int, proj: str) -> torch.Tensor:
        weight = self.elastic.weights.get(weight_name(layer, proj))
        adapter = self.elastic.adapter
        delta = adapter.delta(self.shape, layer, proj) if adapter is not None else None
        if delta is None:
            return weight
        return weight.float() + delta.weight()


def _base_bias(w, name: str, n: int) -> torch.Tensor:
    return w.get(name).float() if name in w else torch.zeros(n)


def _gather(weight: torch.Tensor, units: list[int | None], block: int, dim: int = 0) -> torch.Tensor:
    """Blocks of `block` rows (dim 0) or columns (dim 1) of `weight`, one per unit, zeros where the
    unit is None, gathered in a single indexed copy (numpy's take on the raw bits: fast for every
    dtype, bf16 included)."""
    u = np.array([-1 if x is None else x for x in units], dtype=np.int64)
    idx = (np.maximum(u, 0)[:, None] * block + np.arange(block)).ravel()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    out = torch.from_numpy(np.take(weight.contiguous().view(ints).numpy(), idx, axis=dim)).view(weight.dtype)
    pad = np.flatnonzero(np.repeat(u < 0, block))
    if len(pad):
        out.index_fill_(dim, torch.from_numpy(pad), 0)
    return out


def _plan_layer(source: int, lw, n_kv: int) -> _LayerPlan:
    groups = lw.q_heads.reshape(n_kv, -1)
    G = groups.shape[1]
    kept_groups = [g for g in range(n_kv) if groups[g].any()]
    per_group = {g: [g * G + i for i in range(G) if groups[g, i]] for g in kept_groups}
    width = max((len(v) for v in per_group.values()), default=1)
    q_heads: list[int | None] = []
    for g in kept_groups:
        q_heads += per_group[g] + [None] * (width - len(per_group[g]))
    kv_heads: list[int | None] = list(kept_groups)
    if not kept_groups:  # attention fully pruned: one zero head keeps the o_proj bias path
        q_heads, kv_heads = [None], [None]
    channels: list[int | None] = [int(c) for c in np.flatnonzero(lw.channels)] or [None]
    return _LayerPlan(source, q_heads, kv_heads, channels, lw.o_bias, lw.down_bias)


def materialize(elastic: ElasticModel, shape: Shape, dtype: str | torch.dtype | None = None) -> DenseModel:
    """Plan the dense model of `shape`; weights are read only when `tensors()` is iterated."""
    shape = elastic.strategy.resolve(shape)
    layers, width = elastic.shape_plan(shape)
    info, cfg, w = elastic.info, elastic.config, elastic.weights
    plans = [_plan_layer(i, width[i], info["n_kv_heads"]) for i in layers]
    has = lambda suffix: any(f"model.layers.{i}.{suffix}" in w for i in layers)  # noqa: E731
    comp_o = any(np.any(p.o_bias != 0) for p in plans)
    comp_down = any(np.any(p.down_bias != 0) for p in plans)
    attn_bias = comp_o or has("self_attn.q_proj.bias") or has("self_attn.o_proj.bias")
    mlp_bias = comp_down or has("mlp.down_proj.bias") or has("mlp.gate_proj.bias")
    D = info["head_dim"]
    specs = [LayerSpec(len(p.q_heads), len(p.kv_heads), D, len(p.channels), attn_bias, mlp_bias) for p in plans]
    if dtype is None:
        dtype = w.dtype("model.norm.weight")
    elif isinstance(dtype, str):
        dtype = DTYPES[dtype]
    padding = {
        "zero_query_heads": sum(p.q_heads.count(None) for p in plans),
        "zero_kv_heads": sum(p.kv_heads.count(None) for p in plans),
        "zero_channels": sum(p.channels.count(None) for p in plans),
    }
    record = {
        "shape": str(shape),
        "source_layers": layers,
        "kept_query_heads": [[h for h in p.q_heads if h is not None] for p in plans],
        "padding": padding,
        "adapter": elastic.adapter.record(shape) if elastic.adapter is not None else None,
    }
    return DenseModel(cfg, specs, dtype, elastic.tied, record, Slicing(elastic, plans, shape))
