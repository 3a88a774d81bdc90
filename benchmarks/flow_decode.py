"""Decode speed per flow on the host: a half-size subnet against the dense model, side by side.

For each flow (pytorch, onnx, gguf) in one run: the dense shape and the shape whose parameter count
is closest to half the dense model's are legalised, exported and built as `amoeba-export` would,
then their TPOT (one decode step over a 128-token KV cache, batch 1) is measured by the flow's own
profiler. Printed per flow: both TPOTs, the speed-up, and the dense model's decode speed as a
fraction of the memory-bandwidth bound (bytes read per token, weights at the artifact's bits per
weight plus the KV cache, over the host's measured bandwidth).

Timings pin threads (default 1: on a shared 2-core box one thread per process gives stable
numbers); the environment's warnings are printed.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", default="pytorch,onnx,gguf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--strategy", default=None)
    args = ap.parse_args()

    from amoeba_export.elastic import load_elastic
    from amoeba_export.flows import get_flow
    from amoeba_export.pipeline import legal_plans, memory_bytes
    from amoeba_export.search import format_time
    from profilers.profile import measure_shape
    from profilers.timing import environment
    from profilers.workload import Workload
    from targets import load_target

    elastic, _ = load_elastic(args.model, args.strategy)
    target = load_target("host")
    bandwidth = target["bandwidth_gbs"] * 1e9
    wl = Workload(1, args.prompt_len, 1, "tpot")  # bytes per token: weights + the KV cache of prompt_len + 1
    space = elastic.strategy.space
    dense_shape = space.largest
    for w in environment(args.threads).get("warnings", []):
        print(f"warning: {w}")
    print(f"host: {target.get('cpu', '?')}, measured bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"threads {args.threads}, workload {wl.key()}")
    rows = []
    for flow in map(get_flow, args.flows.split(",")):
        planned = legal_plans(elastic, flow, target)
        plans, quant = planned.shapes, planned.quant
        full = plans[dense_shape].parameters()
        half = min(space, key=lambda s: abs(plans[s].parameters() - full / 2))
        t = {s: measure_shape(plans[s], flow, wl, elastic.dir, quant=quant, threads=args.threads)["median"]
             for s in (dense_shape, half)}
        dense = plans[dense_shape]
        bound = memory_bytes(dense, wl, quant) / bandwidth
        rows.append((flow.name, quant or str(dense.dtype).removeprefix("torch."), half,
                     plans[half].parameters() / full, t[dense_shape], t[half], bound))
    print(f"\n{'flow':7} {'dtype':9} {'dense TPOT':>11} {'subnet':>9} {'params':>7} {'subnet TPOT':>12} "
          f"{'speed-up':>9} {'dense / bandwidth bound':>24}")
    for flow, dtype, half, frac, td, th, bound in rows:
        print(f"{flow:7} {dtype:9} {format_time(td):>11} {str(half):>9} {frac:>7.0%} {format_time(th):>12} "
              f"{td / th:>8.2f}x {bound / td:>23.0%}")


if __name__ == "__main__":
    main()
