"""Roofline estimator: latency of a dense shape on a device we cannot measure here.

Decode (TPOT) is memory-bound at small batch: every step reads all weights once plus each
sequence's KV cache, so `TPOT ≈ bytes per step / (bandwidth · efficiency)`, unless the FLOPs of
the step take longer at the device's peak. Prefill (TTFT) is compute-bound: `FLOPs / (peak ·
efficiency)`, unless reading the weights takes longer. The efficiency factors come from the target
file, per flow, each with its source (or marked "assumed"). Everything this module returns is an
*estimate*: the tables it feeds are stored and reported as `estimated`, with the command that
measures the real thing on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

from amoeba_export.errors import UserError

# Storage bits per weight of each dtype / quantisation, with where the figure comes from.
BITS_PER_WEIGHT = {
    "float32": (32.0, "4 bytes"),
    "float16": (16.0, "2 bytes"),
    "bfloat16": (16.0, "2 bytes"),
    "F16": (16.0, "GGUF F16"),
    "F32": (32.0, "GGUF F32"),
    "Q8_0": (8.5, "GGUF Q8_0 block: 32 int8 + one fp16 scale = 34 bytes / 32 weights"),
    "Q4_0": (4.5, "GGUF Q4_0 block: 32 nibbles + one fp16 scale = 18 bytes / 32 weights"),
    "Q4_K_M": (
        4.85,
        "llama.cpp Q4_K_M mix (Q4_K plus some Q6_K tensors), average reported by llama-quantize; estimated",
    ),
    "Q4_K_S": (4.58, "llama.cpp Q4_K_S mix (mostly Q4_K: 144 bytes / 256 weights); estimated"),
    "Q5_K_S": (5.5, "GGUF Q5_K block: 176 bytes / 256 weights (the _S mix is mostly Q5_K); estimated"),
    "Q5_K_M": (5.7, "llama.cpp Q5_K_M mix (Q5_K plus some Q6_K tensors); estimated"),
    "Q6_K": (6.5625, "GGUF Q6_K block: 210 bytes / 256 weights"),
    "q4f16_1": (
        4.5,
        "MLC q4f16_1: int4 + one fp16 scale per 32 weights (docs/flow-internals.md §7.2; docs/devices.md §3)",
    ),
    "q4f32_1": (5.0, "MLC q4f32_1: int4 + one fp32 scale per 32 weights"),
    "q0f16": (16.0, "MLC q0f16"),
    "q0bf16": (16.0, "MLC q0bf16"),
    "q0f32": (32.0, "MLC q0f32"),
    "int4_awq": (4.125, "int4 weights + one fp16 scale per group of 128"),
    "int8": (8.0, "int8 weight-only"),
    "int8_wo": (8.0, "TensorRT-LLM int8 weight-only (per-channel scales not counted)"),
    "int4_wo": (4.0, "TensorRT-LLM int4 weight-only (per-channel scales not counted)"),
}
DEFAULT_PREFILL_EFFICIENCY = 0.5  # assumed: no public per-flow figure at hand


@dataclass
class Estimate:
    seconds: float
    bound: str  # "memory" or "compute"
    bytes: float
    flops: float
    detail: dict


_BITS = {k.lower(): v for k, v in BITS_PER_WEIGHT.items()}
F32_COMPUTE = ("float32", "f32", "q4f32_1")  # formats computed in fp32; bfloat16 in bf16; the rest in fp16


def bits_per_weight(fmt: str) -> tuple[float, str]:
    """(bits per weight, source) of a dtype or quantisation, in any letter case."""
    if fmt.lower() not in _BITS:
        raise UserError(f"no bits-per-weight figure for {fmt!r} (known: {', '.join(BITS_PER_WEIGHT)})")
    return _BITS[fmt.lower()]


def flow_format(target: dict, flow: str, fmt: str | None = None) -> tuple[str, float, str]:
    """(weight format, bits per weight, source): `fmt`, or the flow's default on the target."""
    from targets import default_format

    if (target.get("flow_defaults") or {}).get(flow) is None:
        raise UserError(f"flow {flow!r} is not available on target {target['name']!r}")
    fmt = fmt or default_format(target, flow) or "float16"
    return (fmt, *bits_per_weight(fmt))


def model_counts(dense) -> dict:
    """Linear-layer parameters, embedding/lm_head parameters and KV width of a DenseModel plan."""
    H, V = dense.hidden_size, dense.vocab_size
    linear = sum(
        H * (s.n_heads + 2 * s.n_kv_heads) * s.head_dim + s.n_heads * s.head_dim * H + 3 * H * s.n_ff
        for s in dense.layers
    )
    kv_per_token = sum(2 * s.n_kv_heads * s.head_dim for s in dense.layers)  # K and V elements per token
    attn_dims = sum(s.n_heads * s.head_dim for s in dense.layers)
    return {"linear": linear, "lm_head": V * H, "kv_per_token": kv_per_token, "attn_dims": attn_dims}


def estimate(dense, target: dict, flow: str, workload, fmt: str | None = None) -> tuple[float, dict]:
    """Estimated latency (seconds) of `workload.metric` for `dense` on `target` with `flow`, its
    weights in `fmt` (default: the flow's format on the target)."""
    fmt, bits, bits_src = flow_format(target, flow, fmt)
    d = target["flow_defaults"][flow]
    eff = float(d.get("efficiency", 0.5))
    eff_src = d.get("efficiency_source", "assumed")
    bw = target.get("bandwidth_gbs")
    compute_dtype = ("float32" if fmt.lower() in F32_COMPUTE else "bfloat16" if fmt.lower() == "bfloat16"
                     else "float16")
    peak = _peak(target, compute_dtype)
    if not bw or not peak:
        raise UserError(
            f"target {target['name']!r} lacks a bandwidth or peak figure; measure it with `amoeba-export profile`"
        )
    c = model_counts(dense)
    B, P, G = workload.batch, workload.prompt_len, workload.gen_len
    weight_bytes = (c["linear"] + c["lm_head"]) * bits / 8
    kv_bytes = 2.0  # fp16 KV cache

    def decode_step(context: int) -> Estimate:
        byts = weight_bytes + B * context * c["kv_per_token"] * kv_bytes
        flops = 2.0 * B * (c["linear"] + c["lm_head"]) + 4.0 * B * context * c["attn_dims"]
        t_mem, t_cmp = byts / (bw * 1e9 * eff), flops / (peak * 1e12 * eff)
        return Estimate(max(t_mem, t_cmp), "memory" if t_mem >= t_cmp else "compute", byts, flops, {})

    def prefill() -> Estimate:
        flops = 2.0 * B * P * (c["linear"] + c["lm_head"]) + 2.0 * B * P * P * c["attn_dims"]
        byts = weight_bytes + B * P * c["kv_per_token"] * kv_bytes
        t_cmp = flops / (peak * 1e12 * DEFAULT_PREFILL_EFFICIENCY)
        t_mem = byts / (bw * 1e9 * eff)
        return Estimate(max(t_mem, t_cmp), "memory" if t_mem >= t_cmp else "compute", byts, flops, {})

    tpot = decode_step(P)  # Workload: one decode step with a KV cache of prompt_len tokens
    ttft = prefill()
    # e2e: the prefill yields the first token, then gen_len - 1 decode steps (as the profiler times it)
    seconds = {"tpot": tpot.seconds, "ttft": ttft.seconds, "e2e": ttft.seconds + (G - 1) * tpot.seconds}
    detail = {
        "source": "estimated",
        "method": "roofline: decode = max(bytes/(bandwidth·eff), FLOPs/(peak·eff)); prefill = FLOPs/(peak·prefill_eff)",
        "format": fmt, "bits_per_weight": bits, "bits_source": bits_src,
        "bandwidth_gbs": bw, "peak_tflops": peak, "compute_dtype": compute_dtype,
        "decode_efficiency": eff, "decode_efficiency_source": eff_src,
        "prefill_efficiency": DEFAULT_PREFILL_EFFICIENCY, "prefill_efficiency_source": "assumed",
        "tpot_bound": tpot.bound, "ttft_bound": ttft.bound, "tpot_bytes": tpot.bytes, "seconds": seconds,
    }
    return seconds[workload.metric], detail


def _peak(target: dict, dtype: str) -> float | None:
    from targets import peak_tflops

    return peak_tflops(target, dtype)
