"""Streaming-export benchmark: a synthetic 1.1B LLaMA (TinyLlama's shape) exported at a ~50% shape.

Prints the peak RSS of the export and its wall time against `cp` of the same bytes (the exported
artifact itself, with a warm page cache) and against `cp` of the whole source model.
Targets (from the issue): peak RSS < 1 GiB, export time <= 3x the copy.

    /tmp/venv/bin/python benchmarks/export_streaming.py [--workdir /tmp/amoeba-bench-1b] [--repeats 3]
        [--torch-threads N] [--check]

The synthetic model (~2.2 GB of fp16 safetensors in three ~1 GiB shards) is written once into
`--workdir` and reused. The export runs in a child process of this script (`--child export ...`),
so its peak RSS (from `wait4`'s rusage and the child's own /proc/self/status) is the export's own;
the child also samples RssAnon / RssFile after every tensor, so memory-mapped source pages
(RssFile) can be told apart from heap (RssAnon), and splits the time into producing tensors
(read + slice + cast, in `DenseModel.tensors`) and writing them (`write_safetensors_stream`).
Exits 0 unless `--check` is given and a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GiB, MiB = 1 << 30, 1 << 20
RSS_TARGET = 1 * GiB
TIME_TARGET = 3.0

# TinyLlama-1.1B's shape.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
    "dtype": "float16",
    "_name_or_path": "synthetic-tinyllama-1.1b",
}
SEED = 1234
SHARD_BYTES = 1 * GiB
DEPTH = 16  # of 22
KEPT_GROUPS = 3  # of 4 KV groups (all 8 query heads of each kept group)
TARGET_RATIO = 0.50
MARKER = "bench-complete.json"
MARKER_VERSION = 1


# ------------------------------------------------------------------ synthetic model
def source_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    V, H, F = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    D = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    specs = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (q, H)),
            (p + "self_attn.k_proj.weight", (kv, H)),
            (p + "self_attn.v_proj.weight", (kv, H)),
            (p + "self_attn.o_proj.weight", (H, q)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "mlp.gate_proj.weight", (F, H)),
            (p + "mlp.up_proj.weight", (F, H)),
            (p + "mlp.down_proj.weight", (H, F)),
        ]
    specs += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return specs


def n_params(specs) -> int:
    total = 0
    for _, shape in specs:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def synth_tensors(specs, seed: int = SEED, std: float = 0.02):
    """One tensor at a time: seeded per tensor, normal*std (norms = ones), fp16."""
    import torch

    for k, (name, shape) in enumerate(specs):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.float16)
            continue
        g = torch.Generator().manual_seed(seed * 1000 + k)
        t = torch.empty(shape, dtype=torch.float16)
        rows = max(1, (64 * MiB) // (4 * shape[-1]))  # fp32 scratch of <= 64 MiB at a time
        for r in range(0, shape[0], rows):
            t[r:r + rows] = (torch.randn((min(rows, shape[0] - r),) + tuple(shape[1:]), generator=g) * std).half()
        yield name, t


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer with exactly `vocab_size` entries (cf. tests/tiny.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(vocab_size - 3):
        vocab[f"w{i}"] = i + 3
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(directory)


def model_ready(model_dir: Path, config: dict = CONFIG, seed: int = SEED, extra: dict | None = None) -> bool:
    """The synthetic model of `config`/`seed` is complete in `model_dir` (its marker, then every tensor
    name in the shard headers). `extra`: more marker fields that must match (e.g. the tokenizer's)."""
    from amoeba_export.base_model import weight_files
    from amoeba_export.io import safetensors_header

    try:
        marker = json.loads((model_dir / MARKER).read_text())
        if marker.get("version") != MARKER_VERSION or marker.get("config") != config or marker.get("seed") != seed:
            return False
        if any(marker.get(k) != v for k, v in (extra or {}).items()):
            return False
        names = set()
        for f in weight_files(model_dir):
            names |= set(safetensors_header(f)) - {"__metadata__"}
        return names == {n for n, _ in source_specs(config)}
    except Exception:
        return False


def make_model(model_dir: Path, config: dict = CONFIG, seed: int = SEED, shard_bytes: int = SHARD_BYTES,
               std: float = 0.02, tokenizer=None, extra: dict | None = None) -> None:
    """Write the synthetic model of `config` into `model_dir` (atomically), tensor by tensor, as fp16
    safetensors shards of at most `shard_bytes` with an index. `tokenizer(dir)` writes the tokenizer
    files (default: a WordLevel tokenizer of exactly vocab_size entries); `extra` goes into the marker."""
    import torch

    from amoeba_export.base_model import weight_files
    from amoeba_export.io import atomic_dir, write_safetensors_stream

    specs = source_specs(config)
    t0 = time.perf_counter()
    print(f"writing the synthetic model ({n_params(specs) / 1e9:.3f}B params, fp16) to {model_dir} ...", flush=True)
    with atomic_dir(model_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors_stream(
            tmp, specs, synth_tensors(specs, seed, std), torch.float16, max_shard_bytes=shard_bytes
        )
        if tokenizer is None:
            write_tokenizer(tmp, config["vocab_size"])
        else:
            tokenizer(tmp)
        files = weight_files(tmp)
        if len(files) < 2 or not (tmp / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"expected a sharded model with an index, got {files}")
        (tmp / MARKER).write_text(
            json.dumps({"version": MARKER_VERSION, "config": config, "seed": seed, **(extra or {})})
        )
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)


# ------------------------------------------------------------------ strategy
def make_strategy(model_dir: Path, strategy_dir: Path):
    """Depth DEPTH of 22 (evenly spread layers) and one uniform width: KEPT_GROUPS of 4 whole KV groups
    per layer and the number of MLP channels that brings the dense model closest to TARGET_RATIO."""
    import numpy as np

    from amoeba_export.base_model import model_info
    from amoeba_export.strategy import LayerWidth, Strategy, full_width

    info = model_info(model_dir)
    L, H, V = info["n_layers"], info["hidden_size"], CONFIG["vocab_size"]
    n_heads, n_kv, D, F = info["n_heads"], info["n_kv_heads"], info["head_dim"], info["n_ff"]
    G = n_heads // n_kv
    total = n_params(source_specs(CONFIG))
    # dense params per kept layer (with the compensation biases: attention and MLP biases are on)
    q, kv = KEPT_GROUPS * G * D, KEPT_GROUPS * D
    attn = q * H + 2 * kv * H + H * q + (q + 2 * kv + H)
    fixed = 2 * V * H + H + DEPTH * (attn + 2 * H)
    per_channel = DEPTH * (3 * H + 2)
    channels = int(round((TARGET_RATIO * total - fixed) / per_channel / 32)) * 32
    channels = max(32, min(F, channels))
    # the width key: the fraction of a layer's weights kept
    w = round((2 * q * H + 2 * kv * H + 3 * H * channels) / (2 * n_heads * D * H + 2 * n_kv * D * H + 3 * H * F), 3)

    rng = np.random.default_rng(SEED)
    layers = np.unique(np.linspace(0, L - 1, DEPTH).round().astype(int)).tolist()
    assert len(layers) == DEPTH, layers
    per_layer = []
    for _ in range(L):
        groups = np.zeros(n_kv, bool)
        groups[rng.choice(n_kv, KEPT_GROUPS, replace=False)] = True
        q_heads = np.repeat(groups, G)
        ch = np.zeros(F, bool)
        ch[rng.choice(F, channels, replace=False)] = True
        per_layer.append(LayerWidth(q_heads, ch, rng.normal(0, 0.01, H).astype(np.float32),
                                    rng.normal(0, 0.01, H).astype(np.float32)))
    strat = Strategy(model=info, depths={L: list(range(L)), DEPTH: layers},
                     widths={1.0: full_width(info), w: per_layer},
                     meta={"source": "benchmarks/export_streaming.py (synthetic)"})
    strat.validate()
    strat.save(strategy_dir)
    return strat, w


# ------------------------------------------------------------------ child process
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def child_baseline(result: Path) -> None:
    import resource

    s0 = _status()
    import torch  # noqa: F401

    s1 = _status()
    import transformers  # noqa: F401

    s2 = _status()
    res = {"bare": s0, "torch": s1, "torch+transformers": s2,
           "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    result.write_text(json.dumps(res))


def child_export(result: Path, model_dir: Path, strategy_dir: Path, out_dir: Path, depth: int, width: float,
                 threads: int = 0) -> None:
    import resource

    t_start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)

    from amoeba_export.elastic import ElasticModel
    from amoeba_export.flows.pytorch import writer as pytorch
    from amoeba_export.io import atomic_dir
    from amoeba_export.materialize import materialize
    from amoeba_export.shapes import Shape
    from amoeba_export.strategy import Strategy

    after_import = _status()
    t0 = time.perf_counter()
    strategy = Strategy.load(strategy_dir)
    em = ElasticModel(model_dir, strategy)
    dense = materialize(em, Shape(depth, width), dtype="float16")
    t_setup = time.perf_counter() - t0

    # Instrument the tensor stream: time spent producing each tensor (read + slice + cast) versus
    # consuming it (copy into a fresh buffer + file write), and RSS after each tensor.
    prof = {"produce_s": 0.0, "consume_s": 0.0, "n": 0, "peak_anon": 0, "peak_file": 0, "peak_rss": 0,
            "peak_at": None, "by_kind": {}}
    orig = dense.tensors

    def sample(name):
        s = _status()
        prof["peak_anon"] = max(prof["peak_anon"], s["RssAnon"])
        prof["peak_file"] = max(prof["peak_file"], s["RssFile"])
        if s["VmRSS"] > prof["peak_rss"]:
            prof["peak_rss"], prof["peak_at"] = s["VmRSS"], {"tensor": name, **s}

    def tensors():
        it = orig()
        last = time.perf_counter()
        while True:
            try:
                name, t = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            dt = now - last
            prof["produce_s"] += dt
            kind = name.split(".")[-2] if name.startswith("model.layers.") else name
            k = prof["by_kind"].setdefault(kind, [0.0, 0.0])
            k[0] += dt
            sample(name)
            t_yield = time.perf_counter()
            yield name, t
            last = time.perf_counter()
            k[1] += last - t_yield
            prof["consume_s"] += last - t_yield
            prof["n"] += 1

    dense.tensors = tensors
    t1 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        files = pytorch.emit(dense, tmp, em.dir).files
    t_emit = time.perf_counter() - t1
    end = _status()
    res = {
        "files": files,
        "params": dense.parameters(),
        "tensor_specs": [[n, list(s)] for n, s in dense.tensor_specs()],
        "source_layers": dense.record["source_layers"],
        "t_import_s": t0 - t_start,
        "t_setup_s": t_setup,
        "t_emit_s": t_emit,
        "t_export_s": t_setup + t_emit,
        "after_import": after_import,
        "end": end,
        "profile": prof,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(),
    }
    result.write_text(json.dumps(res))


def run_child(args: list[str], result: Path) -> tuple[dict, float, int]:
    """Run this script as a child; return (its JSON result, wall seconds, peak RSS bytes from wait4)."""
    result.unlink(missing_ok=True)
    log = result.with_suffix(".stderr.log")  # progress bars and warnings of the child
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, "--child", *args, "--result", str(result)], stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"child {args[0]} failed with exit code {p.returncode} (stderr above, in {log})")
    return json.loads(result.read_text()), wall, ru.ru_maxrss * 1024


# ------------------------------------------------------------------ measurement helpers
def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True)


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 * MiB):
                pass


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    sh("sync")


def time_cp(files: list[Path], dst: Path) -> float:
    fresh(dst)
    dst.mkdir(parents=True)
    warm(files)
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(dst)], check=True)
    return time.perf_counter() - t0


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.0f} MiB ({n / 1e9:.3f} GB)"


# ------------------------------------------------------------------ correctness
def verify_artifact(out_dir: Path, model_dir: Path, strategy, depth: int, width: float, specs: list) -> list[str]:
    """Headers against tensor_specs(), and one layer's q_proj rows / down_proj columns / o_proj bias
    against slicing the source by hand (exact fp16 equality)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from amoeba_export.base_model import weight_files
    from amoeba_export.elastic import WeightSource
    from amoeba_export.io import safetensors_header

    problems = []
    got = {}
    where = {}
    for f in weight_files(out_dir):
        for name, v in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            got[name] = (tuple(v["shape"]), v["dtype"])
            where[name] = f
    want = {n: (tuple(s), "F16") for n, s in specs}
    if got != want:
        missing, extra = set(want) - set(got), set(got) - set(want)
        wrong = [n for n in set(want) & set(got) if want[n] != got[n]]
        problems.append(
            f"headers differ from tensor_specs(): missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}, "
            f"wrong shape/dtype {sorted(wrong)[:3]}"
        )
    cfg = json.loads((out_dir / "config.json").read_text())
    if cfg.get("num_hidden_layers") != depth:
        problems.append(f"config.json says {cfg.get('num_hidden_layers')} layers, expected {depth}")

    src = WeightSource(model_dir)
    layers, lw_all = strategy.layers(depth), strategy.width(width)
    j = len(layers) // 2
    i = layers[j]
    lw = lw_all[i]
    D = CONFIG["head_dim"]

    def exported(name):
        with safe_open(str(where[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    q_src = src.get(f"model.layers.{i}.self_attn.q_proj.weight")
    heads = np.flatnonzero(lw.q_heads)  # whole groups kept: no zero padding, ascending order
    q_ref = torch.cat([q_src[h * D:(h + 1) * D] for h in heads], 0)
    q_got = exported(f"model.layers.{j}.self_attn.q_proj.weight")
    if q_got.shape != q_ref.shape or not torch.equal(q_got, q_ref):
        problems.append(f"layer {j} (source {i}) q_proj rows differ from the hand-sliced source")
    d_src = src.get(f"model.layers.{i}.mlp.down_proj.weight")
    d_ref = d_src[:, torch.from_numpy(np.flatnonzero(lw.channels))]
    d_got = exported(f"model.layers.{j}.mlp.down_proj.weight")
    if d_got.shape != d_ref.shape or not torch.equal(d_got, d_ref):
        problems.append(f"layer {j} (source {i}) down_proj columns differ from the hand-sliced source")
    ob_got = exported(f"model.layers.{j}.self_attn.o_proj.bias")
    if not torch.equal(ob_got, torch.from_numpy(lw.o_bias).half()):
        problems.append(f"layer {j} o_proj bias differs from the strategy's compensation bias")
    del src
    return problems


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/amoeba-bench-1b"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads(N) in the export child (default: torch's own choice)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        if a.child[0] == "baseline":
            child_baseline(a.result)
        else:
            _, model_dir, strategy_dir, out_dir, depth, width, threads = a.child
            child_export(
                a.result, Path(model_dir), Path(strategy_dir), Path(out_dir), int(depth), float(width), int(threads)
            )
        return 0

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, strategy_dir, out_dir = work / "model", work / "strategy", work / "export"
    cp_same, cp_src = work / "cp-same-bytes", work / "cp-source"
    result = work / "child-result.json"

    if not model_ready(model_dir):
        make_model(model_dir)
    else:
        print(f"reusing the synthetic model in {model_dir}")
    from amoeba_export.base_model import weight_files

    strategy, width = make_strategy(model_dir, strategy_dir)
    src_specs = source_specs(CONFIG)
    src_params = n_params(src_specs)
    src_files = weight_files(model_dir)
    src_bytes = sum(f.stat().st_size for f in src_files)
    print(f"source: {len(src_files)} shards, {fmt_bytes(src_bytes)}; strategy: depth {DEPTH}/22, "
          f"{KEPT_GROUPS}/4 KV groups, width key {width}")

    load = os.getloadavg()
    print(f"load average before the runs: {load[0]:.2f} on {os.cpu_count()} CPUs"
          + ("  (the machine is busy: timings will be noisy)" if load[0] > 0.5 else ""), flush=True)
    base, base_wall, base_peak = run_child(["baseline"], result)

    exports, cps_same, cps_src = [], [], []
    for r in range(a.repeats):
        fresh(out_dir)
        warm(src_files)
        res, wall, peak = run_child(["export", str(model_dir), str(strategy_dir), str(out_dir), str(DEPTH), str(width),
                                str(a.torch_threads)], result)
        res["wall_s"], res["wait4_maxrss"] = wall, peak
        exports.append(res)
        out_files = sorted(p for p in out_dir.iterdir() if p.is_file())
        weights_out = weight_files(out_dir)
        # cp of the same bytes: the exported artifact itself (all its files), warm cache.
        cps_same.append(time_cp(out_files, cp_same))
        cps_src.append(time_cp(src_files, cp_src))
        print(f"  run {r + 1}: export {res['t_export_s']:.2f} s (process {wall:.2f} s), peak RSS {peak / MiB:.0f} MiB; "
              f"cp same bytes {cps_same[-1]:.2f} s; cp source {cps_src[-1]:.2f} s", flush=True)

    last = exports[-1]
    out_bytes = sum(p.stat().st_size for p in out_files)
    out_weight_bytes = sum(p.stat().st_size for p in weights_out)
    out_params = last["params"]
    t_export = statistics.median(e["t_export_s"] for e in exports)
    t_proc = statistics.median(e["wall_s"] for e in exports)
    t_cp = statistics.median(cps_same)
    t_cp_src = statistics.median(cps_src)
    peak = max(e["wait4_maxrss"] for e in exports)
    ratio = t_export / t_cp
    rss_ok, time_ok = peak < RSS_TARGET, ratio <= TIME_TARGET

    problems = verify_artifact(out_dir, model_dir, strategy, DEPTH, width, last["tensor_specs"])

    prof = last["profile"]
    rows = [
        ("source model", f"{src_params / 1e9:.3f}B params, {fmt_bytes(src_bytes)} in {len(src_files)} files"),
        (
            "exported model",
            f"{out_params / 1e9:.3f}B params, {fmt_bytes(out_bytes)} in {len(out_files)} files "
            f"({fmt_bytes(out_weight_bytes)} safetensors)",
        ),
        ("shape", f"{DEPTH}x{width} (layers {last['source_layers']})"),
        ("param ratio", f"{out_params / src_params:.3f}"),
        (
            "export time (median)",
            f"{t_export:.2f} s  [load strategy + ElasticModel + materialize + emit; "
            f"process incl. imports {t_proc:.2f} s]",
        ),
        ("cp same bytes (median)", f"{t_cp:.2f} s  [cp of the exported files, {fmt_bytes(out_bytes)}, warm cache]"),
        ("time ratio vs cp same bytes", f"{ratio:.2f}x  (process incl. imports: {t_proc / t_cp:.2f}x)"),
        ("cp whole source (median)", f"{t_cp_src:.2f} s  [{fmt_bytes(src_bytes)}]"),
        ("time ratio vs cp source", f"{t_export / t_cp_src:.2f}x"),
        (
            "torch threads in the export",
            f"{last['torch_threads']}  (load average after the runs: {os.getloadavg()[0]:.2f})",
        ),
        ("peak RSS of the export", f"{peak / MiB:.0f} MiB  (wait4 ru_maxrss, max over runs)"),
        (
            "  at max sampled RSS: anon / file",
            f"{prof['peak_at']['RssAnon'] / MiB:.0f} / {prof['peak_at']['RssFile'] / MiB:.0f} MiB "
            f"(after {prof['peak_at']['tensor']})",
        ),
        ("  max sampled RssAnon / RssFile", f"{prof['peak_anon'] / MiB:.0f} / {prof['peak_file'] / MiB:.0f} MiB"),
        (
            "  after imports (export child)",
            f"{last['after_import']['VmRSS'] / MiB:.0f} MiB "
            f"(anon {last['after_import']['RssAnon'] / MiB:.0f}, file {last['after_import']['RssFile'] / MiB:.0f})",
        ),
        ("baseline RSS: import torch", f"{base['torch']['VmRSS'] / MiB:.0f} MiB"),
        ("baseline RSS: import torch, transformers", f"{base['torch+transformers']['VmRSS'] / MiB:.0f} MiB"),
        (
            "time split (last run)",
            f"setup {last['t_setup_s']:.2f} s, produce tensors {prof['produce_s']:.2f} s, "
            f"write tensors {prof['consume_s']:.2f} s, "
            f"other {last['t_emit_s'] - prof['produce_s'] - prof['consume_s']:.2f} s",
        ),
        (
            "artifact check",
            "OK (headers = tensor_specs(); q_proj rows, down_proj columns, o_proj bias exact)"
            if not problems
            else "FAILED: " + "; ".join(problems),
        ),
        ("target: peak RSS < 1 GiB", "PASS" if rss_ok else "FAIL"),
        ("target: time <= 3x cp", "PASS" if time_ok else "FAIL"),
    ]
    width_col = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width_col}}  {v}")
    print()
    print("time by tensor kind (last run, produce / write, s): " + ", ".join(
        f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in sorted(prof["by_kind"].items(), key=lambda kv: -sum(kv[1]))))

    for d in (cp_same, cp_src):
        shutil.rmtree(d, ignore_errors=True)
    if a.check and (not rss_ok or not time_ok or problems):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
