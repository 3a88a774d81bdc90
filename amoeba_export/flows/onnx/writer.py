"""The ONNX flow: `model.onnx` with KV-cache inputs and outputs, run by ONNX Runtime.

The graph is torch.onnx's dynamo export of the transformers model (stock `LlamaForCausalLM`, or
`amoeba_llama` for per-layer sizes), wrapped so that the KV cache is explicit I/O (docs/flow-internals.md
§8.2). A model that fits one file (under LARGE_BYTES) is built in memory with its weights by the
PyTorch exporter's `in_memory`; a larger one is traced from zero-stride placeholder weights and its
weights are streamed from `DenseModel.tensors()` into `model.onnx.data`, one at a time (each linear
stored transposed, as constant folding stores it, at 64 KiB-aligned offsets that ONNX Runtime can
memory-map), so exporting a 7B model holds about one weight (docs/scale.md). Names follow the
ORT-GenAI / optimum convention:

    inputs   input_ids [batch_size, sequence_length]            int64
             attention_mask [batch_size, total_sequence_length] int64
             position_ids [batch_size, sequence_length]         int64
             past_key_values.N.key / .value [batch_size, kv_heads_N, past_sequence_length, head_dim]
    outputs  logits [batch_size, sequence_length, vocab]
             present.N.key / .value [batch_size, kv_heads_N, total_sequence_length, head_dim]

so every layer keeps its own KV-head count, and an empty past (length 0) is the prefill.
`onnx_config.json` describes that I/O (names, per-layer heads, dtype), so the loader and the
profiler need nothing else. Node debug metadata (stack traces with local paths) is stripped and
symbolic dims are given their conventional names, so the same inputs give byte-identical files.

Where the ORT-GenAI model builder can express the model (uniform layers, stock class, head_dim a
multiple of 16 for the CPU GroupQueryAttention kernel), `genai/` holds its fused-op build with a
ready generation loop (`og.Model`); when it cannot, or the builder fails, `onnx_config.json` says why.

`build` bakes ONNX Runtime's offline graph optimisations into `model.opt.onnx`; `load` (verify)
and the profiler run that file when it exists: what ships is what was timed.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...errors import UserError
from ...io import read_json, scratch_dir, write_json
from ...manifest import package_versions
from ...shared_types import DenseModel, FlowCaps
from ..base import Emitted
from ..pytorch import writer as pytorch

NAME = "onnx"
CAPS = FlowCaps(per_layer=True, o_down_bias=True, head_dims=None, quants=("float32", "float16"))
# verify's limit on the real model (fused ORT kernels sum in another order: 6.2e-5 measured on the
# default model); the tests hold tiny models to 1e-4
TOLERANCE = {"float32": 5e-4}

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, only past LARGE_BYTES (protobuf's 2 GiB limit)
OPT_FILE = "model.opt.onnx"
OPT_DATA_FILE = "model.opt.onnx.data"
CONFIG_FILE = "onnx_config.json"
GENAI_DIR = "genai"
LARGE_BYTES = 1536 * 2**20  # headroom under 2 GiB for the graph itself (torch.onnx uses the same)
OPSET = 18  # docs/flow-internals.md §8.1; older ORT builds (JetPack's) load it too
GENAI_TIMEOUT_S = 1800.0
NP_DTYPES = {"float32": np.float32, "float16": np.float16}

INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")  # ORT-GenAI's name templates
PRESENT = ("present.%d.key", "present.%d.value")
# Symbolic dims, named as ORT-GenAI names them.
BATCH, SEQ, PAST_SEQ, TOTAL_SEQ = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def kv_names(templates: tuple[str, str], n_layers: int) -> list[str]:
    """Layer by layer, key then value: the order of the graph's past inputs and present outputs."""
    return [t % i for i in range(n_layers) for t in templates]


# ---------------------------------------------------------------- the graph

class KVCacheDecoder(torch.nn.Module):
    """The model with its KV cache as explicit tensors: (ids, mask, positions, *past) -> (logits, *present).

    The past goes into a transformers `DynamicCache` layer by layer; attention appends the new
    keys and values, and the grown per-layer tensors come back out as the present.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def placeholder_module(dense: DenseModel):
    """The transformers module of `dense` with every weight a zero-stride placeholder (one element
    broadcast to its shape): the right shapes and dtypes for tracing, no memory for the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ... import modeling  # noqa: F401  (registers amoeba_llama)

    cfg = pytorch.hf_config(dense)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
    zero = torch.zeros((), dtype=dense.dtype)
    model.load_state_dict({n: zero.expand(s) for n, s in dense.tensor_specs()}, strict=not dense.tied, assign=True)
    if dense.tied:
        model.tie_weights()
    rope = model.model.rotary_emb  # computed, not loaded: the real buffer (tiny)
    model.model.rotary_emb = type(rope)(config=model.config)
    return model.eval()


def export_graph(dense: DenseModel, stream: bool = False):
    """torch.onnx (dynamo) export of `dense` with dynamic batch, sequence and past: an onnx_ir Model.

    `stream=False`: the module holds the real weights (`pytorch.in_memory`), which become the graph's
    initializers, folded and deduplicated by `simplify`. `stream=True`: the module holds placeholders
    and the graph is traced from shapes alone; the weight initializers are left without values
    (`const_value` None), so no pass reads or folds them, and each one that only feeds a
    Transpose(1, 0) (every linear) becomes one initializer holding the transposed weight, as
    constant folding makes it from real weights. `write_streamed` then fills them in from
    `dense.tensors()`. Returns (model, {weight name: [(initializer, transposed)]}) when streaming,
    else the model."""
    n = len(dense.layers)
    model = placeholder_module(dense) if stream else pytorch.in_memory(dense)  # meta device, weights assigned once
    B, S, P = 2, 3, 4  # example sizes; all three are dynamic (P = 0 included)
    args = (
        torch.zeros(B, S, dtype=torch.long),
        torch.ones(B, P + S, dtype=torch.long),
        torch.arange(P, P + S).expand(B, S).contiguous(),
        *[torch.zeros(B, s.n_kv_heads, P, s.head_dim, dtype=dense.dtype) for s in dense.layers for _ in (0, 1)],
    )
    Dim = torch.export.Dim
    batch, seq, past = Dim(BATCH), Dim(SEQ), Dim(PAST_SEQ, min=0)
    # torch.export sees `*past` as one tuple argument
    shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq}, ({0: batch, 2: past},) * (2 * n))
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]  # "torchvision is not installed"
    levels = [q.level for q in quiet]  # on every export; onnx_ir's notes on the value-less weights
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.onnx's FutureWarnings about its own internals
            program = torch.onnx.export(
                KVCacheDecoder(model), args, dynamo=True, dynamic_shapes=shapes, opset_version=OPSET,
                input_names=[*INPUTS, *kv_names(PAST, n)], output_names=["logits", *kv_names(PRESENT, n)],
                optimize=False, verbose=False,
            )
        del model
        weights = detach_weights(program.model, dense) if stream else None
        simplify(program.model)
        normalise(program.model)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return (program.model, weights) if stream else program.model


WRAPPER_PREFIX = "model."  # KVCacheDecoder's attribute: the module's parameters are model.<HF name>


def detach_weights(model, dense: DenseModel) -> dict[str, list[tuple[object, bool]]]:
    """Drop the placeholder values of the weight initializers and fold each Transpose(1, 0) that is a
    weight's only use into a transposed initializer (named `<weight>.T`). Returns, per HF weight name,
    the initializers its data goes to and whether transposed."""
    import onnx_ir as ir

    graph = model.graph
    out: dict[str, list[tuple[object, bool]]] = {}
    for name, _ in dense.tensor_specs():
        value = graph.initializers.get(WRAPPER_PREFIX + name)
        if value is None and dense.tied and name == "model.embed_tokens.weight":  # traced under the tied name
            value = graph.initializers.get(WRAPPER_PREFIX + "lm_head.weight")
        if value is None:
            raise RuntimeError(f"the traced graph has no initializer for {name}")
        value.const_value = None
        users = value.consumers()
        node = users[0] if len(users) == 1 else None
        perm = node.attributes.get("perm") if node is not None and node.op_type == "Transpose" else None
        if perm is None or list(perm.value) != [1, 0] or len(value.shape) != 2:
            out[name] = [(value, False)]
            continue
        rows, cols = value.shape
        folded = ir.Value(name=f"{WRAPPER_PREFIX}{name}.T", shape=ir.Shape([cols, rows]), type=value.type)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(value.name)
        folded.const_value = ir.tensor(np.zeros(0, np.float32))  # register_initializer wants a value ...
        graph.register_initializer(folded)
        folded.const_value = None  # ... and write_streamed sets the real one
        out[name] = [(folded, True)]
    return out


DATA_ALIGN = 1 << 16  # offsets in model.onnx.data: ONNX Runtime memory-maps aligned external data


def write_streamed(dense: DenseModel, weights: dict, out_dir: Path) -> int:
    """Write `model.onnx.data` from `dense.tensors()`, one weight at a time (transposed where the
    graph wants it so), and point each weight initializer at its bytes. Returns the bytes written."""
    import onnx_ir as ir

    dtype = ir.DataType.from_numpy(np.dtype(NP_DTYPES[str(dense.dtype).removeprefix("torch.")]))
    with open(out_dir / DATA_FILE, "wb") as f:
        for name, t in tqdm(dense.tensors(), total=len(weights), desc="onnx: writing weights", unit="tensor",
                            leave=False):
            for value, transposed in weights[name]:
                data = (t.T if transposed else t).contiguous()
                f.write(b"\0" * (-f.tell() % DATA_ALIGN))
                offset = f.tell()
                f.write(data.view(-1).view(torch.uint8).numpy().data if data.numel() else b"")
                value.const_value = ir.ExternalTensor(DATA_FILE, offset, f.tell() - offset, dtype,
                                                      shape=ir.Shape(data.shape), name=value.name, base_dir=out_dir)
            del t, data
        return f.tell()


def simplify(model) -> None:
    """Fold the export's shape arithmetic and drop what nothing reads.

    torch.onnx's own `optimize=True` adds onnxscript's pattern rewriter, which takes longer than
    the export itself on a 30-layer model (measured: +40 s on SmolLM2-135M) and buys nothing at run
    time: ONNX Runtime makes the same rewrites when it loads the graph, and `build` saves them.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    fold_constants_ir(model)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
              common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
              common.RemoveUnusedNodesPass()):
        p(model)


def normalise(model) -> None:
    """Make the graph a pure function of the inputs, readable by the runtime's conventions.

    - Drop node and value metadata: torch.onnx records stack traces (local file paths) and FX node
      names there; the runtime reads none of it.
    - Name the symbolic dims as ORT-GenAI does (the mask's and the present's length is
      `total_sequence_length`, not an auto symbol or `past + seq`).
    - Initializers that are still the checkpoint's tensors keep its names
      (`model.layers.0.input_layernorm.weight`), without the export wrapper's `model.` prefix.
    """
    import onnx_ir as ir

    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    renames = {str(mask.shape[1]): TOTAL_SEQ, f"{PAST_SEQ} + {SEQ}": TOTAL_SEQ}
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        node.metadata_props.clear()
        node.doc_string = None
        values += node.outputs
    for value in values:
        value.metadata_props.clear()
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in renames for d in value.shape):
            value.shape = ir.Shape(
                [
                    ir.SymbolicDim(renames.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                    for d in value.shape
                ]
            )
    for name in sorted(graph.initializers):
        if name.startswith("model."):
            graph.initializers[name].name = name.removeprefix("model.")
    model.metadata_props.clear()
    graph.metadata_props.clear()
    model.doc_string = graph.doc_string = None


def save_graph(model, path: Path) -> None:
    """Write the graph as it is: initializers with values inline, external ones (`write_streamed`)
    pointing where they are."""
    import onnx_ir as ir

    ir.save(model, path)


# ---------------------------------------------------------------- emit

def onnx_config(dense: DenseModel, files: list[str], genai: dict) -> dict:
    """What a runner needs besides the graph: I/O names, per-layer KV shapes, dtype, special tokens."""
    return {
        "format": "amoeba-export onnx",
        "schema": 1,
        "model": MODEL_FILE,
        "external_data": DATA_FILE if DATA_FILE in files else None,
        "opset": OPSET,
        "dtype": str(dense.dtype).removeprefix("torch."),
        **dense.sizes(),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": PAST[0], "past_value_names": PAST[1]},
        "outputs": {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
        "genai": genai,
    }


def check_quant(dense: DenseModel, quant: str | None) -> None:
    dtype = str(dense.dtype).removeprefix("torch.")
    if quant not in (None, dtype):
        raise UserError(f"the onnx flow writes {', '.join(CAPS.quants)} weights, not {quant!r}: "
                        "pass --dtype float32 or float16")
    if dtype not in CAPS.quants:
        raise UserError(f"the onnx flow writes {', '.join(CAPS.quants)} weights, not {dtype}: "
                        "pass --dtype float32 or float16")


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None, *,
         genai: bool = True) -> Emitted:
    """Write model.onnx (+ data), tokenizer files, onnx_config.json, and `genai/` where the
    ORT-GenAI builder applies (`genai=False` skips it, e.g. when only timing the graph)."""
    out_dir = Path(out_dir)
    check_quant(dense, quant)
    item = torch.tensor([], dtype=dense.dtype).element_size()
    with tqdm(total=3 if genai else 2, desc="onnx: torch.onnx export", unit="step", leave=False) as bar:
        if dense.parameters() * item > LARGE_BYTES:  # traced from shapes, weights streamed to model.onnx.data
            graph, weights = export_graph(dense, stream=True)
            bar.set_description("onnx: writing model.onnx.data")
            write_streamed(dense, weights, out_dir)
            files = [MODEL_FILE, DATA_FILE]
        else:  # small enough for one file: traced with the weights, which the passes fold and deduplicate
            graph = export_graph(dense)
            bar.set_description("onnx: writing model.onnx")
            files = [MODEL_FILE]
        save_graph(graph, out_dir / MODEL_FILE)
        bar.update()
        del graph
        files += pytorch.copy_tokenizer(tokenizer_dir, out_dir)
        bar.update()
        record = {"built": False, "reason": "not requested (emit(genai=False))"}
        if genai:
            bar.set_description("onnx: ORT-GenAI builder")
            record, built = emit_genai(dense, out_dir, tokenizer_dir)
            files += built
            bar.update()
    write_json(out_dir / CONFIG_FILE, onnx_config(dense, files, record))
    return Emitted(files + [CONFIG_FILE])


# ---------------------------------------------------------------- ORT-GenAI

def genai_blocker(dense: DenseModel) -> str | None:
    """Why the ORT-GenAI builder cannot express `dense` (None: it can). docs/flow-internals.md §1, §8.3."""
    if not dense.uniform:
        return "per-layer sizes: the ORT-GenAI builder has one head count and MLP width for every layer"
    if not pytorch.stock_class(dense):
        return "hidden_size is not a multiple of the head count: not a stock LlamaForCausalLM, which the builder reads"
    s = dense.layers[0]
    if s.head_dim % 16:
        return f"head_dim {s.head_dim}: ORT's CPU GroupQueryAttention needs a multiple of 16"
    linear_outs = {s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_ff, dense.hidden_size}
    if dense.vocab_size in linear_outs:
        # builders/base.py `has_lm_head`: any nn.Linear with out_features == vocab_size is taken
        # for the LM head, and the logits are wired to that layer's input (verified: wrong logits).
        return (f"a projection has {dense.vocab_size} outputs, the vocabulary size: the builder takes any such "
                "Linear for the LM head and emits wrong logits")
    if dense.dtype != torch.float32:
        # builds, but its fp16 CPU graph (repeat_kv instead of GroupQueryAttention) fails at decode
        # in onnxruntime-genai 0.18 ("Shape mismatch attempting to re-use buffer"; measured)
        return f"{str(dense.dtype).removeprefix('torch.')} on the CPU execution provider: only float32 builds run"
    eos = dense.config.get("eos_token_id")
    if any(e is not None and e >= dense.vocab_size for e in (eos if isinstance(eos, list) else [eos])):
        return f"eos_token_id {eos} is outside the vocabulary ({dense.vocab_size}): ORT-GenAI rejects it"
    return None


def emit_genai(dense: DenseModel, out_dir: Path, tokenizer_dir: Path) -> tuple[dict, list[str]]:
    """(record, files under genai/): the builder's artifact from an HF directory written by the
    PyTorch exporter, or a record saying why there is none."""
    reason = genai_blocker(dense)
    if reason is not None:
        return {"built": False, "reason": reason}, []
    src = out_dir / ".genai-hf"  # inside out_dir: an interrupted run discards it with the rest
    src.mkdir(exist_ok=True)
    try:
        pytorch.emit(dense, src, tokenizer_dir)
        record = build_genai(src, out_dir / GENAI_DIR, "fp32")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if not record["built"]:
        return record, []
    files = sorted(str(p.relative_to(out_dir)) for p in (out_dir / GENAI_DIR).rglob("*") if p.is_file())
    return record, files


def build_genai(hf_dir: Path, out: Path, precision: str = "fp32", timeout: float = GENAI_TIMEOUT_S) -> dict:
    """Run `python -m onnxruntime_genai.models.builder` offline on `hf_dir` into `out` (CPU EP),
    then check that onnxruntime-genai loads the result and generates two tokens.

    Subprocesses: the builder is a script, and its failures, hangs or crashes must not take the
    export down. The check matters because a build can succeed and still not run (fp16 on the CPU
    EP: measured). Returns {"built": True, ...} or {"built": False, "reason": ...}; on failure
    `out` is removed. The reason names no temporary path, so the record stays deterministic.
    """
    version = package_versions(("onnxruntime-genai",))["onnxruntime-genai"]
    if version is None:
        return {"built": False, "reason": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    out = Path(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    with scratch_dir("amoeba-genai-cache-") as cache:
        cache = str(cache)
        failure = _run("builder", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                                   "-o", str(out), "-p", precision, "-e", "cpu", "-c", cache], timeout, env)
        if failure is None and not (out / "genai_config.json").is_file():
            failure = "builder wrote no genai_config.json"
        if failure is None:
            failure = _run("onnxruntime-genai check", [sys.executable, "-c", GENAI_CHECK, str(out)], timeout, env)
        if failure is not None:
            shutil.rmtree(out, ignore_errors=True)
            for path in (str(hf_dir), str(out), cache):
                failure = failure.replace(path, "<tmp>")
            return {"built": False, "reason": failure, "onnxruntime_genai": version}
    return {"built": True, "dir": GENAI_DIR, "precision": precision, "execution_provider": "cpu",
            "onnxruntime_genai": version}


# Loads a genai folder and greedily generates two tokens after a one-token prompt.
GENAI_CHECK = """
import sys, onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=3)
gen = og.Generator(model, params)
gen.append_tokens([0])
while not gen.is_done():
    gen.generate_next_token()
"""


def _run(what: str, cmd: list[str], timeout: float, env: dict) -> str | None:
    """None when `cmd` succeeds, else one line saying how it failed."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"{what} timed out after {timeout:g} s"
    if p.returncode == 0:
        return None
    lines = [ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
    return f"{what} exited with {p.returncode}: {lines[-1][:500] if lines else '(no output)'}"


# ---------------------------------------------------------------- build

def build(out_dir: Path, target: dict, quant: str | None = None) -> dict:
    """Bake ONNX Runtime's offline graph optimisations into `model.opt.onnx`.

    ORT's levels: basic rewrites run before partitioning and hold for every execution provider;
    extended fusions (contrib ops) are made for the provider that will run them (CPU here);
    layout optimisations depend on the exact hardware and are not saved offline. So a CPU target
    gets ORT_ENABLE_EXTENDED for the CPU EP, any other target ORT_ENABLE_BASIC, which stays
    portable to the device's provider (CUDA, TensorRT).
    """
    import onnxruntime as ort

    out_dir = Path(out_dir)
    cpu = target.get("kind", "cpu") == "cpu"
    level = "ORT_ENABLE_EXTENDED" if cpu else "ORT_ENABLE_BASIC"
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(out_dir / OPT_FILE)
    so.log_severity_level = 3
    built = [OPT_FILE]
    if (out_dir / DATA_FILE).is_file():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPT_DATA_FILE)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        built.append(OPT_DATA_FILE)
    ort.InferenceSession(str(out_dir / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    return {
        "built": built,
        "toolchain": {"onnxruntime": ort.__version__, **package_versions(("onnx",))},
        "graph_optimization_level": level,
        "execution_provider": "CPUExecutionProvider" if cpu else "any (basic optimisations are provider-independent)",
        "target": target.get("name"),
    }


# ---------------------------------------------------------------- run (verify and profiler)

def artifact_model(out_dir: Path) -> Path:
    """The graph that ships: the optimised one when `build` made it."""
    out_dir = Path(out_dir)
    opt = out_dir / OPT_FILE
    return opt if opt.is_file() else out_dir / MODEL_FILE


def read_config(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_FILE).is_file() or not (out_dir / MODEL_FILE).is_file():
        raise UserError(f"{out_dir}: not an exported ONNX-flow directory (no {CONFIG_FILE} / {MODEL_FILE}); "
                        "export one with `amoeba-export --flow onnx --out DIR`")
    return read_json(out_dir / CONFIG_FILE)


def session(path: Path, threads: int | None = None, low_memory: bool = False):
    """An ONNX Runtime CPU session: `threads` intra-op threads (None: ORT's default), one
    inter-op thread and sequential execution, since a decoder's graph is a chain. `low_memory`: no
    graph optimisations, priority-based node order and no memory arena (see `load`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if low_memory:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.enable_cpu_mem_arena = False
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def empty_past(config: dict, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache for `batch` sequences: the feed of a prefill."""
    dt = NP_DTYPES[config["dtype"]]
    shapes = [(batch, kv, 0, d) for kv, d in zip(config["num_key_value_heads"], config["head_dim"]) for _ in PAST]
    return {name: np.zeros(s, dtype=dt) for name, s in zip(kv_names(PAST, config["num_hidden_layers"]), shapes)}


def step(sess, ids: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
    """One forward of `ids [B, S]` after the cached positions in `past` (arrays or OrtValues):
    (logits [B, S, V], the grown cache as OrtValues, keyed as the next step's past).

    The cache stays in ORT's own buffers from step to step (`run_with_ort_values`), so a decode
    loop copies nothing but the logits out. Every sequence has the same length (no padding).
    """
    import onnxruntime as ort

    B, S = ids.shape
    first = next(iter(past.values()))
    P = (first.shape() if isinstance(first, ort.OrtValue) else first.shape)[2]
    feed = {
        "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
        "attention_mask": np.ones((B, P + S), dtype=np.int64),
        "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(P, P + S, dtype=np.int64), (B, S))),
        **past,
    }
    feed = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for k, v in feed.items()}
    names = [o.name for o in sess.get_outputs()]
    out = sess.run_with_ort_values(names, feed)
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], out[1:])}
    return out[0].numpy(), present


def next_token(logits: np.ndarray) -> np.ndarray:
    """Greedy choice from the last position: `[batch, 1]` ids."""
    return logits[:, -1, :].argmax(-1)[:, None]


def load(out_dir: Path):
    """ONNX Runtime (CPU EP) runs the shipped graph with an empty past; returns a logits function.

    A graph with external data (a large model) runs in `low_memory` mode. The CPU EP has no float16
    MatMul, so ORT puts a Cast to float32 before each float16 weight's use: optimised, constant folding
    makes a float32 copy of every weight at load (twice the artifact: 21 GB for a 24-layer 7B model);
    unoptimised in ORT's default order, the casts, which depend on no input, run first and are all
    alive at once (12.5 GiB measured). Without optimisations, in priority order and without the arena,
    each weight is cast when its node runs and freed after it (a 4-layer 4096-wide model: 0.93 GiB of
    anonymous memory against 2.8 GiB), and the session holds the memory-mapped artifact
    (docs/scale.md). The logits differ from the optimised graph's by summation order only."""
    config = read_config(out_dir)
    sess = session(artifact_model(out_dir), low_memory=bool(config.get("external_data")))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out, _ = step(sess, ids.numpy(), empty_past(config, ids.shape[0]))
        return torch.from_numpy(out)

    return logits
