"""What it costs to fingerprint a model's weights (every byte hashed; base_model.fingerprint).

Prints, for the default model (SmolLM2-135M, fp32) and a synthetic model with LLaMA-2-7B's layer
shapes (random fp16 weights, ~13.5 GB, streamed to disk and deleted afterwards): the first
fingerprint (every tensor read and hashed, digests cached) and the next one (digests read back from
the cache), side by side with reading the same bytes (`cat > /dev/null`) right after. A fresh
cache folder is used, so the first run is a real first run.

    python benchmarks/fingerprint.py [--skip-7b] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


def specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,))]
        out += [(p + f"self_attn.{n}.weight", (H, H)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(p + "post_attention_layernorm.weight", (H,)), (p + "mlp.gate_proj.weight", (F, H)),
                (p + "mlp.up_proj.weight", (F, H)), (p + "mlp.down_proj.weight", (H, F))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def write_model(directory: Path, cfg: dict) -> int:
    import torch
    from export_streaming import write_tokenizer

    from amoeba_export.io import write_safetensors_stream

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    plan = specs(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=gen, dtype=torch.float32).to(torch.float16)) for n, s in plan)
    write_safetensors_stream(directory, plan, tensors, torch.float16, max_shard_bytes=4 << 30)
    write_tokenizer(directory, cfg["vocab_size"])
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def measure(name: str, model_dir: Path) -> dict:
    from amoeba_export.base_model import fingerprint, weight_files

    size = sum(f.stat().st_size for f in weight_files(model_dir))
    first, t_first = timed(lambda: fingerprint(model_dir, progress=False))
    again, t_again = timed(lambda: fingerprint(model_dir, progress=False))
    _, t_cat = timed(
        lambda: subprocess.run(["cat", *map(str, weight_files(model_dir))], stdout=subprocess.DEVNULL, check=True)
    )
    assert first == again
    return {"model": name, "bytes": size, "first_s": t_first, "cached_s": t_again, "cat_s": t_cat, "fingerprint": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-7b", action="store_true", help="Only the default model.")
    ap.add_argument("--keep", default=None, metavar="DIR", help="Write the 7B-shaped model here and keep it.")
    args = ap.parse_args()

    from amoeba_export.base_model import default_model_dir

    rows = []
    model = default_model_dir()  # the converted default model, from the user's cache
    with tempfile.TemporaryDirectory(prefix="amoeba-fp-cache-") as cache:
        os.environ["AMOEBA_EXPORT_CACHE"] = cache  # a fresh digest cache: the first run is a first run
        rows.append(measure("SmolLM2-135M-Instruct (fp32)", model))
        print(rows[-1], flush=True)
        if not args.skip_7b:
            base = (
                Path(args.keep)
                if args.keep
                else Path(tempfile.mkdtemp(prefix="amoeba-7b-", dir=os.environ.get("TMPDIR")))
            )
            target = base / "llama2-7b-shaped"
            try:
                print(f"writing the 7B-shaped model to {target} ...", flush=True)
                n, t = timed(lambda: write_model(target, LLAMA2_7B))
                print(f"  {n / 1e9:.1f} GB in {t:.0f} s", flush=True)
                rows.append(measure("LLaMA-2-7B-shaped (fp16, random)", target))
                print(rows[-1], flush=True)
            finally:
                if not args.keep:
                    import shutil

                    shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"{'model':<36} {'GB':>6} {'first':>8} {'cached':>8} {'cat':>8} {'first/cat':>9}")
    for r in rows:
        print(
            f"{r['model']:<36} {r['bytes'] / 1e9:>6.2f} {r['first_s']:>7.2f}s {r['cached_s']:>7.3f}s "
            f"{r['cat_s']:>7.2f}s "
            f"{r['first_s'] / r['cat_s']:>9.1f}"
        )


if __name__ == "__main__":
    main()
