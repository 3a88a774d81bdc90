"""The figures behind verify's limits: greedy agreement of every quantised format, and what legalize
costs where a flow cannot run a shape exactly, on the real default model.

For each shape (default: the largest, a middle and the smallest of the shipped strategy) and each
quantised format (gguf q8_0, q4_0, q4_k_m; mlc q4f16_1, q4f32_1), the artifact is compiled exactly as
`amoeba-export --shape` does (with `--accept-parity-loss`, so nothing is refused while measuring) and
verify's figures are printed: greedy-token agreement with the masked reference of the exported model,
top-5 agreement (the artifact's greedy token among the reference's five most likely) and max |Δlogit|. For MLC,
which cannot carry the compensation biases, the held-out perplexity before
and after legalize (and the layout `auto` chose) is printed too. docs/verify.md explains how
`QUANT_FLOOR` and `MAX_LEGALIZE_LOSS` in amoeba_export/pipeline.py follow from these numbers.

    python benchmarks/parity_floors.py [--shapes 30x1.0,24x0.75,19x0.5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

FORMATS = (("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "q4_k_m"), ("mlc", "q4f16_1"), ("mlc", "q4f32_1"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="Comma-separated shapes (default: largest, middle, smallest).")
    ap.add_argument("--model", default=None)
    ap.add_argument("--strategy", default=None)
    args = ap.parse_args()

    from amoeba_export.elastic import load_elastic
    from amoeba_export.flows import get_flow
    from amoeba_export.pipeline import MAX_LEGALIZE_LOSS, QUANT_FLOOR, compile_shape
    from amoeba_export.shapes import Shape
    from targets import load_target

    elastic, sdir = load_elastic(args.model, args.strategy)
    space = elastic.strategy.space
    if args.shapes:
        shapes = [elastic.strategy.resolve(Shape.parse(s)) for s in args.shapes.split(",")]
    else:
        depths, widths = sorted(space.depths), sorted(space.widths)
        shapes = [space.largest, Shape(depths[len(depths) // 2], widths[len(widths) // 2]), space.smallest]
    targets = {"gguf": load_target("host"), "mlc": load_target("jetson-orin")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="amoeba-floors-") as tmp:
        for shape in shapes:
            for flow, fmt in FORMATS:
                out = Path(tmp) / f"{flow}-{fmt}-{shape}"
                res = compile_shape(elastic, shape, get_flow(flow), targets[flow], out, dtype=fmt, strategy_dir=sdir,
                                    build=fmt.startswith("q4_k"), accept_parity_loss=True)
                m = res.manifest
                leg = m["legalize"]
                change = leg["dropped_bias"] or leg["reselected"] or {}
                before, after = change.get("perplexity_before"), change.get("perplexity_after")
                rows.append(
                    (
                        str(shape),
                        flow,
                        fmt,
                        m["parity"]["greedy_token_agreement"],
                        m["parity"]["top5_agreement"],
                        m["parity"]["max_abs_logit_diff"],
                        leg["layout"],
                        f"{before:.2f} -> {after:.2f} ({after / before - 1:+.1%})" if before else "exact",
                    )
                )
                print(*rows[-1][:3], f"greedy {rows[-1][3]:.0%}, top-5 {rows[-1][4]:.0%}", flush=True)
    print()
    print(f"{'shape':>8} {'flow':>5} {'format':>8} {'greedy':>7} {'top-5':>6} {'max|Δlogit|':>11} {'layout':>8}  "
          "legalize (held-out ppl)")
    for shape, flow, fmt, greedy, top5, diff, layout, leg in rows:
        print(f"{shape:>8} {flow:>5} {fmt:>8} {greedy:>7.0%} {top5:>6.0%} {diff:>11.3g} {layout:>8}  {leg}")
    print(f"\nQUANT_FLOOR = {QUANT_FLOOR:.0%} of top-5 agreement; lowest above: {min(r[4] for r in rows):.0%}")
    print(f"MAX_LEGALIZE_LOSS = {MAX_LEGALIZE_LOSS:.0%}")


if __name__ == "__main__":
    main()
