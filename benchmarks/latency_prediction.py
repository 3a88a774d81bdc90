"""Latency tables on the host: prediction quality, profiling cost, search speed, budget adherence.

One run, side by side, on the default model (or --model/--strategy):
1. the per-component table (fit shapes + validation shapes), timed;
2. every shape measured end to end, timed (the reference);
3. prediction error of (1) against (2) on the shapes (1) did not fit on: median |error| and the share
   within ±10%; and the cost ratio (1)/(2);
4. search over the table: time of one search, hierarchical == exhaustive;
5. budgets at 60%, 75% and 90% of the dense model's measured TPOT: the chosen shape is exported
   and measured again; it must be within the budget plus 5%.

Timings pin threads (default 1: on a shared 2-core box one thread per process gives stable
numbers; pass --threads 2 on an idle machine). Measurements are noisy where the machine is busy:
the environment warnings are printed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--strategy", default=None)
    ap.add_argument("--flow", default="pytorch", help="pytorch, onnx or gguf (the host's runtimes)")
    ap.add_argument("--dtype", default=None, help="dtype or quant (default: the host's for the flow)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--validate", type=int, default=10)
    ap.add_argument("--save", default=None, help="write every shape's features and measured median to this JSON")
    ap.add_argument(
        "--skip-budgets", action="store_true", help="stop after the latency part (no accuracy table needed)"
    )
    args = ap.parse_args()

    from amoeba_export.elastic import load_elastic
    from amoeba_export.flows import get_flow
    from amoeba_export.pipeline import legal_plans
    from amoeba_export.search import format_time, search
    from profilers.profile import measure_shape
    from profilers.tables import build_measured, features, validation_figures
    from profilers.timing import environment
    from profilers.workload import Workload
    from targets import load_target

    elastic, sdir = load_elastic(args.model, args.strategy)
    wl = Workload(1, args.prompt_len, args.gen_len, "tpot")
    target = load_target("host")
    flow = get_flow(args.flow)
    planned = legal_plans(elastic, flow, target, dtype=args.dtype)
    plans, quant = planned.shapes, planned.quant
    model = {"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]}
    env = environment(args.threads)
    print(f"model {model['name']}, flow {flow} ({quant or 'float'}), {len(plans)} shapes, workload {wl.key()}, "
          f"threads {args.threads}")
    for w in env.get("warnings", []):
        print(f"  warning: {w}")

    cache: dict = {}

    def measure(shape):
        t0 = time.perf_counter()
        rec = measure_shape(plans[shape], flow, wl, elastic.dir, quant=quant, threads=args.threads)
        cache[shape] = (rec, time.perf_counter() - t0)
        return rec

    t0 = time.perf_counter()
    table = build_measured(plans, measure, target=target, flow=flow.name, model=model, strategy=None, workload=wl,
                           n_validate=args.validate)
    t_table = time.perf_counter() - t0
    fit_shapes = table.component["fit_shapes"]
    t_fit_only = sum(cache[s][1] for s in cache if str(s) in fit_shapes)

    for s in plans:
        if s not in cache:
            measure(s)
    t_all = sum(v[1] for v in cache.values())
    measured = {s: cache[s][0]["median"] for s in plans}

    if args.save:
        import json

        Path(args.save).write_text(json.dumps({str(s): {"features": features(plans[s]), "median": measured[s],
                                                        "fit": str(s) in fit_shapes} for s in plans}, indent=1))
    others = [s for s in plans if str(s) not in fit_shapes]
    v = validation_figures([table.entries[str(s)]["predicted"] for s in others], [measured[s] for s in others])
    print("\n== prediction quality (per-component model vs end-to-end measurement) ==")
    print(
        f"fit on {len(fit_shapes)} shapes; checked on the other {v['n']}: "
        f"median |error| {v['median_abs_rel_error'] * 100:.2f}%, "
        f"max {v['max_abs_rel_error'] * 100:.1f}%, within ±10%: {v['within_10pct'] * 100:.0f}%"
    )
    print(
        f"table's own validation ({table.validation['n']} shapes): median |error| "
        f"{table.validation['median_abs_rel_error'] * 100:.2f}%, "
        f"within ±10%: {table.validation['within_10pct'] * 100:.0f}%"
    )
    print(f"coefficients (s): {dict(zip(table.component['features'], np.round(table.component['coef'], 7)))}")
    print("\n== profiling cost ==")
    print(f"per-component table: fit measurements {t_fit_only:.1f} s (with its validation shapes {t_table:.1f} s); "
          f"every shape end to end: {t_all:.1f} s")
    print(f"ratio fit-only / all = {t_fit_only / t_all:.3f}; table incl. validation / all = {t_table / t_all:.3f}")

    if args.skip_budgets:  # search and budgets need the accuracy table
        return
    from amoeba_export.pipeline import accuracy_table

    acc = accuracy_table(elastic, sdir, print).scores()
    lat = table.as_mapping()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        r = search(acc, lat, measured[max(plans)] * 0.75)
    t_search = (time.perf_counter() - t0) / n
    print("\n== search ==")
    print(
        f"one search over {len(lat)} shapes: {t_search * 1e3:.2f} ms; hierarchical == exhaustive: "
        f"{r.agrees_with_exhaustive}; "
        f"latency lookups {r.evaluated}/{len(lat)}"
    )

    dense = measured[max(plans)]
    print("\n== budget adherence (fresh export, measured again) ==")
    print(f"dense {max(plans)} measured TPOT {format_time(dense)}")
    for frac in (0.6, 0.75, 0.9):
        budget = dense * frac
        r = search(acc, lat, budget)
        again = measure_shape(plans[r.shape], flow, wl, elastic.dir, quant=quant, threads=args.threads)["median"]
        ok = again <= budget * 1.05
        print(f"budget {frac:.0%} = {format_time(budget)}: chose {r.shape} predicted {format_time(r.latency_s)}, "
              f"measured {format_time(again)} ({again / budget * 100:.1f}% of budget) {'OK' if ok else 'OVER'}")


if __name__ == "__main__":
    main()
