"""The llama.cpp flow: one `model.gguf` (docs/flow-internals.md §6).

Uniform shapes use llama.cpp's `llama` arch; per-layer shapes use `deci`, whose graph reads head,
KV-head and FFN counts per layer (head_dim stays global). Both use llama.cpp's NORM RoPE, which
rotates adjacent pairs where HF rotates halves, so q/k rows (and biases) are permuted. Llama-3
RoPE scaling becomes the `rope_freqs.weight` tensor of per-frequency divisors.

Tensors are streamed: the tensor table is written from `DenseModel.tensor_specs()` before any
weight is read, then each weight is converted and written as `DenseModel.tensors()` yields it, so
memory holds one weight (and its converted copy) at a time.

Quantisation: float32/float16/bfloat16, and q8_0/q4_0 (gguf-py's NumPy quantiser) are written by
`emit`; K-quants (q4_k_m, ...) need llama.cpp's own quantiser, so `emit` writes the high-precision
file and `build` quantises it in place through llama-cpp-python.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ...errors import UserError
from ...io import read_json
from ...numpy_llama import rope_frequencies
from ...shared_types import FLOAT_DTYPES, DenseModel, FlowCaps
from ..base import Emitted
from ..pytorch.writer import llama3_rope, rope

NAME = "gguf"
FILE = "model.gguf"

BLOCK_QUANTS = ("q8_0", "q4_0")  # quantised here, by gguf-py
K_QUANTS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")  # quantised by llama.cpp in build()
CAPS = FlowCaps(
    per_layer=True, o_down_bias=True, head_dims=None, quants=FLOAT_DTYPES + BLOCK_QUANTS + K_QUANTS,
    align={**{q: 32 for q in BLOCK_QUANTS}, **{q: 256 for q in K_QUANTS}},
)
# verify's parity limits (max |logit diff| against the masked reference): llama.cpp accumulates in
# its own order (F32 measured 7e-5 on the default model); F16/BF16 round the weights.
TOLERANCE = {"float32": 1e-3, "float16": 0.2, "bfloat16": 0.5}
INSTALL_HINT = ("llama-cpp-python is not installed: run `make setup` (it builds the wheel portably, "
                "CMAKE_ARGS=-DGGML_NATIVE=OFF) or `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36`")

# HF tensor name (after "model.layers.N.") -> GGUF name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}

# Byte-level BPE pre-tokenizers llama.cpp knows, keyed by the HF `Split` regex they implement
# (llama.cpp src/llama-vocab.cpp quotes these as the originals it was adapted from).
SPLIT_PRE = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",  # noqa: E501
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",  # noqa: E501
}


# ---------------------------------------------------------------- names, types, sizes

def gguf_name(hf: str) -> str:
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    rest = hf.removeprefix("model.layers.")
    layer, _, tail = rest.partition(".")
    module, _, kind = tail.rpartition(".")
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def weight_type(quant: str | None, dense: DenseModel):
    """The GGML type of 2-D weights in the file `emit` writes (for a K-quant: the intermediate)."""
    from gguf import GGMLQuantizationType as T

    if quant is None:
        quant = str(dense.dtype).removeprefix("torch.")
    if quant in K_QUANTS:  # llama.cpp quantises best from F32; F16 input stays F16
        return T.F16 if dense.dtype == torch.float16 else T.F32
    return {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def file_type(t) -> int:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16, T.Q8_0: F.MOSTLY_Q8_0,
            T.Q4_0: F.MOSTLY_Q4_0}[t]


def nbytes(shape: tuple[int, ...], t) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t]
    return math.prod(shape) // block * size


def check_quant(dense: DenseModel, quant: str | None) -> None:
    """A UserError naming the first size the quant cannot take (block quants need every 2-D
    weight's in-features to be a multiple of their block; K-quants, per CAPS, n_ff of 256)."""
    if quant is None or quant in FLOAT_DTYPES:
        return
    if quant not in CAPS.quants:
        raise UserError(f"unknown quantisation {quant!r} for the gguf flow: choose one of {', '.join(CAPS.quants)}")
    align = CAPS.alignment(quant)
    hint = f"let legalize pad it (n_ff to a multiple of {align}) or choose another quantisation"
    for j, s in enumerate(dense.layers):
        if s.n_ff % align:
            raise UserError(f"{quant} needs n_ff to be a multiple of {align}, but layer {j} has n_ff={s.n_ff}: {hint}")
    if quant in BLOCK_QUANTS:
        for name, shape in dense.tensor_specs():
            if len(shape) == 2 and shape[1] % align:
                raise UserError(f"{quant} needs in-features that are multiples of {align}, but {name} "
                                f"has {shape[1]}: choose float16 or a shape whose sizes are multiples of {align}")


# ---------------------------------------------------------------- tensor conversion

def permute_rope(t: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half pairs row i with i + D/2 in each head; llama.cpp's NORM RoPE pairs rows 2i
    and 2i+1. Reorder each head's rows from (half, i) to (i, half). Works for weights and biases."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray | None:
    """`rope_freqs.weight` for Llama-3 RoPE scaling: llama.cpp divides each frequency by its
    factor, HF's llama3 rule rescales the frequencies, so factor = inv_freq / scaled inv_freq.
    None for plain RoPE; a UserError for the other scaling types (linear, yarn, ...), not written yet."""
    theta, scaling = llama3_rope(config, NAME)
    if scaling is None:
        return None
    base = rope_frequencies(theta, head_dim)
    scaled = rope_frequencies(theta, head_dim, scaling)
    return (base / scaled).astype(np.float32)


def convert(t: np.ndarray, ggml_type) -> np.ndarray:
    """float32 data -> the array gguf-py writes for `ggml_type` (F32, F16, or quantised bytes)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if ggml_type == T.F32:
        return np.ascontiguousarray(t, dtype=np.float32)
    if ggml_type == T.F16:
        return np.ascontiguousarray(t, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(t, dtype=np.float32), ggml_type)


def plan(dense: DenseModel, wtype) -> list[tuple[str, str | np.ndarray, tuple[int, ...], object]]:
    """(gguf name, hf name or the data of a computed tensor, shape, GGML type), in write order.
    1-D tensors (norms, biases, rope factors) stay F32: they are tiny and llama.cpp adds them in F32."""
    from gguf import GGMLQuantizationType as T

    out = []
    factors = llama3_rope_factors(dense.config, dense.layers[0].head_dim)
    if factors is not None:
        out.append(("rope_freqs.weight", factors, factors.shape, T.F32))
    for hf, shape in dense.tensor_specs():
        out.append((gguf_name(hf), hf, tuple(shape), wtype if len(shape) == 2 else T.F32))
    return out


def stream(dense: DenseModel, entries: list) -> Iterator[tuple[str, np.ndarray]]:
    """Converted arrays in `entries` order, one at a time."""
    from gguf import GGMLQuantizationType as T

    heads = {}
    for j, s in enumerate(dense.layers):
        heads[f"blk.{j}.attn_q"] = s.n_heads
        heads[f"blk.{j}.attn_k"] = s.n_kv_heads
    tensors = dense.tensors()
    for name, hf, shape, t in entries:
        if isinstance(hf, np.ndarray):  # computed in plan()
            data = hf
        else:
            got, tensor = next(tensors)
            if got != hf or tuple(tensor.shape) != shape:  # tensors() and tensor_specs() disagree: a bug
                raise RuntimeError(
                    f"tensor stream out of order: expected {hf} {shape}, got {got} {tuple(tensor.shape)}"
                )
            # already in the file's float type: no float32 round trip (exact either way, half the memory)
            same = (t == T.F16 and tensor.dtype == torch.float16) or (t == T.F32 and tensor.dtype == torch.float32)
            data = tensor.numpy() if same else tensor.float().numpy()
            n = heads.get(name.rpartition(".")[0])
            if n is not None:
                data = permute_rope(data, n)
        yield name, convert(data, t)


# ---------------------------------------------------------------- tokenizer

def bpe_pre(tj: dict) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from the structure of
    its pre-tokenizer (None when it is none of the known ones). ByteLevel alone is GPT-2's regex
    ("gpt-2"); individual digits then ByteLevel is StarCoder/SmolLM's ("smollm"); a Split regex
    followed by a regex-free ByteLevel is looked up in SPLIT_PRE."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if tj.get("normalizer"):
        return None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def adds_specials(tokenizer_file: Path) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the HF tokenizer behaves: encode one character with and without
    special tokens and see what the post-processor puts around it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    k = len(plain)
    start = next((i for i in range(len(full) - k + 1) if full[i:i + k] == plain), 0)
    return start > 0, start + k < len(full)


def add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> dict:
    """Write the tokenizer keys; return a record of what was written and why.

    Byte-level BPE (GPT-2 style, SmolLM2's) is written as `gpt2` with its vocab, token types,
    merges, pre-tokenizer id, special ids, add_bos/add_eos and chat template. Anything else
    (SentencePiece, WordLevel, unknown pre-tokenizers) is written as `none`: the file loads and
    runs on token ids, and llama.cpp cannot tokenize text with it."""
    import gguf

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return _no_vocab(writer, vocab_size, "no tokenizer.json in the tokenizer directory")
    tj = read_json(path)
    model = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        return _no_vocab(
            writer,
            vocab_size,
            f"{model.get('type')} tokenizer (decoder {decoder}) is not byte-level BPE, "
            "the only kind this exporter writes",
        )
    pre = bpe_pre(tj)
    if pre is None:
        return _no_vocab(writer, vocab_size, f"byte-level BPE with a pre-tokenizer llama.cpp has no id for here: "
                                             f"{json.dumps(tj.get('pre_tokenizer'))[:200]}")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UserError(f"tokenizer has token id {max(tokens)} but the model's vocab_size is {vocab_size}")
    names, kinds = [], []
    for i in range(vocab_size):  # ids the tokenizer does not use (padded embedding rows) are UNUSED
        names.append(tokens.get(i, f"[PAD{i}]"))
        kinds.append(int(types.get(i, gguf.TokenType.NORMAL if i in tokens else gguf.TokenType.UNUSED)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(names)
    writer.add_token_types(kinds)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    add_bos, add_eos = adds_specials(path)
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": vocab_size, "merges": len(special.merges),
            "special_ids": dict(sorted(special.special_token_ids.items())), "add_bos": add_bos, "add_eos": add_eos,
            "chat_template": special.chat_template is not None}


def _no_vocab(writer, vocab_size: int, reason: str) -> dict:
    writer.add_tokenizer_model("none")  # llama.cpp then sizes its dummy vocab by `<arch>.vocab_size`
    return {"model": "none", "tokens": vocab_size, "reason": reason,
            "note": "llama.cpp loads the file and runs it on token ids, but cannot tokenize text with it"}


# ---------------------------------------------------------------- emit

def metadata_keys(writer, dense: DenseModel, wtype) -> None:
    """Model hyper-parameters. Per-layer sizes need `deci` (docs/flow-internals.md §6.3); n_ff = 0 would make
    deci skip the layer's residual, so it is refused (materialize keeps >= 1)."""
    from gguf import GGML_QUANT_VERSION
    from gguf import GGMLQuantizationType as T

    cfg, layers = dense.config, dense.layers
    arch = writer.arch
    D = layers[0].head_dim
    if any(s.head_dim != D for s in layers):
        raise UserError("llama.cpp needs one head_dim for every layer")
    if any(s.n_ff < 1 or s.n_heads < 1 or s.n_kv_heads < 1 for s in layers):
        raise UserError(
            "llama.cpp's deci arch treats n_ff=0 / n_heads=0 as special layers: keep one zero channel or head"
        )
    per_layer: Callable[[str], int | list[int]] = (
        (lambda f: getattr(layers[0], f)) if arch == "llama" else (lambda f: [getattr(s, f) for s in layers]))
    theta, _ = rope(cfg)
    base = cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or "amoeba-export model"
    writer.add_name(f"{base} ({dense.record['shape']})" if dense.record.get("shape") else base)
    writer.add_file_type(int(file_type(wtype)))
    writer.add_vocab_size(dense.vocab_size)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(dense.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(per_layer("n_ff"))
    writer.add_head_count(per_layer("n_heads"))
    writer.add_head_count_kv(per_layer("n_kv_heads"))
    writer.add_key_length(D)
    writer.add_value_length(D)
    writer.add_rope_dimension_count(D)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if wtype not in (T.F32, T.F16, T.BF16):
        writer.add_quantization_version(GGML_QUANT_VERSION)


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None) -> Emitted:
    """Write `model.gguf`. `quant` None keeps the dense dtype; a K-quant writes the F32 (F16)
    intermediate that `build` quantises. The record says which arch, weight type and tokenizer."""
    import gguf

    check_quant(dense, quant)
    wtype = weight_type(quant, dense)
    arch = "llama" if dense.uniform else "deci"
    path = Path(out_dir) / FILE
    writer = gguf.GGUFWriter(path, arch)
    try:
        metadata_keys(writer, dense, wtype)
        tok = add_tokenizer(writer, Path(tokenizer_dir), dense.vocab_size)
        entries = plan(dense, wtype)
        for name, _, shape, t in entries:  # the tensor table first: shapes are known before any weight is read
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t), raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, data in tqdm(
            stream(dense, entries), total=len(entries), desc="writing gguf", unit="tensor", leave=False
        ):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return Emitted([FILE], {"arch": arch, "weight_type": wtype.name, "quant": quant, "tokenizer": tok,
                            "rope_freqs": entries[0][0] == "rope_freqs.weight"})


# ---------------------------------------------------------------- build

def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        # `make setup` leaves it out (a 9-minute source build the other flows do not need).
        raise UserError("llama-cpp-python is not installed (the gguf flow runs llama.cpp): run `make setup-gguf` "
                        "(builds its wheel once, about 9 min, portable: CMAKE_ARGS=-DGGML_NATIVE=OFF), or "
                        "`CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36`") from None
    return llama_cpp


def toolchain() -> dict:
    """The versions of what writes and runs the file."""
    from ...manifest import package_versions

    return package_versions(("llama_cpp_python", "gguf"))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (shows llama.cpp's K-quant fallbacks)."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def build(out_dir: Path, target: dict, quant: str | None = None) -> dict:
    """K-quants: llama.cpp's quantiser turns the emitted F32/F16 `model.gguf` into the K-quant
    file, in place (written beside it, then renamed). Other quants: nothing to build."""
    out_dir = Path(out_dir)
    record = {"built": [], "toolchain": toolchain(), "quant": quant}
    if quant not in K_QUANTS:
        record["note"] = "nothing to build: emit wrote the final file"
        return record
    llama_cpp = llama_cpp_module()
    src, tmp = out_dir / FILE, out_dir / f".{FILE}.partial"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    try:
        with native_output() as log:  # the quantizer prints a line per tensor from C
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({quant}) failed with code {rc}: {' / '.join(log[-3:])}")
        os.replace(tmp, src)
    finally:
        tmp.unlink(missing_ok=True)
    record["quantizer_summary"] = [line for line in log if "llama_model_quantize_impl" in line]
    record["built"] = [FILE]
    record["tensor_types"] = tensor_types(src)
    return record


@contextlib.contextmanager
def native_output():
    """Send what native code writes to stdout/stderr into a list of lines (yielded, filled on exit)."""
    import sys
    import tempfile

    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            lines += [line.rstrip() for line in f]


# ---------------------------------------------------------------- load (verify)

def load(out_dir: Path):
    """llama.cpp (llama-cpp-python) runs the file; returns `ids [B, T] -> logits [B, T, V]`, one
    sequence at a time from an empty KV cache. F32 files get an F32 KV cache so that the
    comparison measures the export, not llama.cpp's default F16 cache."""
    llama_cpp = llama_cpp_module()
    from gguf import GGUFReader, LlamaFileType

    path = Path(out_dir) / FILE
    ftype = int(GGUFReader(path).fields["general.file_type"].contents())
    kv = (
        {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if ftype == LlamaFileType.ALL_F32 else {}
    )
    state: dict = {"llm": None, "n_ctx": 0}

    def model(n: int):
        if state["n_ctx"] < n:
            state["llm"] = None  # free the old context first
            n_ctx = max(64, -(-n // 64) * 64)
            state["llm"] = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                           logits_all=True, verbose=False, **kv)
            state["n_ctx"] = n_ctx
        return state["llm"]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        llm = model(T)
        out = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:T], dtype=np.float32)))
        return torch.stack(out)

    return logits
