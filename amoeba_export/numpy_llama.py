"""A LLaMA forward pass in NumPy, for artifacts whose runtime cannot run here.

TensorRT-LLM and MLC-LLM need a GPU; their exporters are checked by reading the written files back
(by the flow's own tensor names), mapping them to Hugging Face names, and running this forward:
no KV cache, the whole sequence at once, float32 by default. Weights are converted to the compute
dtype one layer at a time, and only then read: `weights` may be a `LazyWeights`, whose arrays are
made when looked up (memory-mapped, dequantised, split), so a 7B artifact is checked holding about
one layer (or the embedding, or a slice of the output projection) in float32 plus the activations. On
SmolLM2-135M (logits within about ±40, an 18-token prompt) the float32
forward differs from transformers' by 5e-5 to 9e-5, and so does a float64 one (up to 2.4e-4 at
19x0.5): at that size the difference is float32 rounding in the reference itself, not an error of
either forward. It follows transformers' LlamaForCausalLM
(rotate_half RoPE, RMSNorm in fp32, GQA with query head i reading KV head i // group, SiLU-gated
MLP), with optional biases on every linear and per-layer head counts.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Config:
    hidden_size: int
    layers: list[tuple[int, int]]  # (query heads, KV heads) per layer
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None  # the output projection is lm_head.weight where given, else the embedding


class LazyWeights(Mapping):
    """A read-only mapping name -> array whose values are made by their loader at each lookup (not
    kept): iterating the names reads nothing, and a forward that looks up one layer at a time holds
    one layer."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]):
        self._loaders = loaders

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __contains__(self, name) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


class LastParts:
    """A one-entry cache for fused tensors read as parts (qkv -> q, k, v): the fused array is made
    once for its consecutive part lookups, and dropped when another one is asked for."""

    def __init__(self):
        self._key, self._parts = None, None

    def get(self, key, make: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        if key != self._key:
            self._key, self._parts = None, None  # free the previous one first
            self._parts, self._key = make(), key
        return self._parts


def fused_parts(
    last: LastParts, key, read: Callable[[], np.ndarray], cuts: list[int]
) -> list[Callable[[], np.ndarray]]:
    """Loaders of the parts of a fused weight (qkv, gate_up) split by rows at `cuts`: what a flow that
    stores fused weights (MLC, TensorRT-LLM) reads back under the HF names the forward asks for."""
    return [lambda i=i: last.get(key, lambda: np.split(read(), cuts))[i] for i in range(len(cuts) + 1)]


def uniform_logits_fn(weights: Mapping[str, np.ndarray], *, hidden_size: int, n_layers: int, n_heads: int,
                      n_kv_heads: int, head_dim: int, eps: float, rope_theta: float, rope_scaling: dict | None):
    """`logits_fn` of a model with one size in every layer (the configs of MLC and TensorRT-LLM)."""
    cfg = Config(hidden_size, [(n_heads, n_kv_heads)] * n_layers, head_dim, float(eps), float(rope_theta), rope_scaling)
    return logits_fn(weights, cfg)


HEAD_ROWS = 8192  # output-projection rows converted to the compute dtype at a time


def rope_kind(scaling: dict | None) -> str:
    """The RoPE scaling type of an HF config's scaling dict (v5 `rope_type`, v4 `type`); "default" for none."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def rope_frequencies(theta: float, head_dim: int, scaling: dict | None = None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/D), rescaled by Llama-3's rule when `scaling` says rope_type llama3:
    wavelengths longer than original_ctx/low_freq_factor are divided by `factor`, shorter than
    original_ctx/high_freq_factor kept, the band between blended linearly in original_ctx/wavelength."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = rope_kind(scaling)
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} is not implemented (default and llama3 are)")
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return np.where(wavelen < old_ctx / high, inv_freq,
                    np.where(wavelen > old_ctx / low, inv_freq / factor,
                             (1 - smooth) * inv_freq / factor + smooth * inv_freq))


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    y = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def forward(weights: Mapping[str, np.ndarray], cfg: Config, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Logits [B, T, V] (float32) for `ids` [B, T], computed in `dtype`; `weights` maps HF tensor
    names to arrays (a dict, or a `LazyWeights` read one layer at a time)."""
    w = weights
    ids = np.asarray(ids)
    B, T = ids.shape
    D = cfg.head_dim
    x = np.asarray(w["model.embed_tokens.weight"][ids], dtype=dtype)  # only the rows used are converted
    angles = np.arange(T)[:, None] * rope_frequencies(cfg.rope_theta, D, cfg.rope_scaling)[None]
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(dtype)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(dtype)
    causal = np.triu(np.full((T, T), -np.inf, dtype=dtype), 1)
    for j, (nh, nkv) in enumerate(cfg.layers):
        prefix = f"model.layers.{j}."
        p = {k[len(prefix):]: np.asarray(w[k], dtype=dtype) for k in w if k.startswith(prefix)}
        h = _rms_norm(x, p["input_layernorm.weight"], cfg.rms_norm_eps)
        q = _linear(h, p, "self_attn.q_proj").reshape(B, T, nh, D).transpose(0, 2, 1, 3)
        k = _linear(h, p, "self_attn.k_proj").reshape(B, T, nkv, D).transpose(0, 2, 1, 3)
        v = _linear(h, p, "self_attn.v_proj").reshape(B, T, nkv, D).transpose(0, 2, 1, 3)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + _linear(attn.transpose(0, 2, 1, 3).reshape(B, T, nh * D), p, "self_attn.o_proj")
        h = _rms_norm(x, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = _linear(h, p, "mlp.gate_proj")
        x = x + _linear(gate / (1 + np.exp(-gate)) * _linear(h, p, "mlp.up_proj"), p, "mlp.down_proj")
        del p
    x = _rms_norm(x, np.asarray(w["model.norm.weight"], dtype=dtype), cfg.rms_norm_eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    out = np.empty((B, T, head.shape[0]), np.float32)
    for r in range(0, head.shape[0], HEAD_ROWS):  # the projection a block of rows at a time
        out[..., r:r + HEAD_ROWS] = x @ np.asarray(head[r:r + HEAD_ROWS], dtype=dtype).T
    return out


def logits_fn(weights: dict[str, np.ndarray], cfg: Config):
    """`forward` as an exporter's `load` returns it: torch ids [B, T] -> torch logits [B, T, V]."""
    import torch

    def logits(ids: "torch.Tensor") -> "torch.Tensor":
        return torch.from_numpy(forward(weights, cfg, ids.cpu().numpy()))

    return logits
