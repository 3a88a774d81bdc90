"""The OpenVINO flow's writer: a stateful OpenVINO IR (`openvino_model.xml` + `.bin`) of the dense model.

The graph is the transformers module of the dense model (stock `LlamaForCausalLM`, or `amoeba_llama`
for per-layer sizes, built with its weights by `flows.pytorch.writer.in_memory`), wrapped by the ONNX
flow's `KVCacheDecoder` so the KV cache is explicit I/O, traced by `ov.convert_model` with one
[batch, kv_heads_N, past, head_dim] shape per cache tensor, then made stateful: each past input and
its present output become one state variable that the infer request keeps between calls
(docs/flow-openvino.md §2). What remains is one input and one output:

    input_ids [batch, sequence] i64  ->  logits [batch, sequence, vocab] f32

Positions and the (all-ones, causal) mask are computed inside the graph from the cached length, so
a caller feeds tokens only; `reset_state()` empties the cache.

Weights (`quant`): float32; float16 (stored f16, decompressed to f32 in the graph); int8: each linear
and the embedding hold symmetric per-output-channel int8 weights and a float32 scale per row, which
OpenVINO keeps as i8 constants + Convert + Multiply, the pattern its CPU plugin runs as compressed
weights (docs/flow-openvino.md §3).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch

from ...errors import UserError
from ...io import write_json
from ...shared_types import DenseModel, FlowCaps
from ..onnx.writer import KVCacheDecoder
from ..pytorch import writer as pytorch

CAPS = FlowCaps(per_layer=True, o_down_bias=True, quants=("float32", "float16", "int8"))
MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
CONFIG_FILE = "openvino_config.json"
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")  # optimum-intel's names
PRESENT = ("present.%d.key", "present.%d.value")
QUANT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def names(templates: tuple[str, str], n_layers: int) -> list[str]:
    """Layer by layer, key then value."""
    return [t % i for i in range(n_layers) for t in templates]


def weight_format(dense: DenseModel, quant: str | None) -> str:
    """float32, float16 or int8; anything else is a UserError."""
    fmt = quant or str(dense.dtype).removeprefix("torch.")
    if fmt not in CAPS.quants:
        raise UserError(f"the openvino flow writes {', '.join(CAPS.quants)} weights, not {fmt}: "
                        "pass --dtype float32, float16 or int8")
    return fmt


# ---------------------------------------------------------------- the module

class Stateful(torch.nn.Module):
    """`KVCacheDecoder` fed with what a stateful graph can derive itself: positions continue from the
    cached length, and the mask is all ones (every sequence has the cached length; no padding)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.decoder = KVCacheDecoder(model)

    def forward(self, input_ids, *past):
        B, S = input_ids.shape
        P = past[0].shape[2]
        positions = torch.arange(S, dtype=torch.long).unsqueeze(0).expand(B, S) + P
        mask = torch.ones(B, P + S, dtype=torch.long)
        return self.decoder(input_ids, mask, positions, *past)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): (q int8, scale float32) with w ~ q * scale[:, None].
    A row of zeros (a pruned head or channel) gets scale 1 and stays exactly zero."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8Rows(torch.nn.Module):
    """int8 rows and their scales, dequantised where used: the traced graph reads
    Constant(i8) -> Convert(f32) -> Multiply(scale), which OpenVINO keeps compressed."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale[:, None].contiguous())

    def weight(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.scale


class Int8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, rows: Int8Rows | None = None):
        super().__init__()
        self.rows = rows or Int8Rows(linear.weight.detach())
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.rows.weight(), self.bias)


class Int8Embedding(torch.nn.Module):
    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.rows = Int8Rows(embedding.weight.detach())

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.rows.weight())


def quantize_int8(model: torch.nn.Module, tied: bool) -> None:
    """Replace every decoder linear, the embedding and the LM head with int8 rows, in place. Tied
    embeddings share one int8 table: a per-row scale is per vocabulary row for both uses."""
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name in QUANT_LINEARS:
                if isinstance(getattr(owner, name, None), torch.nn.Linear):
                    setattr(owner, name, Int8Linear(getattr(owner, name)))
    embed = Int8Embedding(model.model.embed_tokens)
    model.model.embed_tokens = embed
    model.lm_head = Int8Linear(model.lm_head, embed.rows if tied else None)


def module(dense: DenseModel, fmt: str) -> torch.nn.Module:
    """The float32 (or int8-weight) module that is traced; float16 weights are widened exactly and
    narrowed again when saved."""
    model = pytorch.in_memory(dense).float()
    if fmt == "int8":
        quantize_int8(model, dense.tied)
    return model


@contextlib.contextmanager
def rank_preserving_cache():
    """transformers' DynamicLayer starts each layer's cache as a 1-D empty tensor and concatenates the
    keys onto it; torch.cat accepts that, OpenVINO's Concat does not (ranks differ). Start it as an
    empty slice of the keys instead: the same values, of the right rank."""
    from transformers.cache_utils import DynamicLayer

    original = DynamicLayer.lazy_initialization

    def lazy_initialization(self, key_states, value_states):
        original(self, key_states, value_states)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]

    DynamicLayer.lazy_initialization = lazy_initialization
    try:
        yield
    finally:
        DynamicLayer.lazy_initialization = original


# ---------------------------------------------------------------- the graph

def convert(dense: DenseModel, fmt: str):
    """ov.convert_model of the wrapped module (TorchScript trace), I/O named, made stateful."""
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    n = len(dense.layers)
    model = Stateful(module(dense, fmt)).eval()
    B, S, P = 2, 3, 4  # example sizes for the trace; batch, sequence and past are dynamic
    kv_shapes = [(s.n_kv_heads, s.head_dim) for s in dense.layers for _ in (0, 1)]
    example = (torch.zeros(B, S, dtype=torch.long), *[torch.zeros(B, h, P, d) for h, d in kv_shapes])
    shapes = [ov.PartialShape([-1, -1])] + [ov.PartialShape([-1, h, -1, d]) for h, d in kv_shapes]
    with torch.no_grad(), rank_preserving_cache(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on python-side shape checks that hold for every size
        graph = ov.convert_model(model, example_input=example, input=shapes)
    del model
    rename(graph.inputs, ["input_ids", *names(PAST, n)])
    rename(graph.outputs, ["logits", *names(PRESENT, n)])
    apply_make_stateful_transformation(graph, dict(zip(names(PAST, n), names(PRESENT, n))))
    start_empty(graph)
    number_nodes(graph)
    graph.set_friendly_name("amoeba-export openvino")
    return graph


def number_nodes(graph) -> None:
    """Nodes the converter and the passes create are named `<Type>_<global counter>`, which counts every
    node made in the process: rename them by their place in the graph, so the same model gives the
    same file (names from the trace, `__module.decoder.model.../aten::linear/MatMul`, are kept)."""
    for i, op in enumerate(graph.get_ordered_ops()):
        if re.fullmatch(r"[A-Za-z0-9]+_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")


def rename(ports, new: list[str]) -> None:
    """Give each port exactly one tensor name (and its Parameter / Result the same friendly name):
    the trace's own names (`k.1`, `key.1`) say nothing."""
    if len(ports) != len(new):
        raise RuntimeError(f"the traced graph has {len(ports)} ports, expected {len(new)}")
    for port, name in zip(ports, new):
        port.get_tensor().set_names({name})
        port.get_node().set_friendly_name(name)


def start_empty(graph) -> None:
    """Give every state its initial value: zeros of [batch of input_ids, kv_heads, 0, head_dim]. Without
    one, a fresh or reset state has batch 0 and a batch-2 prompt yields no logits (measured)."""
    import numpy as np
    import openvino.opset13 as ops

    batch = ops.gather(ops.shape_of(graph.input("input_ids"), output_type="i64"), ops.constant([0]), ops.constant(0))
    for op in graph.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        _, heads, _, dim = op.get_output_partial_shape(0)
        shape = ops.concat([batch, ops.constant(np.array([heads.get_length(), 0, dim.get_length()], np.int64))], 0)
        op.set_arguments([ops.broadcast(ops.constant(0.0, op.get_output_element_type(0)), shape)])
    graph.validate_nodes_and_infer_types()


def state_names(graph, n: int) -> dict[str, str]:
    """{past input name: state variable id} of the stateful graph (the id names both ends)."""
    ids = sorted(op.get_variable_id() for op in graph.get_ops() if op.get_type_name() == "ReadValue")
    out = {}
    for past, present in zip(names(PAST, n), names(PRESENT, n)):
        found = [v for v in ids if v.startswith(past) and v.endswith(present)]
        if len(found) != 1:
            raise RuntimeError(f"the stateful graph has no single state for {past} -> {present}: {ids}")
        out[past] = found[0]
    return out


# ---------------------------------------------------------------- emit

def openvino_config(dense: DenseModel, fmt: str, states: dict[str, str]) -> dict:
    """What a runner needs besides the IR: I/O names, per-layer KV shapes, weight format, states."""
    import openvino as ov

    base, n = dense.config, len(dense.layers)
    return {
        "format": "amoeba-export openvino",
        "schema": 1,
        "model": MODEL_FILE,
        "weights": WEIGHTS_FILE,
        "openvino": ov.get_version().split("-")[0],
        "dtype": fmt,
        "int8": ({"scheme": "symmetric per output channel (row), int8 in [-127, 127], float32 scale",
                  "layers": [*QUANT_LINEARS, "embed_tokens", "lm_head"]} if fmt == "int8" else None),
        "vocab_size": dense.vocab_size,
        "hidden_size": dense.hidden_size,
        "num_hidden_layers": n,
        "num_attention_heads": [s.n_heads for s in dense.layers],
        "num_key_value_heads": [s.n_kv_heads for s in dense.layers],
        "head_dim": [s.head_dim for s in dense.layers],
        "max_position_embeddings": base.get("max_position_embeddings"),
        "bos_token_id": base.get("bos_token_id"),
        "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"),
        "inputs": ["input_ids"],
        "outputs": ["logits"],
        "states": {"past": names(PAST, n), "present": names(PRESENT, n), "variables": states,
                   "layout": "[batch, kv_heads, cached positions, head_dim]"},
    }


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None):
    """Write openvino_model.xml/.bin, openvino_config.json and the tokenizer files."""
    import openvino as ov

    from ..base import Emitted

    out_dir = Path(out_dir)
    fmt = weight_format(dense, quant)
    graph = convert(dense, fmt)
    states = state_names(graph, len(dense.layers))
    ov.save_model(graph, out_dir / MODEL_FILE, compress_to_fp16=fmt == "float16")
    del graph
    files = [MODEL_FILE, WEIGHTS_FILE, *pytorch.copy_tokenizer(tokenizer_dir, out_dir)]
    write_json(out_dir / CONFIG_FILE, openvino_config(dense, fmt, states))
    return Emitted(files + [CONFIG_FILE], {"dtype": fmt, "bytes": (out_dir / WEIGHTS_FILE).stat().st_size})
