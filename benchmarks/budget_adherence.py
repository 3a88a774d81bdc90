"""Do budgets hold on this machine? The budgeted compile of the default model, measured here.

Budgets: `make demo`'s 60 ms, 40 ms, and 60, 75 and 90% of the dense model's TPOT measured here (the
largest shape, exported and timed by the PyTorch profiler first). Each is compiled exactly as
`amoeba-export --target host --flow pytorch --budget B` does (tables from the user's folder or
the package, spot check and feedback on; `--no-build`: the profiler times the eager model either
way), and the table prints the first pick and its prediction, every feedback round, and the final
artifact's measured TPOT against budget + 5%.

    python benchmarks/budget_adherence.py [--flow pytorch] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", default="pytorch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fractions", default="0.6,0.75,0.9")
    args = ap.parse_args()

    from amoeba_export.elastic import load_elastic
    from amoeba_export.errors import UserError, notice
    from amoeba_export.feedback import BUDGET_SLACK
    from amoeba_export.flows import get_flow
    from amoeba_export.pipeline import compile_budget, legal_plans, shape_timer
    from profilers.workload import Workload
    from targets import load_target

    elastic, sdir = load_elastic()
    target, wl = load_target("host"), Workload()
    flow = get_flow(args.flow)
    plans = legal_plans(elastic, flow, target)
    dense = elastic.strategy.space.largest
    timing = shape_timer(elastic, plans, flow, wl, target, args.threads, notice)(dense)
    dense_s = timing["median"]
    print(f"dense {dense}: {dense_s * 1e3:.1f} ms TPOT here ({timing['threads']} threads, other load "
          f"{timing['other_load']} CPUs)", flush=True)
    budgets = [("make demo", 0.060), ("40 ms", 0.040)] + [
        (f"{float(f):.0%} of dense", float(f) * dense_s) for f in args.fractions.split(",")
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="amoeba-budgets-") as tmp:
        for i, (label, budget) in enumerate(budgets):
            try:
                s = compile_budget(elastic, target, flow, wl, budget, Path(tmp) / f"b{i}", threads=args.threads,
                                   strategy_dir=sdir, build=False, notice=notice)
            except UserError as e:
                rows.append((label, budget, None, None, None, [], str(e)))
                continue
            rounds = s["feedback"]["rounds"]
            first = rounds[0] if rounds else None
            rows.append((label, budget, first["shape"] if first else s["shape"],
                         first["predicted_s"] if first else s["predicted_latency_s"], s, rounds, None))
            print(
                f"{label}: {s['shape']} measured {s['measured_latency_s'] * 1e3:.1f} ms against {budget * 1e3:.1f} ms "
                f"({len(rounds)} feedback rounds)",
                flush=True,
            )
    print()
    print(f"{'budget':<16} {'ms':>6} {'first pick':>10} {'predicted':>9} {'rounds':>6} {'final':>8} {'measured':>9} "
          f"{'vs budget':>9}  within +{BUDGET_SLACK:.0%}")
    for label, budget, first, predicted, s, rounds, error in rows:
        if error:
            print(f"{label:<16} {budget * 1e3:>6.1f}  error: {error}")
            continue
        m = s["measured_latency_s"]
        print(
            f"{label:<16} {budget * 1e3:>6.1f} {first:>10} {predicted * 1e3:>8.1f}ms {len(rounds):>6} {s['shape']:>8} "
            f"{m * 1e3:>8.1f}ms {m / budget - 1:>+9.1%}  {'yes' if m <= budget * (1 + BUDGET_SLACK) else 'NO'}"
        )
        for r in rounds:
            print(f"{'':<16} round: {r['shape']} predicted {r['predicted_s'] * 1e3:.1f} ms, measured "
                  f"{r['measured_s'] * 1e3:.1f} ms -> every prediction x{r['factor']:.2f}")


if __name__ == "__main__":
    main()
