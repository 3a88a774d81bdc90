"""The types every stage shares: what a flow's runtime accepts (`FlowCaps`), the dense model a flow
writes (`DenseModel`, one `LayerSpec` per layer) and what is timed (`Workload`).

A leaf module: writers, runtimes and passes import it, and it imports none of them. A DenseModel
gets its weights from a `TensorSource` (materialize's plan over the elastic model), so a writer
streams tensors without knowing where they come from.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from .errors import UserError

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FlowCaps:
    """What a flow's runtime accepts (docs/flow-internals.md §1)."""

    per_layer: bool  # per-layer head / KV-head / channel counts, natively
    o_down_bias: bool  # o_proj and down_proj biases
    head_dims: tuple[int, ...] | None = None  # the kernel set; None: any head_dim
    quants: tuple[str, ...] = FLOAT_DTYPES  # what `--dtype` may say for this flow
    align: dict = field(default_factory=dict)  # quant -> in-feature alignment it needs (n_ff), default 1
    heads_divide_hidden: bool = False  # the uniform (stock) model class needs hidden % n_heads == 0

    def alignment(self, quant: str | None) -> int:
        return int(self.align.get(quant, 1)) if quant else 1


@dataclass(frozen=True)
class LayerSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    attn_bias: bool
    mlp_bias: bool


class TensorSource(Protocol):
    def tensors(self, dense: "DenseModel") -> Iterator[tuple[str, torch.Tensor]]:
        """The dense model's tensors, in `dense.tensor_specs()` order."""
        ...


@dataclass
class DenseModel:
    """A dense pruned model: config fields, one LayerSpec per kept layer, and a tensor stream."""

    config: dict  # the base model's HF config (sizes of the *base*; layers say the rest)
    layers: list[LayerSpec]
    dtype: torch.dtype
    tied: bool
    record: dict = field(default_factory=dict)
    source: "TensorSource | None" = None  # where the weights come from (materialize's plan); None: sizes only

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of every tensor `tensors()` yields, in order, without reading weights."""
        H, V = self.hidden_size, self.vocab_size
        specs = [("model.embed_tokens.weight", (V, H))]
        for j, s in enumerate(self.layers):
            p, q, kv = f"model.layers.{j}.", s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
            specs += [(p + "input_layernorm.weight", (H,))]
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                specs.append((p + f"self_attn.{proj}.weight", (rows, H)))
                if s.attn_bias:
                    specs.append((p + f"self_attn.{proj}.bias", (rows,)))
            specs.append((p + "self_attn.o_proj.weight", (H, q)))
            if s.attn_bias:
                specs.append((p + "self_attn.o_proj.bias", (H,)))
            specs.append((p + "post_attention_layernorm.weight", (H,)))
            for proj in ("gate_proj", "up_proj"):
                specs.append((p + f"mlp.{proj}.weight", (s.n_ff, H)))
                if s.mlp_bias:
                    specs.append((p + f"mlp.{proj}.bias", (s.n_ff,)))
            specs.append((p + "mlp.down_proj.weight", (H, s.n_ff)))
            if s.mlp_bias:
                specs.append((p + "mlp.down_proj.bias", (H,)))
        specs.append(("model.norm.weight", (H,)))
        if not self.tied:
            specs.append(("lm_head.weight", (V, H)))
        return specs

    def sizes(self) -> dict:
        """The sizes a runtime's own config file records: per-layer head counts, vocabulary, context
        and special tokens."""
        base = self.config
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": len(self.layers),
            "num_attention_heads": [s.n_heads for s in self.layers],
            "num_key_value_heads": [s.n_kv_heads for s in self.layers],
            "head_dim": [s.head_dim for s in self.layers],
            "max_position_embeddings": base.get("max_position_embeddings"),
            "bos_token_id": base.get("bos_token_id"),
            "eos_token_id": base.get("eos_token_id"),
            "pad_token_id": base.get("pad_token_id"),
        }

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensor_specs())

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in `tensor_specs()` order, one weight in memory at a time."""
        if self.source is None:
            raise ValueError("this DenseModel has sizes only, no weights")
        return self.source.tensors(self)


# ------------------------------------------------------------------ what is timed
# What is timed: `Workload(batch, prompt_len, gen_len, metric)`.
#
# The metric is the number a budget bounds. `--budget 40ms` means time per output token at batch 1
# and a 128-token prompt unless `--metric`, `--prompt-len`, `--gen-len` or `--batch` say otherwise;
# a budget needs a unit (ms, s, us), and a bare or negative number is an error. The metrics:
#
# - ``tpot``: time per output token, one decode step with a KV cache of `prompt_len` tokens
#   (the default meaning of `--budget`);
# - ``ttft``: time to first token, the prefill of `prompt_len` tokens producing the first token;
# - ``e2e``: the whole request, prefill plus decode until `gen_len` tokens are out.
#
# `key()` names the workload in latency-table paths (`latency_tables/<target>/<flow>/<model>/<key>.json`).
METRICS = ("tpot", "ttft", "e2e")


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 64
    metric: str = "tpot"

    def __post_init__(self):
        for name in ("batch", "prompt_len", "gen_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"workload {name} must be a whole number, got {v!r}")
            if v < 1:
                raise UserError(f"workload {name} must be at least 1, got {v}")
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}: choose one of {', '.join(METRICS)}")

    def timed(self, metrics: tuple[str, ...] | None, max_positions: int | None, limit_name: str
              ) -> tuple[tuple[str, ...], int]:
        """(the metrics a profiler times: `metrics`, default ttft, tpot and the workload's own, each
        once; the longest sequence they need), checked against the artifact's `max_positions`
        (`limit_name` says which setting that is)."""
        metrics = tuple(dict.fromkeys(metrics or ("ttft", "tpot", self.metric)))
        for m in metrics:
            if m not in METRICS:
                raise UserError(f"unknown metric {m!r}: choose from {', '.join(METRICS)}")
        longest = self.prompt_len + (self.gen_len if "e2e" in metrics else 1)
        if max_positions is not None and longest > max_positions:
            raise UserError(f"workload {self.key()} needs {longest} positions but the model's {limit_name} is "
                            f"{max_positions}: shorten --prompt-len or --gen-len")
        return metrics, longest

    def prompt_ids(self, vocab_size: int, seed: int = 0) -> np.ndarray:
        """Seeded random token ids, int64 [batch, prompt_len], within the vocabulary: every profiler
        times the same prompt for the same seed. Random ids cost what text costs: a dense model's work
        does not depend on which tokens it reads."""
        return np.random.default_rng(seed).integers(0, vocab_size, (self.batch, self.prompt_len), dtype=np.int64)

    def key(self) -> str:
        """Filename-safe name, e.g. ``b1-p128-g64-tpot``."""
        return f"b{self.batch}-p{self.prompt_len}-g{self.gen_len}-{self.metric}"

    def __str__(self) -> str:
        return self.key()

    def to_json(self) -> dict:
        """A JSON-serialisable dict (``json.dumps`` it to get text)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | str) -> "Workload":
        """From `to_json()`'s dict, or its JSON text. Unknown or malformed fields are a UserError."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise UserError(f"workload: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"workload: expected an object with batch, prompt_len, gen_len, metric; got {data!r}")
        unknown = set(data) - {"batch", "prompt_len", "gen_len", "metric"}
        if unknown:
            raise UserError(f"workload: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def parse(cls, key: str) -> "Workload":
        """The inverse of `key()`."""
        try:
            b, p, g, metric = key.split("-")
            if not (b[0], p[0], g[0]) == ("b", "p", "g"):
                raise ValueError
            return cls(int(b[1:]), int(p[1:]), int(g[1:]), metric)
        except (ValueError, IndexError):
            raise UserError(f"malformed workload key {key!r}: expected e.g. b1-p128-g64-tpot") from None
