"""The MLC-LLM flow: an MLC weight directory plus the script that compiles its model library on the device
(docs/flow-internals.md §7).

`emit` writes what `mlc_llm convert_weight` + `mlc_llm gen_config` would: `params_shard_K.bin` and
`tensor-cache.json` (also written as `ndarray-cache.json`, which MLC builds from before the 2025-09
rename read), `mlc-chat-config.json` and the tokenizer files. MLC's `llama` model fuses q/k/v into
`qkv_proj` and gate/up into `gate_up_proj`; q4f16_1 / q4f32_1 store each linear (embedding and
lm_head included) as 4-bit groups of 32 in-features, bit for bit as MLC's quantiser does (§7.2).
Weights are streamed: one (fused) weight and at most one 32 MiB shard are in memory at a time.

Compiling needs MLC-LLM and its TVM for the device's GPU, which cannot run here: `script` writes
`build.sh` (`mlc_llm compile` for the target's device), `build` runs it where `mlc_llm` is on PATH
and otherwise says where to run it. `load` checks the artifact here: it reads the tensor cache with
its own reader, dequantises, un-fuses to Hugging Face names and runs `numpy_llama.forward`.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from targets import flow_table

from ...errors import UserError
from ...io import dumps_json, read_json, write_json
from ...numpy_llama import LazyWeights
from ...shared_types import DenseModel, FlowCaps
from ..base import Emitted
from ..device import SCRIPT, run_script, skipped, write_script
from ..pytorch.writer import copy_tokenizer, llama3_rope

NAME = "mlc"
# docs/flow-internals.md §7.5: MLC's llama has no linear biases, one config for every layer, hidden % heads == 0;
# q4 groups are 32 in-features (§3)
CAPS = FlowCaps(per_layer=False, o_down_bias=False, quants=("q0f16", "q0bf16", "q0f32", "q4f16_1", "q4f32_1"),
                align={"q4f16_1": 32, "q4f32_1": 32}, heads_divide_hidden=True)
# verify's figures for the float formats (the pipeline enforces none for MLC: every MLC format is a
# `quant`; quantised ones are judged by greedy agreement). Same limits as the pipeline's float dtypes.
TOLERANCE = {"q0f32": 1e-4, "q0f16": 5e-2, "q0bf16": 2e-1}

MODEL_DTYPE = {"q0f16": "float16", "q0bf16": "bfloat16", "q0f32": "float32", "q4f16_1": "float16",
               "q4f32_1": "float32"}
Q4 = ("q4f16_1", "q4f32_1")
GROUP = 32  # q4 group size (in-features)
MAX_INT = 7  # q = round(w / scale) + 7 in 0..14
SHARD_CAP = 32 << 20  # bytes per params_shard file (tvmjs / convert_weight default)
CACHE_FILES = ("tensor-cache.json", "ndarray-cache.json")
CONFIG = "mlc-chat-config.json"
# what `mlc_llm gen_config` copies and lists as tokenizer_files
MLC_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                       "tokenizer_config.json")
# Defaults when emit gets no workload: a context the model can take, capped at 4096 positions (a KV
# cache sized for the device, not the model's longest), prefill chunks of up to 2048, one sequence.
DEFAULT_CONTEXT, DEFAULT_PREFILL = 4096, 2048
PAGE = 16  # MLC's paged KV cache page size: the context is rounded up to whole pages
# MLC's llama fuses these HF projections along the out-dim (loader/standard_loader.py), in this order
FUSIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED = {part: (fused, parts) for fused, parts in FUSIONS.items() for part in parts}
GENERATION_DEFAULTS = {  # MLC's system defaults for what generation_config.json / config.json do not say
    "temperature": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


# ---------------------------------------------------------------- q4 group quantisation (docs/flow-internals.md §7.2)

def quantize_q4(w: np.ndarray, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """MLC's q4fX_1 of a weight [N, K] (K = in-features): (q_weight uint32 [N, 4*ceil(K/32)], q_scale [N, ceil(K/32)]).

    The arithmetic is MLC's, in the model dtype: w cast to it, scale = max|w| / 7 per group of 32,
    q = clip(round_half_even(w / scale + 7), 0, 14), eight 4-bit values per uint32, first in the lowest
    nibble, K zero-padded to whole groups (padded nibbles are 0). An all-zero group has scale 0 and
    0/0 = NaN, which TVM's select-based max/min on the CPU turn into q = 0 (checked against a TVM 0.27
    CPU kernel); we do the same, and it dequantises to 0 whatever q is. Rows are done in blocks so a
    large embedding does not need several full-size temporaries.
    """
    dtype = np.dtype(dtype)
    w = np.asarray(w)
    N, K = w.shape
    G = -(-K // GROUP)
    q_weight = np.empty((N, G * GROUP // 8), np.uint32)
    q_scale = np.empty((N, G), dtype)
    shifts = (4 * np.arange(8)).astype(np.uint32)
    step = max(1, (1 << 22) // (G * GROUP))
    for r in range(0, N, step):
        block = np.zeros((min(step, N - r), G * GROUP), dtype)
        block[:, :K] = w[r:r + step]  # the cast to the model dtype (round to nearest even)
        groups = block.reshape(len(block), G, GROUP)
        scale = (np.abs(groups).max(-1) / dtype.type(MAX_INT)).astype(dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.rint(groups / scale[..., None] + dtype.type(MAX_INT))
        x = np.where(x > 0, x, 0)  # NaN -> 0, as select(x > 0, x, 0)
        x = np.where(x < 2 * MAX_INT, x, 2 * MAX_INT)
        q = x.astype(np.uint32).reshape(len(block), G * GROUP)
        q[:, K:] = 0
        q_weight[r:r + step] = (q.reshape(len(block), -1, 8) << shifts).sum(-1, dtype=np.uint32)
        q_scale[r:r + step] = scale
    return q_weight, q_scale


def dequantize_q4(q_weight: np.ndarray, q_scale: np.ndarray, k: int | None = None) -> np.ndarray:
    """(q - 7) * scale in the scale's dtype, as MLC's kernels compute it; [N, k] (k: the real in-features)."""
    dtype = q_scale.dtype
    N, K = q_weight.shape[0], q_weight.shape[1] * 8
    k = K if k is None else k
    out = np.empty((N, k), dtype)
    shifts = (4 * np.arange(8)).astype(np.uint32)
    step = max(1, (1 << 22) // max(K, 1))  # rows at a time: the temporaries of a large embedding stay small
    for r in range(0, N, step):
        nibbles = (np.asarray(q_weight[r:r + step])[..., None] >> shifts) & np.uint32(0xF)
        q = nibbles.reshape(len(nibbles), -1).astype(dtype)
        out[r:r + step] = ((q - dtype.type(MAX_INT)) * np.repeat(q_scale[r:r + step], GROUP, axis=1)[:, :K])[:, :k]
    return out


# ---------------------------------------------------------------- tensors

def check_fit(dense: DenseModel) -> None:
    """legalize makes the model fit MLC's llama (uniform, bias-free, heads dividing hidden); a model
    that does not is a caller's bug, so ValueError."""
    if not dense.uniform:
        raise ValueError("MLC's llama takes one config for every layer: legalize the model first "
                         "(layout pad or uniform)")
    if any(s.attn_bias or s.mlp_bias for s in dense.layers):
        raise ValueError("MLC's llama has no linear biases: legalize the model first (it drops them, measured)")
    if dense.hidden_size % dense.layers[0].n_heads:
        raise ValueError(f"MLC's llama asserts hidden_size % num_attention_heads == 0 "
                         f"({dense.hidden_size} % {dense.layers[0].n_heads}): legalize with heads_divide_hidden")


def _as_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A torch tensor as a contiguous array of `dtype`'s bytes (bfloat16 as its uint16 bit pattern)."""
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(t.to(getattr(torch, dtype)).numpy())


def mlc_tensors(dense: DenseModel, quant: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """(MLC name, array, dtype name) in write order, one (fused) weight at a time: q/k/v and gate/up
    are held until their last part arrives, concatenated along the out-dim, then converted."""
    dtype = MODEL_DTYPE[quant]
    parts: dict[str, torch.Tensor] = {}
    for name, t in dense.tensors():
        module, _, kind = name.rpartition(".")
        prefix, _, proj = module.rpartition(".")
        if proj in FUSED:
            fused, members = FUSED[proj]
            parts[proj] = t
            if not all(m in parts for m in members):
                continue
            t, module = torch.cat([parts.pop(m) for m in members]), f"{prefix}.{fused}"
        if quant in Q4 and t.ndim == 2:  # every linear and the embedding
            q_weight, q_scale = quantize_q4(_as_numpy(t, dtype), np.dtype(dtype))
            yield f"{module}.q_weight", q_weight, "uint32"
            yield f"{module}.q_scale", q_scale, dtype
        else:
            yield f"{module}.{kind}", _as_numpy(t, dtype), dtype


def write_cache(out_dir: Path, items: Iterable[tuple[str, np.ndarray, str]], parameters: int,
                cap: int | None = None) -> tuple[list[str], dict]:
    """Write params_shard_K.bin and the tensor cache JSON (both names) with tvmjs's sharding rule: tensors
    appended in order; when the pending shard would reach `cap` it is flushed first, unless the tensor
    is at least half the cap, which then goes alone into its own shard at offset 0 (the pending shard
    goes on). Every record is `format: "raw"`: float32 is stored as real float32 (convert_weight's
    "f32-to-bf16" would halve it to bf16 bits); MLC's runtime and `load_tensor_cache` read both.
    Returns (the file names written, the cache's metadata)."""
    out_dir = Path(out_dir)
    cap = SHARD_CAP if cap is None else cap
    shards: list[dict] = []
    pending, records = bytearray(), []
    count, total = 0, 0

    def commit(data, recs: list[dict]) -> None:
        path = f"params_shard_{len(shards)}.bin"
        (out_dir / path).write_bytes(data)
        shards.append({"dataPath": path, "format": "raw-shard", "nbytes": len(data), "records": recs,
                       "md5sum": hashlib.md5(data).hexdigest()})

    for name, arr, dtype in items:
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        rec = {"name": name, "shape": list(arr.shape), "dtype": dtype, "format": "raw", "nbytes": len(data)}
        count, total = count + 1, total + len(data)
        if len(pending) + len(data) >= cap:
            if 2 * len(data) >= cap:
                commit(data, [{**rec, "byteOffset": 0}])
                continue
            commit(pending, records)
            pending, records = bytearray(), []
        records.append({**rec, "byteOffset": len(pending)})
        pending += data
    if pending:
        commit(pending, records)
    # convert_weight's metadata: tensor count, bytes stored, bits per parameter of the source model
    meta = {"ParamSize": count, "ParamBytes": float(total), "BitsPerParam": total * 8.0 / max(parameters, 1)}
    text = dumps_json({"metadata": meta, "records": shards})
    for name in CACHE_FILES:
        (out_dir / name).write_text(text)
    return [s["dataPath"] for s in shards] + list(CACHE_FILES), meta


def read_cache(out_dir: Path, name: str = CACHE_FILES[0]) -> dict[str, np.ndarray]:
    """Every tensor of the cache by name, md5 and sizes checked (a one-line UserError otherwise).
    float32 stored as bf16 bits ("f32-to-bf16", what convert_weight writes) and bfloat16 come back as
    float32 (exact); other dtypes as they are stored."""
    return {k: np.array(v) for k, v in lazy_cache(out_dir, name).items()}


def lazy_cache(out_dir: Path, name: str = CACHE_FILES[0]) -> "LazyWeights":
    """`read_cache` without reading: the same checks (every shard's size and md5, hashed a block at a
    time, and every record's range) up front, then each tensor is memory-mapped from its shard when
    looked up (bf16 widened to float32 then)."""
    from ...io import hash_into
    from ...numpy_llama import LazyWeights

    out_dir = Path(out_dir)
    cache = read_json(out_dir / name)
    loaders = {}
    try:
        for shard in cache["records"]:
            path = out_dir / shard["dataPath"]
            if not path.is_file():
                raise UserError(f"missing MLC weight shard {path}")
            size = path.stat().st_size
            if size != shard["nbytes"]:
                raise UserError(f"truncated MLC weight shard {path}: {size} bytes, {name} says {shard['nbytes']}")
            if "md5sum" in shard and hash_into(hashlib.md5(), path).hexdigest() != shard["md5sum"]:
                raise UserError(f"corrupt MLC weight shard {path}: its md5 is not the {shard['md5sum']} "
                                f"that {name} records")
            for rec in shard["records"]:
                start, n, dtype = rec["byteOffset"], rec["nbytes"], rec["dtype"]
                if start + n > size:
                    raise UserError(f"corrupt {name}: {rec['name']} runs past the end of {path.name}")
                widen = dtype == "bfloat16" or (dtype == "float32" and rec["format"] == "f32-to-bf16")
                stored = np.dtype(np.uint16 if widen else dtype)
                shape = tuple(rec["shape"])
                if n != stored.itemsize * int(np.prod(shape, dtype=np.int64)):
                    raise ValueError(f"{rec['name']}: {n} bytes for shape {list(shape)} of {dtype}")
                loaders[rec["name"]] = _mapped(path, start, n, stored, shape, widen)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt {out_dir / name}: {type(e).__name__} {e}") from None
    return LazyWeights(loaders)


def _mapped(path: Path, start: int, n: int, stored: np.dtype, shape: tuple, widen: bool):
    def load() -> np.ndarray:
        if n == 0:
            arr = np.zeros(shape, stored)
        else:
            arr = np.memmap(path, dtype=stored, mode="r", offset=start, shape=shape)
        return (arr.astype(np.uint32) << 16).view(np.float32) if widen else arr

    return load


# ---------------------------------------------------------------- mlc-chat-config.json

def _conv(name: str, system_template: str, system_message: str, roles: dict, seps: list, sep: str,
          stop_str: list, stop_token_ids: list, system_prefix_token_ids: list | None = None) -> dict:
    """A conversation template as MLC's `Conversation.to_json_dict()` writes it (None fields left out)."""
    conv = {
        "name": name, "system_template": system_template, "system_message": system_message,
        "add_role_after_system_message": True, "roles": roles,
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
        "messages": [], "seps": seps, "role_content_sep": sep, "role_empty_sep": sep, "stop_str": stop_str,
        "stop_token_ids": stop_token_ids, "strip_reasoning_in_history": False, "function_string": "",
        "use_function_calling": False,
    }
    if system_prefix_token_ids is not None:
        conv["system_prefix_token_ids"] = system_prefix_token_ids
    return conv


# The field values of MLC's registered templates (conversation_template/registry.py and llama.py at
# mlc-ai/mlc-llm 79d603f0), including their fixed token ids.
CONV_TEMPLATES = {
    "chatml": _conv("chatml", "<|im_start|>system\n{system_message}<|im_end|>\n",
                    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and "
                    "honest answers.", {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
                    ["<|im_end|>\n"], "\n", ["<|im_end|>"], [2]),
    "llama-3": _conv("llama-3", "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
                     "You are a helpful, respectful and honest assistant.",
                     {"user": "<|start_header_id|>user", "assistant": "<|start_header_id|>assistant"},
                     ["<|eot_id|>"], "<|end_header_id|>\n\n", ["<|end_of_text|>", "<|eot_id|>"], [128001, 128009],
                     [128000]),
    "LM": _conv("LM", "{system_message}", "", {"user": "", "assistant": ""}, [""], "", [], [2], [1]),
}


def chat_template(tokenizer_dir: Path) -> str:
    """The tokenizer's chat template text, wherever transformers keeps it ("" when there is none)."""
    d = Path(tokenizer_dir)
    texts = []
    for name, key in (("tokenizer_config.json", "chat_template"), ("chat_template.json", "chat_template")):
        if (d / name).is_file():
            value = read_json(d / name).get(key) or ""
            texts.append(value if isinstance(value, str) else json.dumps(value))  # a list of named templates
    if (d / "chat_template.jinja").is_file():
        texts.append((d / "chat_template.jinja").read_text(encoding="utf-8"))
    return "\n".join(texts)


def conv_template_name(tokenizer_dir: Path) -> str:
    """chatml for <|im_start|> templates, llama-3 for <|start_header_id|>, else LM (a base model)."""
    text = chat_template(tokenizer_dir)
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama-3"
    return "LM"


def tokenizer_json(tokenizer_dir: Path) -> dict | None:
    """The directory's tokenizer.json, parsed (None without one)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    return read_json(path) if path.is_file() else None


def conv_template(tokenizer_dir: Path, tj: dict | None = None) -> dict:
    """MLC's template for the tokenizer's chat format, its stop token ids those of this tokenizer
    (MLC's registry fixes SmolLM2's and Llama-3's: a Qwen2 chatml model stops on another id).
    `tj`: the directory's tokenizer.json when the caller has parsed it already."""
    conv = json.loads(json.dumps(CONV_TEMPLATES[conv_template_name(tokenizer_dir)]))
    tj = tj if tj is not None else tokenizer_json(tokenizer_dir)
    if tj is not None and conv["stop_str"]:
        ids = {a["content"]: a["id"] for a in tj.get("added_tokens") or []}
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids = {**vocab, **ids}
        found = [ids[t] for t in conv["stop_str"] if t in ids]
        if found:
            conv["stop_token_ids"] = found
    return conv


def tokenizer_info(tj: dict | None) -> dict:
    """MLC's TokenizerInfo as its C++ `DetectTokenizerInfo` derives it from tokenizer.json (`tj`):
    byte_level when a decoder is ByteLevel, byte_fallback when one is ByteFallback (and by default);
    prepend_space_in_encode from a Prepend "▁" normalizer; strip_space_in_decode from a Strip(" ", 1, 0)
    decoder. Without tokenizer.json MLC uses the defaults."""
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False, "strip_space_in_decode": False}
    if tj is None:
        return info

    def flat(node: dict | None, key: str) -> list[dict]:
        node = node or {}
        return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]

    decoders = flat(tj.get("decoder"), "decoders")
    for d in decoders:
        if d.get("type") in ("ByteLevel", "ByteFallback"):
            info["token_postproc_method"] = "byte_level" if d["type"] == "ByteLevel" else "byte_fallback"
    info["prepend_space_in_encode"] = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
                                          for n in flat(tj.get("normalizer"), "normalizers"))
    info["strip_space_in_decode"] = any(d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1
                                        and d.get("stop") == 0 for d in decoders)
    return info


def active_vocab_size(tj: dict | None, vocab_size: int) -> int:
    """Tokens the tokenizer (its tokenizer.json, `tj`) can produce, as MLC takes len(HF tokenizer):
    the model's vocabulary plus the added tokens it does not hold (vocab_size without a tokenizer.json)."""
    if tj is None:
        return vocab_size
    vocab = (tj.get("model") or {}).get("vocab") or {}
    tokens = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}  # Unigram: [token, score]
    return len(tokens) + sum(a.get("content") not in tokens for a in tj.get("added_tokens") or [])


def sizes(max_positions: int | None, workload=None) -> dict:
    """context_window_size, prefill_chunk_size and max_batch_size for `workload`.

    The context holds prompt + generated tokens, rounded up to whole KV-cache pages (16) and capped at
    the model's max_position_embeddings (a workload longer than that is a UserError); prefill chunks
    are the prompt length, so a prompt is prefilled in one call; max_batch_size is the batch. Without a
    workload: min(max_position_embeddings, 4096), prefill min(context, 2048), batch 1.
    """
    if workload is None:
        ctx = min(max_positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        return {"context_window_size": ctx, "prefill_chunk_size": min(ctx, DEFAULT_PREFILL), "max_batch_size": 1}
    need = workload.prompt_len + workload.gen_len
    if max_positions is not None and need > max_positions:
        raise UserError(f"workload {workload} needs {need} positions but the model's max_position_embeddings is "
                        f"{max_positions}: shorten --prompt-len or --gen-len")
    ctx = min(max_positions or need + PAGE, -(-need // PAGE) * PAGE)
    return {"context_window_size": ctx, "prefill_chunk_size": min(workload.prompt_len, ctx),
            "max_batch_size": workload.batch}


def chat_config(dense: DenseModel, tokenizer_dir: Path, quant: str, workload=None) -> dict:
    """mlc-chat-config.json as `mlc_llm gen_config` writes it for this model (docs/flow-internals.md §7.3)."""
    cfg, first = dense.config, dense.layers[0]
    theta, scaling = llama3_rope(cfg, NAME)
    if scaling is not None:
        scaling = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "llama3"}
    max_pos = cfg.get("max_position_embeddings")
    size = sizes(int(max_pos) if max_pos else None, workload)
    shared = {"vocab_size": dense.vocab_size, "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1, **size}
    model_config = {
        "hidden_size": dense.hidden_size, "intermediate_size": first.n_ff, "num_attention_heads": first.n_heads,
        "num_hidden_layers": len(dense.layers), "num_key_value_heads": first.n_kv_heads, "head_dim": first.head_dim,
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "tie_word_embeddings": dense.tied,
        "position_embedding_base": theta, "rope_scaling": scaling, "disaggregation": False, **shared,
    }
    d = Path(tokenizer_dir)
    tj = tokenizer_json(d)  # 3.5 MB for SmolLM2: parsed once for the three fields that read it
    out = {
        "version": "0.1.0", "model_type": "llama", "quantization": quant, "model_task": "chat",
        "model_config": model_config, **{k: v for k, v in shared.items() if k != "max_batch_size"},
        "active_vocab_size": active_vocab_size(tj, dense.vocab_size), "sliding_window_size": -1,
        "attention_sink_size": -1, "embedding_metadata": None,
        "tokenizer_files": [f for f in MLC_TOKENIZER_FILES if (d / f).is_file()],
        "tokenizer_info": tokenizer_info(tj), "conv_template": conv_template(d, tj),
    }
    for name in ("generation_config.json", "config.json"):  # first file that says it wins, then MLC's defaults
        source = read_json(d / name) if (d / name).is_file() else {}
        for key in GENERATION_DEFAULTS:
            if out.get(key) is None and source.get(key) is not None:
                out[key] = source[key]
    for key, value in GENERATION_DEFAULTS.items():
        out.setdefault(key, value)
    return out


# ---------------------------------------------------------------- emit

def default_quant(dense: DenseModel) -> str:
    """The unquantised MLC format of the dense dtype (emit's quant=None)."""
    return {torch.float32: "q0f32", torch.float16: "q0f16", torch.bfloat16: "q0bf16"}[dense.dtype]


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None) -> Emitted:
    """Write the MLC weight directory for `quant` (None: q0f32 / q0f16 / q0bf16 by the dense dtype),
    sized for `workload` (see `sizes`). Same input, same bytes."""
    check_fit(dense)
    quant = quant or default_quant(dense)
    if quant not in CAPS.quants:
        raise UserError(f"flow 'mlc' cannot write {quant!r}: choose one of {', '.join(CAPS.quants)}")
    out_dir = Path(out_dir)
    config = chat_config(dense, tokenizer_dir, quant, workload)  # user errors before any weight is read
    files, meta = write_cache(out_dir, mlc_tensors(dense, quant), dense.parameters())
    write_json(out_dir / CONFIG, config)
    files.append(CONFIG)
    files += copy_tokenizer(Path(tokenizer_dir), out_dir)
    return Emitted(files, {"quantization": quant, "shards": sum(f.startswith("params_shard_") for f in files),
                           "bits_per_param": meta["BitsPerParam"], "conv_template": config["conv_template"]["name"],
                           "tokenizer_info": config["tokenizer_info"],
                           **{k: config["model_config"][k] for k in ("context_window_size", "prefill_chunk_size",
                                                                     "max_batch_size")}})


# ---------------------------------------------------------------- script / build

def device_of(target: dict) -> str:
    """`mlc_llm compile --device`: the [flows.mlc] `device` key, else cuda for a CUDA arch (detected
    on the device where the script runs), cpu for a CPU target, else auto."""
    table = flow_table(target, NAME) or {}
    if table.get("device"):
        return str(table["device"])
    if str(target.get("arch", "")).startswith("sm_"):
        return "cuda"
    return "cpu" if target.get("kind") == "cpu" else "auto"


def device_kind(device: str) -> str:
    """The device's family: "android" for "android:adreno", the "kind" of a JSON target, a tag as is."""
    if device.lstrip().startswith("{"):
        try:
            return str(json.loads(device).get("kind", "custom"))
        except (ValueError, AttributeError):
            return "custom"
    return device.split(":")[0]


def library_suffix(device: str) -> str:
    """The model library's file type by device (mlc_llm support/auto_target.py): a .tar system library
    for iPhone / Mac Catalyst / Android apps, .wasm for WebGPU, .dylib for Metal, else a .so."""
    kind = device_kind(device)
    if device == "android:adreno-so":
        return ".so"
    if kind in ("iphone", "macabi", "android"):
        return ".tar"
    if kind == "webgpu":
        return ".wasm"
    if kind == "metal":
        return ".dylib"
    return ".so"


def library_name(quant: str, device: str) -> str:
    tag = re.sub(r"[^A-Za-z0-9_.]+", "-", device_kind(device)).strip("-") or "device"
    return f"lib/model-{quant}-{tag}{library_suffix(device)}"


def _plan(out_dir: Path, target: dict, quant: str | None, workload) -> dict:
    """What build.sh runs, from the emitted config (quant, sizes) and the target."""
    config = read_json(Path(out_dir) / CONFIG)
    quant = quant or config["quantization"]
    size = ({k: config["model_config"][k] for k in ("context_window_size", "prefill_chunk_size", "max_batch_size")}
            if workload is None else sizes(None, workload))  # emit checked the workload against the model
    device = device_of(target)
    host = (flow_table(target, NAME) or {}).get("host")
    lib = library_name(quant, device)
    overrides = ";".join(f"{k}={v}" for k, v in size.items())
    cmd = ["mlc_llm", "compile", f"./{CONFIG}", "--device", device] + (["--host", str(host)] if host else [])
    cmd += ["--overrides", overrides, "-o", lib]
    arch = str(target.get("arch", ""))
    check_arch = arch.startswith("sm_") and device_kind(device) in ("auto", "cuda")
    return {"device": device, "host": host, "library": lib, "command": cmd, "arch": arch if check_arch else None,
            "target": target.get("name", "device")}


def script(out_dir: Path, target: dict, quant: str | None = None, workload=None) -> list[str]:
    """Write build.sh: `mlc_llm compile` of this directory for the target's device (docs/flow-internals.md §7.4)."""
    p = _plan(out_dir, target, quant, workload)
    name, lib = p["target"], p["library"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Compile the MLC-LLM model library of this directory for {name}"
        + (f" ({target['description']})" if target.get("description") else "") + ".",
        "# Written by amoeba-export. Run it on the device, or on a machine with MLC-LLM and TVM for it: bash build.sh",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "if ! command -v mlc_llm >/dev/null 2>&1; then",
        (f'  echo "build.sh: mlc_llm is not on PATH: install MLC-LLM with TVM for {name} '
         '(https://llm.mlc.ai/docs/install/mlc_llm.html) and run this script again" >&2'),
        "  exit 127",
        "fi",
    ]
    if p["arch"]:
        lines += [
            f"EXPECTED_ARCH={shlex.quote(p['arch'])}",
            "detect_arch() {  # the local GPU's sm_XY: through TVM (MLC's own dependency), else nvidia-smi",
            ("  python3 -c 'import tvm; d = tvm.cuda(0); print(\"sm_\" + d.compute_version.replace(\".\", \"\")) "
             "if d.exist else None' 2>/dev/null | grep -E '^sm_[0-9]+$' && return"),
            ("  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' "
             "| sed 's/^/sm_/' | grep -E '^sm_[0-9]+$' && return"),
            "  true",
            "}",
            'GOT_ARCH="$(detect_arch || true)"',
            'if [ -z "$GOT_ARCH" ]; then',
            (f'  echo "build.sh: warning: could not detect the GPU arch here; this artifact is planned for '
             f'$EXPECTED_ARCH ({name})" >&2'),
            'elif [ "$GOT_ARCH" != "$EXPECTED_ARCH" ]; then',
            (f'  echo "build.sh: warning: this GPU is $GOT_ARCH, not $EXPECTED_ARCH ({name}): --device {p["device"]} '
             'builds for the GPU found here, and the library will not run on the planned device" >&2'),
            "fi",
        ]
        if p["arch"] == "sm_87":
            lines.append("# Jetson Orin (sm_87): to cross-compile elsewhere, use a TVM tag as --device, e.g. "
                         "nvidia/jetson-agx-orin-64gb, nvidia/jetson-agx-orin-32gb or nvidia/jetson-orin-nano "
                         "(they carry an aarch64-linux-gnu host)")
    lines += [
        "mkdir -p lib",
        " ".join(shlex.quote(c) for c in p["command"]),
    ]
    for message in (f"built {lib}", f"run: mlc_llm chat . --model-lib {lib}",
                    f'  or from Python: MLCEngine(model=".", model_lib="{lib}")'):
        lines.append(f"echo {shlex.quote(message)}")
    return write_script(out_dir, "\n".join(lines) + "\n")


def toolchain(mlc_llm: str | None) -> dict:
    """mlc_llm's and its TVM's versions, asked of the interpreter its console script runs with."""
    info: dict = {"mlc_llm": None, "tvm": None, "mlc_llm_path": mlc_llm}
    if mlc_llm is None:
        return info
    try:
        with open(mlc_llm, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
        python = first[2:].strip().split() if first.startswith("#!") else ["python3"]
        code = "import json, mlc_llm, tvm; print(json.dumps([mlc_llm.__version__, tvm.__version__]))"
        got = subprocess.run(python + ["-c", code], capture_output=True, text=True, timeout=120, check=False)
        info["mlc_llm"], info["tvm"] = json.loads(got.stdout.strip().splitlines()[-1])
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        pass
    return info


def build(out_dir: Path, target: dict, quant: str | None = None) -> dict:
    """Run build.sh where mlc_llm is on PATH; otherwise say where to run it. A failed compile is
    recorded (return code, last lines), not raised: the weights and the script are still the artifact."""
    out_dir = Path(out_dir)
    exe = shutil.which("mlc_llm")
    plan = _plan(out_dir, target, quant, None)
    known = {**toolchain(exe), "device": plan["device"], "arch": target.get("arch"), "command": plan["command"]}
    skip = skipped("mlc_llm", target)
    if skip:
        return {**skip, "toolchain": known}
    returncode, lines = run_script(out_dir)
    tail = lines[-20:]
    record = {"script": SCRIPT, "toolchain": known, "returncode": returncode, "output_tail": tail,
              "built": [plan["library"]] if returncode == 0 and (out_dir / plan["library"]).is_file() else []}
    if not record["built"]:
        record["failed"] = f"bash {SCRIPT} exited with {returncode}" + (f": {tail[-1]}" if tail else "")
    return record


# ---------------------------------------------------------------- load (verify)

def hf_weights(out_dir: Path) -> tuple["LazyWeights", dict]:
    """The cache as Hugging Face-named arrays (float16 / float32 as stored, q4 dequantised in its
    scale's dtype, bf16 widened to float32; qkv / gate_up split), and model_config. Lazy: each array is read
    (memory-mapped), dequantised and split when looked up,
    a fused weight once for its consecutive parts, so a forward layer by layer holds one layer."""
    from ...numpy_llama import LastParts, LazyWeights, fused_parts

    out_dir = Path(out_dir)
    mc = read_json(out_dir / CONFIG)["model_config"]
    q, kv, ff, H = mc["num_attention_heads"] * mc["head_dim"], mc["num_key_value_heads"] * mc["head_dim"], \
        mc["intermediate_size"], mc["hidden_size"]
    in_features = {"qkv_proj": H, "o_proj": q, "gate_up_proj": H, "down_proj": ff, "embed_tokens": H, "lm_head": H}
    cache = lazy_cache(out_dir)
    last = LastParts()

    def stored(module: str, kind: str) -> np.ndarray:
        name = f"{module}.{kind}"
        if kind == "q_weight":
            w = dequantize_q4(cache[name], cache[f"{module}.q_scale"], in_features[module.rpartition(".")[2]])
        else:
            w = cache[name]
        return w

    loaders = {}
    for name in sorted(cache):
        module, _, kind = name.rpartition(".")
        if kind == "q_scale":
            continue
        prefix, _, proj = module.rpartition(".")
        read = partial(stored, module, kind)
        if proj == "qkv_proj":
            parts = fused_parts(last, (module, kind), read, [q, q + kv])
            loaders.update({f"{prefix}.{p}.weight": f for p, f in zip(("q_proj", "k_proj", "v_proj"), parts)})
        elif proj == "gate_up_proj":
            parts = fused_parts(last, (module, kind), read, [ff])
            loaders.update({f"{prefix}.{p}.weight": f for p, f in zip(("gate_proj", "up_proj"), parts)})
        else:
            loaders[f"{module}.weight"] = (lambda m=module, k=kind: stored(m, k))
    return LazyWeights(loaders), mc


def load(out_dir: Path):
    """The MLC weights through the NumPy LLaMA forward (MLC's runtime needs its compiled library):
    `ids [B, T] -> logits [B, T, V]` (float32, from the weights as stored: fp16 / dequantised q4)."""
    from ...numpy_llama import uniform_logits_fn

    weights, mc = hf_weights(out_dir)
    return uniform_logits_fn(weights, hidden_size=mc["hidden_size"], n_layers=mc["num_hidden_layers"],
                             n_heads=mc["num_attention_heads"], n_kv_heads=mc["num_key_value_heads"],
                             head_dim=mc["head_dim"], eps=mc["rms_norm_eps"],
                             rope_theta=mc["position_embedding_base"], rope_scaling=mc.get("rope_scaling"))
