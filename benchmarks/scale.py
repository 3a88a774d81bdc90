"""A 7B model through every command: export (and, when it can, verify) of a synthetic model with
LLaMA-2-7B's exact layer shapes, per flow and format, with the peak memory of each compile.

    PYTHONPATH=. python benchmarks/scale.py [--workdir /tmp/amoeba-scale-7b] [--flows pytorch,gguf-q4_k_m,...]
        [--shape 24x1] [--no-verify] [--no-build] [--keep] [--with-width]

1. The model (written once into `--workdir`, reused while its marker matches): hidden 4096, 32
   layers, 32 heads and 32 KV heads of 128, MLP 11008, rms_norm_eps 1e-5, rope_theta 10000, untied
   lm_head, fp16 weights drawn N(0, 0.02) (norms 1, so the forward stays finite), streamed tensor by
   tensor into ~4 GiB safetensors shards with an index (benchmarks/export_streaming.py's writer), with
   the default model's tokenizer (SmolLM2-135M-Instruct's files) and its vocabulary size, 49152.
2. The strategy: an upstream `dp_selection_strategy.npy` (depths 24 and 16, evenly spread layers,
   the last layer kept; with `--with-width` also a per-layer width 0.75: random whole heads and
   per-layer MLP widths in multiples of 256), imported with `amoeba-export import-strategy`, so no
   calibration runs.
3. Per flow (FLOWS), the compile `amoeba-export --target T --flow F --shape S --dtype D` runs in
   a child process (`--child compile`), which marks its phases (emit, build, verify) and resets its
   peak-RSS counter at each (/proc/self/clear_refs). This process samples the child's whole process
   tree every SAMPLE_S seconds from /proc/<pid>/status: anonymous memory (RssAnon: heap, what the
   compile itself holds) apart from mapped file pages (RssFile: the memory-mapped source weights, which
   the kernel can drop at will) and shared memory. The compile's time is set against `cp` of the bytes
   it wrote (every artifact file, copied one by one with a warm page cache, each copy removed).

`calibrate` and `score` (FLOWS "calibrate", "score") run on a tiny text file and report peak memory
and time per evaluated shape; at 7B they need the layer-wise reference forward.
Results go to `<workdir>/results.json` (merged across runs) and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_streaming import CONFIG as BASE_CONFIG  # noqa: E402
from export_streaming import fmt_bytes, make_model, model_ready, n_params, source_specs  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
ANON_TARGET = 4 * GiB
TIME_TARGET = 3.0
SAMPLE_S = 0.1
SEED = 7
SHARD_BYTES = 4 * GiB

# LLaMA-2-7B's shapes, with the default model's vocabulary (its tokenizer ships with the model).
CONFIG = {**BASE_CONFIG,
          "vocab_size": 49152,
          "hidden_size": 4096,
          "intermediate_size": 11008,
          "num_hidden_layers": 32,
          "num_key_value_heads": 32,
          "head_dim": 128,
          "max_position_embeddings": 4096,
          "pad_token_id": 2,
          "_name_or_path": "synthetic-llama-2-7b-shapes",
          }
DEPTHS = (24, 16)

# label -> (flow, --dtype, build, --target): the engine build runs only where it is the format itself
# (llama.cpp's K-quants); the others' builds (AOTInductor, ORT's optimised graph) are the flow's own
# tool and are timed apart with --build. TensorRT-LLM and MLC are device flows (not on `host`): the
# L4's target plans them; their build.sh is written, not run (no trtllm-build / mlc_llm here).
FLOWS = {
    "pytorch": ("pytorch", "float16", False, "host"),
    "gguf-f16": ("gguf", "float16", False, "host"),
    "gguf-q8_0": ("gguf", "q8_0", False, "host"),
    "gguf-q4_0": ("gguf", "q4_0", False, "host"),
    "gguf-q4_k_m": ("gguf", "q4_k_m", True, "host"),
    "mlc-q0f16": ("mlc", "q0f16", False, "l4"),
    "mlc-q4f16_1": ("mlc", "q4f16_1", False, "l4"),
    "trtllm": ("trtllm", "float16", False, "l4"),
    "onnx": ("onnx", "float16", False, "host"),
}
HOOKS = ("calibrate", "score")
# verify's artifact side that --artifact-check does not run at 7B, and why


# ------------------------------------------------------------------ model and strategy
def default_tokenizer_dir() -> Path:
    from amoeba_export.base_model import resolve_model

    return resolve_model(None)  # converts/caches the default model on first use


def write_model(model_dir: Path) -> None:
    from amoeba_export.flows.pytorch.writer import copy_tokenizer

    tok = default_tokenizer_dir()
    extra = {"tokenizer": str(tok), "scale_version": 1}
    if model_ready(model_dir, CONFIG, SEED, extra):
        return
    make_model(model_dir, CONFIG, SEED, shard_bytes=SHARD_BYTES, std=0.02,
               tokenizer=lambda d: copy_tokenizer(tok, d), extra=extra)


def upstream_doc(L: int, with_width: bool, seed: int = SEED) -> dict:
    """An upstream dp_selection_strategy dict (docs/amoeba-algorithm.md §4): depth masks for DEPTHS, and with
    `with_width` a 0.75 width whose head and channel counts differ per layer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    doc = {"strategy": {}, "metric": {}}
    for d in DEPTHS:
        keep = np.unique(np.linspace(0, L - 1, d).round().astype(int))
        mask = np.zeros(L, np.float32)
        mask[keep] = 1
        doc["strategy"][L - d] = mask
        doc["metric"][L - d] = 0.0
    if with_width:
        nh, D, F, H = (
            CONFIG["num_attention_heads"],
            CONFIG["head_dim"],
            CONFIG["intermediate_size"],
            CONFIG["hidden_size"],
        )
        masks, bias = {}, {}
        for i in range(L):
            heads = np.zeros(nh, bool)
            heads[rng.choice(nh, int(rng.choice([20, 24, 28])), replace=False)] = True
            q = np.repeat(heads, D)
            ch = np.zeros(F, bool)
            ch[rng.choice(F, int(rng.choice([7680, 8192, 8448])), replace=False)] = True
            p = f"model.layers.{i}."
            for m in ("q", "k", "v"):  # MHA: k/v masks equal q's
                masks[p + f"self_attn.{m}_proj"] = {0.75: q}
            for m in ("gate", "up"):
                masks[p + f"mlp.{m}_proj"] = {0.75: ch}
            bias[p + "self_attn.o_proj"] = {0.75: rng.normal(0, 1e-3, H).astype(np.float32)}
            bias[p + "mlp.down_proj"] = {0.75: rng.normal(0, 1e-3, H).astype(np.float32)}
        doc["width_mask"], doc["bias"] = masks, bias
    return doc


def write_strategy(work: Path, model_dir: Path, with_width: bool) -> Path:
    import numpy as np

    npy = work / ("dp_selection_strategy" + ("-width" if with_width else "") + ".npy")
    out = work / ("strategy" + ("-width" if with_width else ""))
    if out.is_dir() and any(out.iterdir()):
        return out
    np.save(npy, np.array(upstream_doc(CONFIG["num_hidden_layers"], with_width), dtype=object), allow_pickle=True)
    res = run_measured("import-strategy", ["import-strategy", str(npy), "--model", str(model_dir), "--out", str(out),
                                           "--force"], work)
    print(f"  import-strategy: {res['wall_s']:.1f} s, peak anon {res['peak_anon'] / MiB:.0f} MiB", flush=True)
    return out


# ------------------------------------------------------------------ the child: one CLI command with phases
def _status(pid="self") -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def child_compile(result: Path, argv: list[str]) -> int:
    """Run `amoeba-export argv` in this process, with emit/script/build/load/verify wrapped to record
    their wall-clock spans and this process's own peak RSS in each."""
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_TORCH_THREADS", "1")))
    from amoeba_export import cli, pipeline
    from amoeba_export.flows import FLOWS

    phases: list[dict] = []

    def timed(fn, label):
        def wrapped(*a, **k):
            _reset_peak()
            rec = {"phase": label, "start": time.time()}
            try:
                return fn(*a, **k)
            finally:
                rec["end"] = time.time()
                rec["hwm"] = _status().get("VmHWM", 0)
                phases.append(rec)

        return wrapped

    def wrap(owner, attr, label):
        setattr(owner, attr, timed(getattr(owner, attr), label))

    for name, flow in list(FLOWS.items()):  # the registry's objects, so the CLI resolves the timed ones
        FLOWS[name] = dataclasses.replace(flow, **{attr: timed(getattr(flow, attr), attr) for attr in
                                                   ("emit", "script", "build", "load") if getattr(flow, attr)})
    wrap(pipeline, "verify", "verify")
    wrap(pipeline, "prepare", "materialize+legalize")
    wrap(pipeline, "hash_inputs", "hash inputs (sha256)")
    wrap(pipeline, "write_manifest", "manifest (sha256 of outputs)")
    from amoeba_export import elastic

    wrap(elastic, "load_elastic", "load model+strategy")
    t0 = time.time()
    code = 0
    try:
        if argv[:1] == ["artifact-check"]:
            artifact_check(*argv[1:])
        else:
            cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if argv[:1] == ["artifact-check"] and Path(argv[2], ".artifact-check.json").is_file():
        check = json.loads(Path(argv[2], ".artifact-check.json").read_text())
        phases.append({k: check[k] for k in ("phase", "start", "end", "hwm")})
        phases[-1]["check"] = {k: v for k, v in check.items() if k not in ("phase", "start", "end", "hwm")}
    result.write_text(json.dumps({"start": t0, "end": time.time(), "phases": phases, "code": code,
                                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return code


def artifact_check(flow: str, out: str, tokenizer: str) -> None:
    """verify's artifact side alone: the flow's `load` on the artifact, then its logits for verify's
    prompt (the reference side, ElasticModel.logits, is not run)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from amoeba_export.flows import get_flow
    from amoeba_export.pipeline import VERIFY_TEXT

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = torch.tensor([tok(VERIFY_TEXT, add_special_tokens=False)["input_ids"]])
    logits = get_flow(flow).load(Path(out))  # wrapped: the "load" phase
    t0 = time.time()
    _reset_peak()
    got = logits(ids).float()
    rec = {"phase": "logits", "start": t0, "end": time.time(), "hwm": _status().get("VmHWM", 0)}
    Path(out, ".artifact-check.json").write_text(json.dumps({
        **rec, "tokens": int(ids.shape[1]), "finite": bool(torch.isfinite(got).all()),
        "logit_absmax": float(got.abs().max()), "greedy": np.asarray(got.argmax(-1)[0]).tolist()}))


# ------------------------------------------------------------------ the parent: sample the child's tree
def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            anon = file = shmem = 0
            for p in tree(self.pid):
                s = _status(p)
                anon += s.get("RssAnon", 0)
                file += s.get("RssFile", 0)
                shmem += s.get("RssShmem", 0)
            self.samples.append((time.time(), anon, file, shmem))
            self.stop.wait(SAMPLE_S)


def run_measured(label: str, argv: list[str], work: Path, env: dict | None = None) -> dict:
    """`amoeba-export argv` in a child; its wall time, phases and the tree's peak memory."""
    result = work / f".child-{label}.json"
    log = work / f"{label}.log"
    result.unlink(missing_ok=True)
    environ = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, "--child", "compile", "--result", str(result), "--", *argv],
                             stdout=err, stderr=subprocess.STDOUT, env=environ)
        sampler = Sampler(p.pid)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    child = json.loads(result.read_text()) if result.is_file() else {"phases": [], "code": code}
    samples = sampler.samples

    def peaks(t0, t1):
        sel = [s for s in samples if t0 <= s[0] <= t1] or [(0, 0, 0, 0)]
        return {"anon": max(s[1] for s in sel), "file": max(s[2] for s in sel), "shmem": max(s[3] for s in sel),
                "total": max(s[1] + s[2] + s[3] for s in sel)}

    phases = []
    for ph in child.get("phases", []):
        phases.append({**ph, "seconds": ph["end"] - ph["start"], **{f"peak_{k}": v for k, v in
                                                                    peaks(ph["start"], ph["end"]).items()}})
    allp = peaks(0, float("inf"))
    # the child resets its VmHWM at each phase (so rusage's maxrss is the last phase's): the largest
    # of the phases' and the rest of the run's
    hwm = max([p.get("hwm", 0) for p in child.get("phases", [])] + [ru.ru_maxrss * 1024])
    return {
        "label": label,
        "argv": argv,
        "code": code,
        "child_code": child.get("code"),
        "wall_s": wall,
        "peak_anon": allp["anon"],
        "peak_file": allp["file"],
        "peak_shmem": allp["shmem"],
        "peak_total_sampled": allp["total"],
        "maxrss_wait4": ru.ru_maxrss * 1024,
        "peak_hwm": hwm,
        "phases": phases,
        "log": str(log),
        "log_tail": [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()][-6:],
    }


# ------------------------------------------------------------------ cp of the same bytes
def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(16 * MiB):
            pass


def sync_s() -> float:
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def time_cp(out: Path, scratch: Path) -> tuple[float, float, int]:
    """cp of every file of `out`, one at a time, into `scratch`: each file read first (a warm page
    cache), copied, synced to disk, then removed before the next, so no more than one copied file
    is on disk. Returns (seconds of the cp commands, seconds of cp + sync, bytes)."""
    cp_s = durable_s = 0.0
    total_b = 0
    scratch.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        warm(f)
        dst = scratch / f.name
        sync_s()
        t0 = time.perf_counter()
        subprocess.run(["cp", str(f), str(dst)], check=True)
        t1 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        cp_s += t1 - t0
        durable_s += time.perf_counter() - t0
        total_b += f.stat().st_size
        dst.unlink()
    return cp_s, durable_s, total_b


# ------------------------------------------------------------------ hooks: calibrate and score
def tiny_text(work: Path) -> Path:
    """A few hundred words of deterministic text: enough windows for a smoke run of calibrate / score."""
    import random

    path = work / "tiny.txt"
    if not path.is_file():
        rnd = random.Random(0)
        words = "the a model layer export device memory token window text small large fast slow".split()
        path.write_text("\n".join(" ".join(rnd.choice(words) for _ in range(60)) for _ in range(40)) + "\n")
    return path


def hook_argv(name: str, model_dir: Path, strategy: Path, work: Path) -> tuple[list[str], int]:
    """(argv, shapes it evaluates) for the calibrate / score smoke runs on the tiny text."""
    text = str(tiny_text(work))
    if name == "calibrate":
        # One removable layer: the DP's 31 rows of one candidate each (a full DP to depth 16 would
        # score 376 candidates, hours on 2 cores), then FLAP statistics over every layer.
        L = CONFIG["num_hidden_layers"]
        return (["calibrate", "--model", str(model_dir), "--out", str(work / "calibrated"), "--force",
                 "--calib", text, "--depth-samples", "1", "--width-samples", "2", "--seq-len", "64",
                 "--widths", "1,0.75", "--min-depth", str(L - 1)], L - 1)
    from amoeba_export.strategy import Strategy

    space = Strategy.load(strategy).space
    n = len(space.depths) * len(space.widths)
    return (["score", "--model", str(model_dir), "--strategy", str(strategy), "--heldout", text, "--windows", "1",
             "--seq-len", "64", "--tasks", ""], n)


# ------------------------------------------------------------------ main
def report_row(r: dict) -> str:
    ratio = f"{r['ratio_cp']:.2f}x" if r.get("ratio_cp") else "-"
    emit = next((p for p in r["phases"] if p["phase"] == "emit"), None)
    build = next((p for p in r["phases"] if p["phase"] == "build"), None)
    parts = [
        f"{r['label']:<13}",
        "ok " if r["code"] == 0 else f"rc={r['code']}",
        f"{r['wall_s']:7.1f} s (+sync {r.get('sync_after_s', 0):.1f})",
        f"cp+sync {r.get('cp_sync_s', 0):6.1f} s (cp {r.get('cp_s', 0):.1f})",
        f"{ratio:>7}",
        f"anon {r['peak_anon'] / GiB:5.2f} GiB",
        f"file {r['peak_file'] / GiB:5.2f} GiB",
        f"hwm {r.get('peak_hwm', r['maxrss_wait4']) / GiB:5.2f} GiB",
        f"out {r.get('out_bytes', 0) / 1e9:6.2f} GB",
    ]
    if emit:
        parts.append(f"emit {emit['seconds']:.1f} s/anon {emit['peak_anon'] / GiB:.2f}")
    if build and build["seconds"] > 1:
        parts.append(f"build {build['seconds']:.1f} s/anon {build['peak_anon'] / GiB:.2f}/hwm {build['hwm'] / GiB:.2f}")
    others = [f"{p['phase']} {p['seconds']:.1f} s" for p in r["phases"] if p["phase"] not in ("emit", "build")
              and p["seconds"] > 0.5]
    return "  ".join(parts) + ("\n      phases: " + ", ".join(others) if others else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/amoeba-scale-7b"))
    ap.add_argument("--flows", default=",".join(FLOWS), help=f"comma-separated, of: {', '.join([*FLOWS, *HOOKS])}")
    ap.add_argument("--shape", default="24x1")
    ap.add_argument("--with-width", action="store_true", help="add a per-layer width 0.75 to the strategy")
    ap.add_argument("--no-verify", action="store_true", help="export only (no parity check)")
    ap.add_argument("--build", action="store_true", help="also run every flow's engine build (AOT package, ORT graph)")
    ap.add_argument("--no-cp", action="store_true", help="skip the cp comparison")
    ap.add_argument("--artifact-check", action="store_true",
                    help="after each export, run verify's artifact side alone (the flow's load and its logits "
                    "for verify's prompt) in a child, measured the same way")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts (default: each is removed after its run)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a flow misses the anon-memory or time target")
    a, rest = ap.parse_known_args()
    if a.child == "compile":
        argv = rest[1:] if rest[:1] == ["--"] else rest
        return child_compile(a.result, argv)

    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    write_model(model_dir)
    from amoeba_export.base_model import weight_files

    src = weight_files(model_dir)
    specs = source_specs(CONFIG)
    print(f"model: {n_params(specs) / 1e9:.3f}B params, {fmt_bytes(sum(f.stat().st_size for f in src))} in "
          f"{len(src)} shards ({model_dir})", flush=True)
    strategy = write_strategy(work, model_dir, a.with_width)

    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    failed = False
    for label in [f for f in a.flows.split(",") if f]:
        if label in HOOKS:
            argv, n = hook_argv(label, model_dir, strategy, work)
            r = run_measured(label, argv, work)
            r["shapes"] = n
            r["per_shape_s"] = r["wall_s"] / n if n else None
            print(
                f"{label}: rc={r['code']} {r['wall_s']:.1f} s ({n} shapes), peak anon {r['peak_anon'] / GiB:.2f} GiB, "
                f"file {r['peak_file'] / GiB:.2f} GiB; log {r['log']}",
                flush=True,
            )
            results[f"{label}"] = r
            results_file.write_text(json.dumps(results, indent=1))
            continue
        if label not in FLOWS:
            raise SystemExit(f"unknown flow {label!r}: choose from {', '.join([*FLOWS, *HOOKS])}")
        flow, dtype, build, target = FLOWS[label]
        out = work / f"out-{label}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["--target", target, "--flow", flow, "--shape", a.shape, "--dtype", dtype, "--model", str(model_dir),
                "--strategy", str(strategy), "--out", str(out), "--force", "--json"]
        if a.no_verify:
            argv.append("--no-verify")
        if not (build or a.build):
            argv.append("--no-build")
        subprocess.run(["sync"], check=True)
        print(f"{label}: amoeba-export {' '.join(argv)}", flush=True)
        r = run_measured(label, argv, work)
        r["sync_after_s"] = sync_s()  # what the compile left unwritten: its time to a durable artifact
        if r["code"] == 0 and out.is_dir():
            r["out_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            if not a.no_cp:
                r["cp_s"], r["cp_sync_s"], _ = time_cp(out, work / "cp-scratch")
                r["ratio_cp"] = (r["wall_s"] + r["sync_after_s"]) / r["cp_sync_s"] if r["cp_sync_s"] else None
            manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
            r["parity"] = manifest.get("parity")
            r["engine"] = manifest.get("engine")
            r["files"] = manifest.get("files")
        r.update(shape=a.shape, flow=flow, dtype=dtype, verify=not a.no_verify)
        print("  " + report_row(r), flush=True)
        if a.artifact_check and r["code"] == 0:
            c = run_measured(f"{label}-check", ["artifact-check", flow, str(out), str(model_dir)], work)
            r["artifact_check"] = c
            phase = {p["phase"]: p for p in c["phases"]}
            print(f"  artifact check: rc={c['code']} {c['wall_s']:.1f} s, peak anon {c['peak_anon'] / GiB:.2f} GiB, "
                  f"file {c['peak_file'] / GiB:.2f} GiB, hwm {c['peak_hwm'] / GiB:.2f} GiB; "
                  + ", ".join(f"{k} {v['seconds']:.1f} s (anon {v['peak_anon'] / GiB:.2f})" for k, v in phase.items())
                  + (f"; {phase['logits'].get('check')}" if "logits" in phase else ""), flush=True)
        if r["code"] != 0:
            print("  " + "\n  ".join(r["log_tail"]), flush=True)
        key = f"{label}@{a.shape}" + ("" if a.no_verify else "+verify") + ("+width" if a.with_width else "")
        results[key] = r
        results_file.write_text(json.dumps(results, indent=1))
        emit = next((p for p in r["phases"] if p["phase"] == "emit"), None)
        if r["code"] != 0 or (emit and emit["peak_anon"] >= ANON_TARGET):
            failed = True
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"results: {results_file}")
    return 1 if a.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
