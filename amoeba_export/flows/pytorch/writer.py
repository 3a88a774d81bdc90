"""The PyTorch flow: a Hugging Face directory (config.json, safetensors, tokenizer, generation config).

Uniform shapes use the stock `LlamaForCausalLM` (no custom code; docs/flow-internals.md §4: explicit
`head_dim`, both RoPE spellings, zero q/k/v and gate/up biases where the bias flags require them).
Per-layer shapes use `amoeba_llama` (`amoeba_export/modeling/amoeba_llama.py`): registered with
the Auto classes by `import amoeba_export.modeling`, and also copied into the artifact with an
`auto_map`, so plain transformers loads it with `trust_remote_code=True`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ...compute import Compute
from ...errors import UserError
from ...io import write_json, write_safetensors_stream
from ...shared_types import DenseModel, FlowCaps
from ..base import Emitted

REMOTE_CODE = "modeling_amoeba_llama.py"
MODELING_FILE = Path(__file__).parents[2] / "modeling" / "amoeba_llama.py"  # copied, not imported

NAME = "pytorch"
# transformers takes any sizes (amoeba_llama for per-layer ones); the stock class wants hidden % heads == 0
CAPS = FlowCaps(per_layer=True, o_down_bias=True, heads_divide_hidden=True)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Base-config fields carried over unchanged when present.
KEEP = ("vocab_size", "hidden_size", "hidden_act", "rms_norm_eps", "max_position_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout")


def rope(config: dict) -> tuple[float, dict | None]:
    """(theta, legacy rope_scaling or None) from a v4 or v5 config."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def llama3_rope(config: dict, flow: str) -> tuple[float, dict | None]:
    """(theta, scaling) for the flows that write plain RoPE or Llama-3's scaling only (gguf, trtllm,
    mlc): scaling is None for plain RoPE, else the llama3 dict; another kind is a UserError."""
    from ...numpy_llama import rope_kind

    theta, scaling = rope(config)
    kind = rope_kind(scaling)
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"RoPE scaling {kind!r} is not supported by the {flow} exporter (default and llama3 are)")
    return theta, scaling


def stock_class(dense: DenseModel) -> bool:
    """Stock LlamaForCausalLM expresses the model: uniform layers, and (transformers 5 insists,
    even with an explicit head_dim) a head count that divides hidden_size."""
    return dense.uniform and dense.hidden_size % dense.layers[0].n_heads == 0


def hf_config(dense: DenseModel) -> dict:
    base = dense.config
    first = dense.layers[0]
    theta, scaling = rope(base)
    dtype = str(dense.dtype).removeprefix("torch.")
    cfg = {k: base[k] for k in KEEP if k in base}
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=len(dense.layers),
        num_attention_heads=first.n_heads,
        num_key_value_heads=first.n_kv_heads,
        head_dim=first.head_dim,
        intermediate_size=first.n_ff,
        attention_bias=first.attn_bias,
        mlp_bias=first.mlp_bias,
        tie_word_embeddings=dense.tied,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_parameters={"rope_theta": theta, "rope_type": "default", **(scaling or {})},
        torch_dtype=dtype,
        dtype=dtype,
    )
    cfg.setdefault("hidden_act", "silu")
    if not stock_class(dense):
        cfg.update(
            architectures=["AmoebaLlamaForCausalLM"],
            model_type="amoeba_llama",
            num_attention_heads=max(s.n_heads for s in dense.layers),
            num_key_value_heads=max(s.n_kv_heads for s in dense.layers),
            intermediate_size=max(s.n_ff for s in dense.layers),
            auto_map={"AutoConfig": f"{REMOTE_CODE[:-3]}.AmoebaLlamaConfig",
                      "AutoModelForCausalLM": f"{REMOTE_CODE[:-3]}.AmoebaLlamaForCausalLM"},
            layer_specs=[
                {"num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads,
                 "intermediate_size": s.n_ff, "attention_bias": s.attn_bias, "mlp_bias": s.mlp_bias}
                for s in dense.layers
            ],
        )
    return cfg


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None, workload=None) -> Emitted:
    out_dir = Path(out_dir)
    write_json(out_dir / "config.json", hf_config(dense))
    files = ["config.json"]
    specs = dense.tensor_specs()
    stream = tqdm(dense.tensors(), total=len(specs), desc="writing weights", unit="tensor", leave=False)
    files += write_safetensors_stream(out_dir, specs, stream, dense.dtype)
    files += copy_tokenizer(tokenizer_dir, out_dir)
    if not stock_class(dense):  # self-contained: loads with trust_remote_code=True, no amoeba-export needed
        shutil.copyfile(MODELING_FILE, out_dir / REMOTE_CODE)
        files.append(REMOTE_CODE)
    return Emitted(files)


def in_memory(dense: DenseModel):
    """The dense model as a transformers module in memory (eval mode), without writing it out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ... import modeling  # noqa: F401  (registers amoeba_llama)

    cfg = hf_config(dense)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
    model.load_state_dict(dict(dense.tensors()), strict=not dense.tied, assign=True)
    if dense.tied:
        model.tie_weights()
    rope = model.model.rotary_emb  # its inv_freq buffer is computed, not loaded: build it for real
    model.model.rotary_emb = type(rope)(config=model.config)
    return model.eval()


def load_model(out_dir: Path, dtype: torch.dtype | str = torch.float32):
    """transformers loads the directory (stock class, or amoeba_llama, registered by the import below)."""
    from transformers import AutoModelForCausalLM

    from ... import modeling  # noqa: F401  (registers amoeba_llama)

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()


def load(out_dir: Path):
    """The exported directory through transformers' own classes, as a logits function (fp32). It runs
    as a layer stack over the directory's memory-mapped safetensors, so an artifact that does not fit
    in memory is read a layer at a time (docs/reference-forward.md); one that fits stays loaded."""
    from ... import modeling  # noqa: F401  (registers amoeba_llama)
    from ...elastic import WeightSource
    from ...layerwise import LayerStack

    stack = LayerStack(Path(out_dir), WeightSource(Path(out_dir)), Compute())

    def logits(ids: torch.Tensor) -> torch.Tensor:
        state = stack.run([stack.embed(ids)], range(stack.n_layers))[0]
        return stack.logits(state.hidden)

    return logits


AOT_PACKAGE = "model.pt2"
AOT_CACHE_LEN = 1024  # static KV cache positions compiled into the package (prompt + generated)


def build(out_dir: Path, target: dict, quant: str | None = None) -> dict:
    """Package the model ahead of time: torch.export of one decode step with a static KV cache
    (transformers' executorch integration), compiled by AOTInductor into `model.pt2`.

    The package runs batch 1, one token per call: `runner(input_ids=[[tok]], cache_position=[pos])`
    returns that position's logits, the cache living inside the package. A static cache has one KV
    head count for every layer, so per-layer shapes are not packaged (export with `--layout pad`).
    """
    from transformers import GenerationConfig
    from transformers.integrations.executorch import convert_and_export_with_cache

    from ...manifest import versions

    out_dir = Path(out_dir)
    model = load_model(out_dir, "auto")  # the artifact's own dtype
    record = {"toolchain": {"torch": torch.__version__, "aoti": "torch._inductor.aoti_compile_and_package",
                            "compiler": _compiler()}}
    specs = getattr(model.config, "layer_specs", None) or []
    if len({(s["num_key_value_heads"], s["num_attention_heads"]) for s in specs}) > 1:
        return {**record, "built": [], "skipped": "AOTInductor package: a static KV cache needs the same head counts "
                "in every layer; export with --layout pad to package this shape"}
    cache_len = min(AOT_CACHE_LEN, getattr(model.config, "max_position_embeddings", AOT_CACHE_LEN))
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        max_length=cache_len,
        cache_config={"batch_size": 1, "max_cache_len": cache_len, "device": "cpu"},
    )
    program = convert_and_export_with_cache(model)
    torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / AOT_PACKAGE))
    info = {"package": AOT_PACKAGE, "batch_size": 1, "max_cache_len": cache_len,
            "call": "runner(input_ids=LongTensor[1, 1], cache_position=LongTensor[1]) -> logits[1, 1, vocab]",
            "load": "torch._inductor.aoti_load_package('model.pt2')", "versions": versions()}
    write_json(out_dir / "model.pt2.json", info)
    # the package against the directory it was built from, decoding a fixed id sequence
    ids = torch.arange(16).remainder(model.config.vocab_size)[None]
    model.generation_config.cache_implementation = None
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    diff = (load_package(out_dir)(ids).float() - ref).abs().max().item()
    return {**record, "built": [AOT_PACKAGE, "model.pt2.json"], "max_cache_len": cache_len,
            "max_abs_logit_diff_vs_directory": diff}


def load_package(out_dir: Path):
    """The AOTInductor package as a logits function (one token per call through its static cache)."""
    runner = torch._inductor.aoti_load_package(str(Path(out_dir) / AOT_PACKAGE))

    @torch.inference_mode()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] != 1:
            raise ValueError("the AOTInductor package runs batch 1")
        steps = [
            runner(input_ids=ids[:, t : t + 1], cache_position=torch.tensor([t]))[:, -1] for t in range(ids.shape[1])
        ]
        return torch.stack(steps, 1)

    return logits


def _compiler() -> str | None:
    import subprocess

    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
