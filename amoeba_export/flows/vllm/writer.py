"""The vLLM flow's writer: a Hugging Face directory that vLLM loads natively (docs/flow-vllm.md).

- Uniform layers the stock class can express, without o_proj/down_proj biases: a stock
  `LlamaForCausalLM` directory, written by the PyTorch exporter's own functions.
- Anything else: the Nemotron-NAS / DeciLM layout (`DeciLMForCausalLM`), whose `block_configs` give
  every layer its own KV-head count and MLP width, or a no-op in place of either sub-block. What that
  layout cannot say is made exact by zero padding here (docs/flow-vllm.md §3):
  * one query-head count for every layer: each KV group is filled with zero query heads (zero q rows,
    zero o columns) up to `num_attention_heads / n_kv_heads`; where no KV-head count divides it, a group
    is split over several copies of its KV head, and spare KV heads are zero;
  * a removed attention in layer 0 (vLLM crashes on a layer-0 attention no-op), or one whose o_proj bias
    must still be added: a one-KV-head attention with zero weights, which adds exactly its bias;
  * `mlp_bias` means gate, up AND down biases in vLLM (missing ones load as uninitialised memory):
    zero gate/up biases are written wherever down_proj has one, and zero biases in layers without;
  * `attention_bias` with `qkv_bias: false` gives an o_proj bias alone; q/k/v biases are written only
    where the base model has them.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ...errors import UserError
from ...io import write_json, write_safetensors_stream
from ...shared_types import FLOAT_DTYPES, DenseModel, FlowCaps
from ..base import Emitted
from ..pytorch import writer as pytorch

# vLLM's CPU attention backend has kernels for these head sizes only (docs/flow-vllm.md §5).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CAPS = FlowCaps(per_layer=True, o_down_bias=True, head_dims=CPU_HEAD_DIMS, quants=FLOAT_DTYPES)

CONFIG_CODE = "configuration_decilm.py"
CONFIG_FILE = Path(__file__).parent / CONFIG_CODE  # copied into the artifact, not imported here
QKV_BIAS_TYPES = ("qwen2",)  # base model types whose q/k/v carry biases without `attention_bias`


@dataclass(frozen=True)
class Attention:
    """One layer's attention as written: `kind` is "full", "zero" (weights all zero: adds only its
    o_proj bias) or "no_op"; the source query head of every written query head and the source KV head
    of every written KV head (None: a zero head)."""

    kind: str
    q_slots: tuple[int | None, ...] = ()
    kv_slots: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Ffn:
    kind: str  # "full", "zero" (one zero channel: adds only its down_proj bias) or "no_op"
    width: int = 0


@dataclass(frozen=True)
class Layout:
    """How a DenseModel is written for vLLM: stock Llama, or DeciLM blocks with one query-head count."""

    stock: bool
    n_heads: int  # num_attention_heads of every layer
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    attention: tuple[Attention, ...]
    ffn: tuple[Ffn, ...]

    def padding(self) -> dict:
        full = [a for a in self.attention if a.kind == "full"]
        return {
            "zero_query_heads": sum(a.q_slots.count(None) for a in full),
            "zero_kv_heads": sum(a.kv_slots.count(None) for a in full),
            "repeated_kv_heads": sum(len([s for s in a.kv_slots if s is not None]) - len({*a.kv_slots} - {None})
                                     for a in full),
            "zero_attention_layers": [j for j, a in enumerate(self.attention) if a.kind == "zero"],
            "no_op_attention_layers": [j for j, a in enumerate(self.attention) if a.kind == "no_op"],
            "zero_mlp_layers": [j for j, f in enumerate(self.ffn) if f.kind == "zero"],
            "no_op_mlp_layers": [j for j, f in enumerate(self.ffn) if f.kind == "no_op"],
        }


def base_qkv_bias(config: dict) -> bool:
    return bool(config.get("attention_bias")) or config.get("model_type") in QKV_BIAS_TYPES


def plan(dense: DenseModel) -> Layout:
    """The layout vLLM loads for `dense` (pure: sizes only, no weights read)."""
    layers = dense.layers
    D = layers[0].head_dim if layers else 0
    if any(s.head_dim != D for s in layers):
        raise UserError("vLLM takes one head_dim for every layer; this model's layers differ")
    o_bias = any(s.attn_bias for s in layers)
    mlp_bias = any(s.mlp_bias for s in layers)
    first = layers[0]
    if (first.n_heads and first.n_ff and not o_bias and not mlp_bias and pytorch.stock_class(dense)
            and first.n_heads % first.n_kv_heads == 0):
        return Layout(True, first.n_heads, D, False, False, False,
                      tuple(Attention("full", tuple(range(first.n_heads)), tuple(range(first.n_kv_heads)))
                            for _ in layers), tuple(Ffn("full", first.n_ff) for _ in layers))
    return _decilm(dense)


def _decilm(dense: DenseModel) -> Layout:
    layers = dense.layers
    o_bias = any(s.attn_bias for s in layers)
    full = [s for s in layers if s.n_heads > 0]
    for j, s in enumerate(layers):
        if s.n_heads and (s.n_kv_heads < 1 or s.n_heads % s.n_kv_heads):
            raise UserError(f"layer {j}: {s.n_heads} query heads do not split evenly over {s.n_kv_heads} KV heads")
    n_heads = _query_heads(full)
    attention, ffn = [], []
    for j, s in enumerate(layers):
        if s.n_heads:
            attention.append(_groups(s.n_heads, s.n_kv_heads, n_heads))
        elif j == 0 or s.attn_bias:  # vLLM crashes on a layer-0 no-op; a bias must still be added
            attention.append(Attention("zero", (None,) * n_heads, (None,)))
        else:
            attention.append(Attention("no_op"))
        if s.n_ff:
            ffn.append(Ffn("full", s.n_ff))
        else:
            ffn.append(Ffn("zero", 1) if s.mlp_bias else Ffn("no_op"))
    return Layout(False, n_heads, layers[0].head_dim, o_bias and base_qkv_bias(dense.config), o_bias,
                  any(s.mlp_bias for s in layers), tuple(attention), tuple(ffn))


def _query_heads(full) -> int:
    """num_attention_heads for every layer: the count, from the largest layer's up, that writes the
    fewest attention weights (q and o per query head, k and v per KV head) once every layer is fitted."""
    if not full:
        return 1
    most = max(s.n_heads for s in full)
    best = None
    for n in range(most, 2 * most * math.lcm(*(s.n_kv_heads for s in full)) + 1):
        cost = sum(2 * n + 2 * len(_groups(s.n_heads, s.n_kv_heads, n).kv_slots) for s in full)
        if best is None or cost < best[0]:
            best = (cost, n)
        if n >= 4 * most and best is not None:
            break  # past this, query-head padding alone outweighs any KV saving
    return best[1]


def _groups(n: int, kv: int, total: int) -> Attention:
    """Fit `kv` groups of `n // kv` query heads into `total` query heads: the fewest KV heads `d` that
    divide `total` (n_heads_in_group = total // d) with every group split into sub-groups of at most
    total // d heads, each sub-group attending to its own copy of the group's KV head."""
    g = n // kv
    for d in range(kv, total + 1):
        if total % d:
            continue
        size = total // d
        per = -(-g // size)  # sub-groups per source group
        if kv * per > d:
            continue
        q_slots: list[int | None] = []
        kv_slots: list[int | None] = []
        for k in range(kv):
            for s in range(per):
                kv_slots.append(k)
                q_slots += [k * g + s * size + t if s * size + t < g else None for t in range(size)]
        extra = d - len(kv_slots)  # spare KV heads (zero), whose query heads are all zero
        return Attention("full", tuple(q_slots + [None] * extra * size), tuple(kv_slots + [None] * extra))
    raise AssertionError("unreachable: d = total always fits")


def decilm_config(dense: DenseModel, layout: Layout) -> dict:
    """config.json of the DeciLM layout: the PyTorch exporter's fields, then the Nemotron-NAS ones."""
    cfg = pytorch.hf_config(dense)
    for key in ("layer_specs", "auto_map", "num_key_value_heads"):
        cfg.pop(key, None)
    blocks = []
    for a, f in zip(layout.attention, layout.ffn):
        attn = {"no_op": a.kind == "no_op"}
        if a.kind != "no_op":
            attn["n_heads_in_group"] = layout.n_heads // len(a.kv_slots)
        ffn = {"no_op": f.kind == "no_op"}
        if f.kind != "no_op":
            ffn["intermediate_size"] = f.width  # never ffn_mult: vLLM prefers it and rounds it up to 256
        blocks.append({"attention": attn, "ffn": ffn})
    kv = [len(a.kv_slots) for a in layout.attention if a.kind != "no_op"]
    cfg.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={"AutoConfig": f"{CONFIG_CODE[:-3]}.DeciLMConfig"},
        num_attention_heads=layout.n_heads,
        num_key_value_heads=kv[0] if kv else 1,
        head_dim=layout.head_dim,
        intermediate_size=max([f.width for f in layout.ffn] + [1]),
        hidden_act="silu",
        attention_bias=layout.o_bias,
        qkv_bias=layout.qkv_bias,
        mlp_bias=layout.mlp_bias,
        block_configs=blocks,
    )
    return cfg


def tensor_specs(dense: DenseModel, layout: Layout) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of what the DeciLM layout stores, in the order `tensors` yields them."""
    H, V, D = dense.hidden_size, dense.vocab_size, layout.head_dim
    specs = [("model.embed_tokens.weight", (V, H))]
    for j, (a, f) in enumerate(zip(layout.attention, layout.ffn)):
        p = f"model.layers.{j}."
        if a.kind != "no_op":
            q, kv = layout.n_heads * D, len(a.kv_slots) * D
            specs.append((p + "input_layernorm.weight", (H,)))
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                specs.append((p + f"self_attn.{proj}.weight", (rows, H)))
                if layout.qkv_bias:
                    specs.append((p + f"self_attn.{proj}.bias", (rows,)))
            specs.append((p + "self_attn.o_proj.weight", (H, q)))
            if layout.o_bias:
                specs.append((p + "self_attn.o_proj.bias", (H,)))
        if f.kind != "no_op":
            specs.append((p + "post_attention_layernorm.weight", (H,)))
            for proj in ("gate_proj", "up_proj"):
                specs.append((p + f"mlp.{proj}.weight", (f.width, H)))
                if layout.mlp_bias:
                    specs.append((p + f"mlp.{proj}.bias", (f.width,)))
            specs.append((p + "mlp.down_proj.weight", (H, f.width)))
            if layout.mlp_bias:
                specs.append((p + "mlp.down_proj.bias", (H,)))
    specs.append(("model.norm.weight", (H,)))
    if not dense.tied:
        specs.append(("lm_head.weight", (V, H)))
    return specs


def _slots(t: torch.Tensor, slots: tuple[int | None, ...], block: int, dim: int = 0) -> torch.Tensor:
    """Blocks of `block` rows (dim 0) or columns (dim 1) of `t`, one per slot; zeros where None."""
    zero = torch.zeros(*((block,) if t.dim() == 1 else (block, t.shape[1]) if dim == 0 else (t.shape[0], block)),
                       dtype=t.dtype)
    return torch.cat([t.narrow(dim, s * block, block) if s is not None else zero for s in slots], dim)


def tensors(dense: DenseModel, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense model's stream rewritten into the DeciLM layout, one tensor at a time."""
    D, H, dt = layout.head_dim, dense.hidden_size, dense.dtype
    for name, t in dense.tensors():
        if not name.startswith("model.layers."):
            yield name, t
            continue
        j_text, key = name[len("model.layers."):].split(".", 1)
        j = int(j_text)
        a, f, spec = layout.attention[j], layout.ffn[j], dense.layers[j]
        p = f"model.layers.{j}."
        sub, _, kind = key.rpartition(".")  # e.g. ("self_attn.q_proj", "weight")
        if key.startswith(("input_layernorm", "self_attn")) and a.kind == "no_op":
            if kind == "bias" and torch.any(t != 0):
                raise AssertionError(f"{name}: a no-op attention cannot add a non-zero bias")
            continue
        if key.startswith(("post_attention_layernorm", "mlp")) and f.kind == "no_op":
            if kind == "bias" and torch.any(t != 0):
                raise AssertionError(f"{name}: a no-op MLP cannot add a non-zero bias")
            continue
        if key.endswith("layernorm.weight"):
            yield name, t
            continue
        proj = sub.split(".")[1]
        if f.kind == "zero" and sub.startswith("mlp") and (kind == "weight" or proj != "down_proj"):
            shape = (1,) if kind == "bias" else (H, 1) if proj == "down_proj" else (1, H)
            t = torch.zeros(shape, dtype=dt)  # one zero channel: adds down_proj's bias, exactly
            yield name, t
            if kind == "weight" and layout.mlp_bias and not spec.mlp_bias:
                yield p + f"{sub}.bias", torch.zeros(H if proj == "down_proj" else 1, dtype=dt)
            continue
        if proj in ("q_proj", "k_proj", "v_proj"):
            slots = a.q_slots if proj == "q_proj" else a.kv_slots
            if a.kind == "zero":
                t = torch.zeros(len(slots) * D, *t.shape[1:], dtype=dt)
            else:
                t = _slots(t, slots, D)
            if kind == "bias" and not layout.qkv_bias:
                if torch.any(t != 0):
                    raise AssertionError(f"{name}: non-zero q/k/v bias, but the base config says it has none")
                continue
            yield name, t
            if kind == "weight" and layout.qkv_bias and not spec.attn_bias:
                yield p + f"{sub}.bias", torch.zeros(t.shape[0], dtype=dt)
        elif proj == "o_proj":
            if kind == "weight":
                t = torch.zeros(H, layout.n_heads * D, dtype=dt) if a.kind == "zero" else _slots(t, a.q_slots, D, dim=1)
            yield name, t
            if kind == "weight" and layout.o_bias and not spec.attn_bias:
                yield p + f"{sub}.bias", torch.zeros(H, dtype=dt)
        else:  # gate_proj, up_proj, down_proj of a full MLP
            yield name, t
            if kind == "weight" and layout.mlp_bias and not spec.mlp_bias:
                yield p + f"{sub}.bias", torch.zeros(H if proj == "down_proj" else f.width, dtype=dt)


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None) -> Emitted:
    """Write the artifact; the record says which layout and what was padded."""
    if quant not in (None, *CAPS.quants):
        raise UserError(f"the vllm flow writes {', '.join(CAPS.quants)}; got {quant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = plan(dense)
    record = {"layout": "LlamaForCausalLM" if layout.stock else "DeciLMForCausalLM",
              "num_attention_heads": layout.n_heads, "trust_remote_code": not layout.stock}
    if layout.stock:
        return Emitted(pytorch.emit(dense, out_dir, tokenizer_dir).files, {**record, "serve": serve(out_dir)})
    record["padding"] = layout.padding()
    write_json(out_dir / "config.json", decilm_config(dense, layout))
    files = ["config.json"]
    specs = tensor_specs(dense, layout)
    stream = tqdm(tensors(dense, layout), total=len(specs), desc="writing weights", unit="tensor", leave=False)
    files += write_safetensors_stream(out_dir, specs, stream, dense.dtype)
    files += pytorch.copy_tokenizer(tokenizer_dir, out_dir)
    shutil.copyfile(CONFIG_FILE, out_dir / CONFIG_CODE)
    files.append(CONFIG_CODE)
    return Emitted(files, {**record, "serve": serve(out_dir)})


def serve(out_dir: Path) -> str:
    """The manifest's serve command, run from inside the artifact folder."""
    from .runtime import serve_command

    return serve_command(out_dir, shown=".")
