"""The TensorRT-LLM flow: one directory that serves both TensorRT-LLM lines (docs/flow-internals.md §5).

- The directory itself is the Hugging Face directory of the PyTorch flow (stock `LlamaForCausalLM`):
  TensorRT-LLM 1.x's PyTorch backend loads it as it is (`trtllm-serve DIR`, `LLM(model=DIR)`).
- `trtllm_checkpoint/` is the unified checkpoint (`config.json` + `rank0.safetensors`) that
  `trtllm-build` compiles into an engine on TensorRT-LLM <= 1.2 and on Jetson's v0.12.0-jetson
  branch. It is written here, not by TensorRT-LLM's `convert_checkpoint.py`, because that converter
  drops `mlp_bias` (§5.2) and our o/down compensation biases need it.
- `build.sh` runs on the device: engines are specific to the GPU architecture, and TensorRT-LLM
  cannot be installed on a machine without one (§5.3).

Nothing of TensorRT-LLM runs here, so `load` checks the checkpoint by reading it back by its
TensorRT-LLM names (fused qkv split by head counts, `mlp.fc` = gate_proj, `mlp.gate` = up_proj)
and running the NumPy LLaMA forward on it.

Quantisation (int4_awq, int8_wo, int4_wo) needs TensorRT-LLM's own kernels' weight layouts, so it
happens on the device (`build.sh`); the checkpoint written here is then float16.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from targets import flow_table

from ...errors import UserError
from ...io import read_json, safetensors_header, write_json, write_safetensors_stream
from ...numpy_llama import LazyWeights, uniform_logits_fn
from ...shared_types import DenseModel, FlowCaps
from ..base import Emitted
from ..device import SCRIPT, run_script, skipped, write_script
from ..pytorch import writer as pytorch

NAME = "trtllm"
# docs/flow-internals.md §1 and §5: kernel head sizes; one size per layer (DeciLM's per-layer configs carry no
# biases); the HF directory for the PyTorch backend is the stock class, so heads must divide hidden.
# int4_awq groups 64 or 128 in-features (§3): n_ff is padded (exactly) to a multiple of 64.
HEAD_DIMS = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)
CAPS = FlowCaps(per_layer=False, o_down_bias=True, head_dims=HEAD_DIMS,
                quants=("float16", "bfloat16", "float32", "int4_awq", "int8_wo", "int4_wo"),
                align={"int4_awq": 64}, heads_divide_hidden=True)
QUANTS = ("int4_awq", "int8_wo", "int4_wo")  # quantised on the device from float16
CKPT = "trtllm_checkpoint"
RANK0 = "rank0.safetensors"
# verify's parity limits. float32: the NumPy forward sums in another order than torch; measured on
# SmolLM2-135M (logits in about [-20, 40], verify's 18-token prompt) 5.1e-5 at 30x1.0, 1.03e-4 at
# 24x0.75, 6.9e-5 at 19x0.5, so the pipeline's default 1e-4 is too tight. The device quants: verify
# reads the float16 checkpoint (the quantisation happens in build.sh), so float16's limit.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1, **{q: 5e-2 for q in QUANTS}}

# HF module (after "model.layers.N.") -> TensorRT-LLM module (after "transformer.layers.N.");
# q/k/v are fused into attention.qkv. Note the MLP names: fc is the SiLU branch (gate_proj).
LAYER_NAMES = {"input_layernorm": "input_layernorm", "self_attn.o_proj": "attention.dense",
               "post_attention_layernorm": "post_layernorm", "mlp.gate_proj": "mlp.fc",
               "mlp.up_proj": "mlp.gate", "mlp.down_proj": "mlp.proj"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "transformer.vocab_embedding.weight",
                "model.norm.weight": "transformer.ln_f.weight", "lm_head.weight": "lm_head.weight"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


# ---------------------------------------------------------------- the unified checkpoint

def to_trt_name(hf: str) -> str:
    """The TensorRT-LLM name of the tensor that holds an HF tensor (q, k, v: the fused qkv)."""
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    layer, _, tail = hf.removeprefix("model.layers.").partition(".")
    module, _, kind = tail.rpartition(".")
    return f"transformer.layers.{layer}.{'attention.qkv' if module in QKV else LAYER_NAMES[module]}.{kind}"


def check(dense: DenseModel) -> None:
    """What legalize guarantees for this flow (CAPS); a violation here is a bug upstream."""
    if not dense.uniform:
        raise ValueError("trtllm needs the same sizes in every layer: legalize (layout pad) first")
    if not pytorch.stock_class(dense):
        raise ValueError("trtllm's HF directory is the stock LlamaForCausalLM: heads must divide hidden_size")
    if dense.layers[0].head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {dense.layers[0].head_dim} has no TensorRT-LLM attention kernel")


def rotary_scaling(config: dict) -> dict | None:
    """RoPE scaling in TensorRT-LLM's spelling (`type`, read by its attention layer): None for
    plain RoPE, the llama3 dict; other kinds are not written (the NumPy check has only these two)."""
    _, scaling = pytorch.llama3_rope(config, NAME)
    if scaling is None:
        return None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}


def checkpoint_dtype(dense: DenseModel, quant: str | None) -> torch.dtype:
    if quant is None:
        return dense.dtype
    if quant not in QUANTS:
        raise UserError(f"unknown trtllm quantisation {quant!r}: choose one of {', '.join(QUANTS)} "
                        "(float dtypes are the model's own dtype)")
    return torch.float16


def unified_config(dense: DenseModel, dtype: torch.dtype) -> dict:
    """config.json of the unified checkpoint (docs/flow-internals.md §5.2; PretrainedConfig + LLaMAConfig)."""
    cfg, s = dense.config, dense.layers[0]
    theta, _ = pytorch.rope(cfg)
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": str(dtype).removeprefix("torch."),
        "logits_dtype": "float32",
        "vocab_size": dense.vocab_size,
        "hidden_size": dense.hidden_size,
        "num_hidden_layers": len(dense.layers),
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_size": s.head_dim,
        "intermediate_size": s.n_ff,
        "hidden_act": cfg.get("hidden_act", "silu"),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "position_embedding_type": "rope_gpt_neox",  # HF's rotate_half: no q/k permutation
        "rotary_base": theta,
        "rotary_scaling": rotary_scaling(cfg),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
        "attn_bias": s.attn_bias,  # TensorRT-LLM's flags switch on every bias of the block: materialize
        "mlp_bias": s.mlp_bias,    # writes explicit zero q/k/v and gate/up biases under them
        "tie_word_embeddings": dense.tied,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def to_trt(stream: Iterable[tuple[str, torch.Tensor]], tied: bool, dtype: torch.dtype
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors (in `DenseModel.tensors()` order) -> TensorRT-LLM-named ones, in file order.

    q, k and v are held until v arrives, then fused by rows (q, k, v). A tied lm_head is written as a
    copy of the embedding right after it, so it needs no second read. Works on meta tensors too,
    which is how `emit` plans the file's header from shapes alone."""
    held: dict[str, torch.Tensor] = {}
    for name, t in stream:
        t = t.to(dtype)
        if not name.rpartition(".")[0].endswith(QKV):
            yield to_trt_name(name), t
            if name == "model.embed_tokens.weight" and tied:
                yield "lm_head.weight", t
        elif "v_proj" not in name:
            held[name] = t
        else:
            yield (
                to_trt_name(name),
                torch.cat([held.pop(name.replace("v_proj", p)) for p in ("q_proj", "k_proj")] + [t]),
            )


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None) -> Emitted:
    """Write the HF directory (the PyTorch flow's writer) and `trtllm_checkpoint/`, a renaming of the
    HF weights just written: read back one tensor at a time (q/k/v: three), not materialized again."""
    from ...elastic import WeightSource

    check(dense)
    dtype = checkpoint_dtype(dense, quant)
    out_dir = Path(out_dir)
    files = pytorch.emit(dense, out_dir, tokenizer_dir).files
    ckpt = out_dir / CKPT
    ckpt.mkdir()
    write_json(ckpt / "config.json", unified_config(dense, dtype))
    meta = ((n, torch.empty(s, device="meta")) for n, s in dense.tensor_specs())
    specs = [(n, tuple(t.shape)) for n, t in to_trt(meta, dense.tied, dtype)]
    hf = WeightSource(out_dir)
    stream = tqdm(to_trt(((n, hf.get(n)) for n, _ in dense.tensor_specs()), dense.tied, dtype), total=len(specs),
                  desc="writing trtllm checkpoint", unit="tensor", leave=False)
    write_safetensors_stream(
        ckpt, specs, stream, dtype, max_shard_bytes=1 << 62, stem=RANK0.removesuffix(".safetensors")
    )
    return Emitted(files + [f"{CKPT}/config.json", f"{CKPT}/{RANK0}"],
                   {"checkpoint_dtype": str(dtype).removeprefix("torch."), "quant": quant})


# ---------------------------------------------------------------- build.sh (runs on the device)

def is_jetson(target: dict) -> bool:
    version = str((flow_table(target, NAME) or {}).get("version", ""))
    return target["name"].startswith("jetson") or "jetson" in version


def max_num_tokens(batch: int, prompt: int, jetson: bool) -> int:
    """Tokens one engine step may take: every prompt of the batch prefilled at once, capped at
    TensorRT-LLM's default 8192 (2048 on Jetson's shared memory), never below one whole prompt
    (the build refuses max_num_tokens < max_input_len without chunked context)."""
    return max(prompt, min(batch * prompt, 2048 if jetson else 8192))


def awq_block(cfg: dict) -> int:
    """The AWQ group size (128, else 64) that divides every in-feature count."""
    sizes = (cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_size"], cfg["intermediate_size"])
    for block in (128, 64):
        if all(n % block == 0 for n in sizes):
            return block
    raise UserError(f"int4_awq groups 64 or 128 in-features, and this model's hidden size, attention width and "
                    f"n_ff are {sizes}: export with --dtype float16 (or int8_wo)")


def quant_step(quant: str | None, cfg: dict) -> tuple[str, str]:
    """(bash lines, checkpoint directory trtllm-build reads) for the device-side quantisation."""
    if quant is None:
        return "", CKPT
    out = f"{CKPT}_{quant}"
    if quant == "int4_awq":
        return f"""
# int4_awq (W4A16): ModelOpt's AWQ calibration on this GPU, from the Hugging Face directory. Needs
# nvidia-modelopt and a calibration set (cnn_dailymail from the Hugging Face Hub by default; offline,
# CALIB_DATASET=<local dataset directory>). CALIB_SIZE trades calibration time for accuracy.
"$PYTHON" "$TRTLLM_EXAMPLES/quantization/quantize.py" --model_dir . --dtype float16 --qformat int4_awq \\
  --awq_block_size {awq_block(cfg)} --output_dir {out} --calib_size "${{CALIB_SIZE:-512}}" \\
  --calib_dataset "${{CALIB_DATASET:-cnn_dailymail}}"
same_model {out}
""", out
    if cfg["mlp_bias"]:
        raise UserError(f"{quant} goes through TensorRT-LLM's convert_checkpoint.py, which drops this model's MLP "
                        "(down_proj compensation) biases (docs/flow-internals.md §5.2): use int4_awq or float16")
    bits = quant.removeprefix("int").removesuffix("_wo")
    return (
        f"""
# {quant}: TensorRT-LLM's weight-only converter, from the Hugging Face directory (the model has no MLP biases,
# which this converter would drop). Its location moved from examples/llama to examples/models/core/llama.
convert=$TRTLLM_EXAMPLES/models/core/llama/convert_checkpoint.py
[[ -f $convert ]] || convert=$TRTLLM_EXAMPLES/llama/convert_checkpoint.py
"$PYTHON" "$convert" --model_dir . --output_dir {out} --dtype float16 --use_weight_only --weight_only_precision int{bits}
same_model {out}
""",  # noqa: E501 (shell lines as build.sh runs them)
        out,
    )


BUILD_SH = r"""#!/usr/bin/env bash
# TensorRT-LLM engine build for the @TARGET@ (@ARCH@), written by amoeba-export.
#   model: @MODEL@; checkpoint @CKPT@ (@DTYPE@); quantisation: @QUANT@
#   workload: batch @B@, prompt @P@ tokens, @G@ generated (max_seq_len @S@, max_num_tokens @T@)
# Engines only run on the GPU architecture they are built on: run this on the @TARGET@ itself,
#   bash build.sh      (environment: PYTHON, default python3; TRTLLM_EXAMPLES, the examples/ folder
#                       of the TensorRT-LLM checkout matching the installed version, for quantisation)
# TensorRT-LLM wanted: @VERSION@.@JETSON_NOTE@
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
die() { echo "build.sh: $*" >&2; exit 1; }

# 1. Toolchain. trtllm-build comes with TensorRT-LLM <= 1.2 and the 0.12.0-jetson branch; a 1.x
#    without it (the TensorRT backend was removed) serves the Hugging Face directory directly.
if ! command -v trtllm-build >/dev/null 2>&1; then
  version=$("$PYTHON" -c 'from importlib.metadata import version; print(version("tensorrt_llm"))' 2>/dev/null || true)
  case "$version" in
    [1-9]*) ;;
    0.*) die "TensorRT-LLM $version is installed but trtllm-build is not on PATH (pip --user puts it in ~/.local/bin: export PATH=\$HOME/.local/bin:\$PATH)" ;;
    *) die "no TensorRT-LLM here (trtllm-build is not on PATH and $PYTHON has no tensorrt_llm): install TensorRT-LLM (@VERSION@) on the @TARGET@ and run bash build.sh again" ;;
  esac
  echo "TensorRT-LLM $version has no trtllm-build: its PyTorch backend loads this directory as it is, no engine to build."@PYTORCH_NOTE@
  echo "run: trtllm-serve $PWD    (Python: from tensorrt_llm import LLM; LLM(model=\"$PWD\"))"
  exit 0
fi
@NEED_EXAMPLES@
# 2. The GPU must be the target's (@ARCH@). nvidia-smi may be missing on Jetson: its device tree
#    names the SoC (tegra234 = Orin, sm_87; /etc/nv_tegra_release gives the L4T release).
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '[:space:]' || true)
if [[ ! $cap =~ ^[0-9]+\.[0-9]+$ ]] && grep -qas tegra234 /proc/device-tree/compatible; then cap=8.7; fi
if [[ ! $cap =~ ^[0-9]+\.[0-9]+$ ]]; then
  cap=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)
fi
if [[ ! $cap =~ ^[0-9]+\.[0-9]+$ ]]; then
  echo "note: could not read this GPU's compute capability (no nvidia-smi, Tegra id or CUDA torch): not checking it against @ARCH@" >&2
elif [[ $cap != "@CAP@" ]]; then
  die "this GPU is sm_${cap/./} but this build is for the @TARGET@ (@ARCH@), and TensorRT engines only run on the architecture they were built on: run it on the @TARGET@, or export for this device's target"
fi

# The converters rebuild the config from the HF config.json: check they kept this model's sizes and biases.
same_model() {
  "$PYTHON" - "$1" <<'PY' || exit 1
import json, sys
ours, theirs = (json.load(open(d + "/config.json")) for d in ("@CKPT@", sys.argv[1]))
theirs.setdefault("head_size", theirs["hidden_size"] // theirs["num_attention_heads"])
keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size", "intermediate_size", "attn_bias", "mlp_bias")
bad = [f"{k} {theirs.get(k, False)} (ours {ours[k]})" for k in keys if theirs.get(k, False) != ours[k]]
if bad:
    sys.exit(f"build.sh: {sys.argv[1]} lost part of this model ({', '.join(bad)}): build the float16 checkpoint instead")
PY
}
@QUANT_STEP@
# 3. The engine, sized for the workload. TensorRT-LLM 0.12 spells the paged KV cache --paged_kv_cache.
kv=(--kv_cache_type paged)
[[ $(trtllm-build --help 2>&1 || true) == *--kv_cache_type* ]] || kv=(--paged_kv_cache enable)
trtllm-build --checkpoint_dir @BUILD_CKPT@ --output_dir engine --gemm_plugin @PLUGIN@ --gpt_attention_plugin @PLUGIN@ \
  --max_batch_size @B@ --max_input_len @P@ --max_seq_len @S@ --max_num_tokens @T@ --max_beam_width 1 \
  "${kv[@]}" --remove_input_padding enable --context_fmha @FMHA@ --workers 1

echo "built: $PWD/engine (config.json, rank0.engine) for the @TARGET@"
examples=${TRTLLM_EXAMPLES:-<TensorRT-LLM checkout>/examples}
echo "run: $PYTHON $examples/run.py --engine_dir $PWD/engine --tokenizer_dir $PWD --max_output_len @G@ --input_text 'Hello'@MMAP@"
"""  # noqa: E501 (shell lines as build.sh runs them)


def script(out_dir: Path, target: dict, quant: str | None = None, workload=None) -> list[str]:
    """Write `build.sh`: toolchain check, GPU arch check, device-side quantisation, trtllm-build
    sized by the workload, and the run command (see BUILD_SH for each step's reason)."""
    from ...shared_types import Workload

    out_dir = Path(out_dir)
    wl = workload or Workload()
    cfg = read_json(out_dir / CKPT / "config.json")
    if quant is not None and quant not in QUANTS:
        raise UserError(f"unknown trtllm quantisation {quant!r}: choose one of {', '.join(QUANTS)}")
    B, P, G = wl.batch, wl.prompt_len, wl.gen_len
    if P + G > cfg["max_position_embeddings"]:
        raise UserError(
            f"workload {wl.key()} needs {P + G} positions but the model has "
            f"{cfg['max_position_embeddings']} (max_position_embeddings): shorten --prompt-len or --gen-len"
        )
    jetson = is_jetson(target)
    steps, build_ckpt = quant_step(quant, cfg)
    dtype = "float16" if quant else cfg["dtype"]
    arch = str(target.get("arch", "sm_??"))
    digits = arch.removeprefix("sm_")
    jetson_note = ""
    if jetson:
        jetson_note = (
            "\n# Jetson (README4Jetson, v0.12.0-jetson): build the wheel on the device for sm_87; keep batch\n"
            "# 1-4 and sequences <= 2048 on the shared CPU/GPU memory; run with --use_mmap."
        )
        if B > 4 or P + G > 2048:
            steps += (f'\necho "note: batch {B} and {P + G}-token sequences are large for a Jetson; '
                      'the build may run out of memory (README4Jetson keeps batch 1-4, <= 2048 tokens)" >&2\n')
    pytorch_note = ""
    if quant:
        pytorch_note = (
            f'\n  echo "note: it serves it in {cfg["dtype"]}; for {quant}, quantise it with ModelOpt into a '
            f'Hugging Face checkpoint first (quantize.py --qformat {quant} --export_format hf) and serve that"'
        )
    need_examples = "" if quant is None else (
        '\n[[ -n ${TRTLLM_EXAMPLES:-} ]] || die "TRTLLM_EXAMPLES is not set: export TRTLLM_EXAMPLES=<TensorRT-LLM '
        f'checkout of the installed version>/examples (its tools quantise to {quant})"\n')
    # context FMHA has no float32 kernels and no head size 104 (docs/flow-internals.md §1)
    fmha = "disable" if dtype == "float32" or cfg["head_size"] == 104 else "enable"
    values = {
        "TARGET": target["name"],
        "ARCH": arch,
        "CAP": f"{digits[:-1]}.{digits[-1:]}",
        "MODEL": (
            f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV) "
            f"x {cfg['head_size']}, n_ff {cfg['intermediate_size']}, hidden {cfg['hidden_size']}"
        ),
        "CKPT": CKPT,
        "DTYPE": cfg["dtype"],
        "QUANT": quant or "none",
        "B": B,
        "P": P,
        "G": G,
        "S": P + G,
        "T": max_num_tokens(B, P, jetson),
        "VERSION": (flow_table(target, NAME) or {}).get("version", "1.x"),
        "JETSON_NOTE": jetson_note,
        "PYTORCH_NOTE": pytorch_note,
        "NEED_EXAMPLES": need_examples,
        "QUANT_STEP": steps,
        "BUILD_CKPT": build_ckpt,
        "PLUGIN": dtype,
        "FMHA": fmha,
        "MMAP": " --use_mmap" if jetson else "",
    }
    text = BUILD_SH
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return write_script(out_dir, text)


def toolchain() -> dict:
    from ...manifest import package_versions

    return {"trtllm-build": shutil.which("trtllm-build"), **package_versions(("tensorrt_llm", "tensorrt"))}


def build(out_dir: Path, target: dict, quant: str | None = None) -> dict:
    """Run build.sh (written by `script`) where trtllm-build is on PATH (the device); elsewhere say
    where to run it."""
    out_dir = Path(out_dir)
    record = {"target": target["name"], "quant": quant}
    skip = skipped("trtllm-build", target)
    if skip:
        return {**record, **skip}
    returncode, log = run_script(out_dir)
    engine = out_dir / "engine"
    built = sorted(str(p.relative_to(out_dir)) for p in engine.rglob("*") if p.is_file()) if engine.is_dir() else []
    return {**record, "script": SCRIPT, "returncode": returncode, "built": built, "toolchain": toolchain(),
            "log_tail": log[-10:]}


# ---------------------------------------------------------------- load (verify): NumPy forward

def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 NumPy, by its stored name."""
    return {name: np.asarray(v, dtype=np.float32) for name, v in lazy_checkpoint(path).items()}


def lazy_checkpoint(path: Path) -> "LazyWeights":
    """A safetensors file's tensors by their stored names, each read when looked up (NumPy for
    float16 / float32, bfloat16 widened to float32 through torch: NumPy has no bfloat16)."""
    from safetensors import SafetensorError, safe_open

    from ...numpy_llama import LazyWeights

    header = safetensors_header(path)  # missing or truncated: a one-line UserError
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise UserError(f"corrupt safetensors file {path}: {e}") from None

    def load(name: str):
        def get() -> np.ndarray:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
            return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

        return get

    return LazyWeights({name: load(name) for name in header if name != "__metadata__"})


def hf_weights(t, cfg: dict) -> "LazyWeights":
    """TensorRT-LLM names -> HF names: qkv split by (NH, NKV, head_size) rows, fc/gate/proj renamed.
    `t` maps the stored names to arrays (a dict or a `LazyWeights`); nothing is read here: each HF
    tensor is looked up in `t` when asked for, a fused qkv once for its three parts."""
    from ...numpy_llama import LastParts, LazyWeights, fused_parts

    hf_of = {v: k for k, v in GLOBAL_NAMES.items()}
    layer_of = {v: k for k, v in LAYER_NAMES.items()}
    q, kv = cfg["num_attention_heads"] * cfg["head_size"], cfg["num_key_value_heads"] * cfg["head_size"]
    last = LastParts()

    def read_qkv(name: str):
        def read():
            value = t[name]
            if value.shape[0] != q + 2 * kv:
                raise UserError(f"{name} has {value.shape[0]} rows, config.json's head counts say {q + 2 * kv}")
            return value

        return read

    out = {}
    for name in t:
        if name in hf_of:
            out[hf_of[name]] = (lambda n=name: t[n])
            continue
        layer, _, tail = name.removeprefix("transformer.layers.").partition(".")
        module, _, kind = tail.rpartition(".")
        prefix = f"model.layers.{layer}."
        if module == "attention.qkv":
            parts = fused_parts(last, name, read_qkv(name), [q, q + kv])
            out.update({prefix + f"{m}.{kind}": f for m, f in zip(QKV, parts)})
        elif module in layer_of:
            out[prefix + f"{layer_of[module]}.{kind}"] = (lambda n=name: t[n])
        else:
            raise UserError(f"unexpected tensor {name} in the trtllm checkpoint")
    return LazyWeights(out)


def required(cfg: dict) -> list[str]:
    """HF names the forward reads for this config (biases where the flags say so)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for j in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{j}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for module, flag in [(m, "attn_bias") for m in (*QKV, "self_attn.o_proj")] + [
                (m, "mlp_bias") for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]:
            names += [p + module + ".weight"] + ([p + module + ".bias"] if cfg[flag] else [])
    return names


def load(out_dir: Path):
    """The unified checkpoint read back by its TensorRT-LLM names and run by the NumPy LLaMA forward
    (float32), as `ids [B, T] -> logits [B, T, V]`. Sizes come from the checkpoint's config.json.
    The tensors are read as the forward reaches them, so it holds about one layer at a time."""
    ckpt = Path(out_dir) / CKPT
    cfg = read_json(ckpt / "config.json")
    try:
        if (cfg["architecture"], cfg["position_embedding_type"], cfg["hidden_act"]) != (
                "LlamaForCausalLM", "rope_gpt_neox", "silu"):
            raise UserError(f"{ckpt}/config.json is not a LLaMA checkpoint this check can run")
        forward = partial(uniform_logits_fn, hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                          n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                          head_dim=cfg["head_size"], eps=cfg["norm_epsilon"], rope_theta=cfg["rotary_base"],
                          rope_scaling=cfg["rotary_scaling"])
        weights = hf_weights(lazy_checkpoint(ckpt / RANK0), cfg)
        missing = [n for n in required(cfg) if n not in weights]
    except KeyError as e:
        raise UserError(f"{ckpt}/config.json has no {e.args[0]!r}") from None
    if missing:
        raise UserError(f"{ckpt}/{RANK0} lacks {len(missing)} tensors config.json asks for, e.g. "
                        f"{to_trt_name(missing[0])}")

    return forward(weights)
