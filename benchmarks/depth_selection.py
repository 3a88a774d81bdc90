"""Depth-selection quality: held-out perplexity at every depth of a strategy, DP against baselines.

From the issue: "Depth selection quality on the default model: held-out perplexity at every depth
for (a) the DP choice, (b) dropping the last layers, (c) dropping the layers with the highest cosine
similarity between block input and output (ShortGPT-style). A table; the DP should be the best or
say why not."

    /tmp/venv/bin/python benchmarks/depth_selection.py [--strategy DIR] [--model PATH] [--windows 16]
        [--seq-len 512] [--seed 0] [--json out.json] [--threads N] [--no-calib-ppl] [--no-verify]

Methods, for a target depth d of an L-layer model (m = L - d layers removed):
  DP                  the kept layers stored in the strategy (docs/amoeba-algorithm.md §2: the AmoebaLLM
                      dynamic program, scored on calibration text; the last `keep_last` layers are
                      always kept).
  last-m              plain truncation: keep layers 0..d-1 (drops the last m layers, final one too).
  last-m (keep last)  the DP's convention: keep the last `keep_last` layers and drop the m layers
                      right before them, i.e. remove L-keep_last-m .. L-keep_last-1.
  ShortGPT            one-shot Block Influence (Men et al., 2024): one forward pass of the full
                      model on calibration text; per decoder layer, cos = the mean over all tokens of
                      the cosine similarity between the block's input and output hidden states;
                      BI = 1 - cos. Remove the m layers with the highest cos (lowest BI), ranked once
                      (not iteratively), with no constraint (the published baseline). If, at some
                      depth, that removes one of the last `keep_last` layers, a column "ShortGPT
                      (keep last)" with the constrained variant is added for comparability.

Data. Held-out text: `pack_tokens(heldout_texts(), tok, seq_len, windows, seed)`, BoolQ's
Wikipedia passages, disjoint from the LAMBADA calibration text. The ShortGPT cosines use the DP's
own calibration windows (source, number, length and seed read from `strategy.meta["settings"]`,
falling back to LAMBADA, 8 windows, --seq-len, seed 0), so both data-driven methods see the same
calibration data. The second table re-scores every method on those calibration windows; its DP
column should reproduce the stored `meta["depth_metric"]` (shown as "DP stored").

Metric. Perplexity = exp(mean next-token NLL) over every position of every window (T-1 predictions
per window of T tokens), as `amoeba_export.metrics.perplexity`: fp32 model, NLL summed in float64.

Speed. Each layer set is evaluated from cached hidden states: prefix[l] is the input of layer l with
every earlier layer active (trainer.depth.LayerRunner), so a set whose first removed layer is f runs
only its kept layers after f. Identical sets across methods are evaluated once. The fast path is
checked against `perplexity(...)` through `ElasticModel.masked(layers=...)` (the reference forward,
batch size 4, use_cache=False) at one depth, to 1e-6 relative (`--no-verify` skips it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from amoeba_export.elastic import ElasticModel  # noqa: E402
from amoeba_export.metrics import perplexity  # noqa: E402
from amoeba_export.strategy import Strategy  # noqa: E402
from trainer.data import heldout_texts, load_texts, pack_tokens  # noqa: E402
from trainer.depth import LayerRunner  # noqa: E402

DEFAULT_STRATEGY = ROOT / "amoeba_export" / "strategies" / "smollm2-135m-instruct"
VERIFY_RTOL = 1e-6

LABELS = {
    "dp": "DP",
    "last": "last-m",
    "last_keep": "last-m (keep last)",
    "shortgpt": "ShortGPT",
    "shortgpt_keep": "ShortGPT (keep last)",
}


class FastPPL:
    """Perplexity of layer subsets on fixed windows, from cached full-model prefixes."""

    def __init__(self, stack, windows: torch.Tensor, batch_size: int = 4):
        self.ids = windows.long()
        self.batch_size = batch_size
        self.runner = LayerRunner(stack, self.ids)
        self.prefixes = self.runner.prefixes()  # L+1 states, hidden [n, T, hidden]
        self.n_layers = len(self.prefixes) - 1
        self._cache: dict[tuple[int, ...], float] = {}

    def cosines(self) -> list[float]:
        """Per layer: mean over all tokens of cos(block input, block output)."""
        out = []
        for l in range(self.n_layers):
            a, b = self.prefixes[l].hidden.double(), self.prefixes[l + 1].hidden.double()
            out.append(float(F.cosine_similarity(a, b, dim=-1).mean()))
        return out

    @torch.inference_mode()
    def __call__(self, kept: list[int]) -> float:
        key = tuple(sorted(kept))
        if key not in self._cache:
            removed = sorted(set(range(self.n_layers)) - set(key))
            first = removed[0] if removed else self.n_layers
            h = self.runner.run(self.prefixes[first], [i for i in key if i > first]).hidden
            n, t = self.ids.shape
            total = 0.0
            for s in range(0, n, self.batch_size):
                logits = self.runner.stack.logits(h[s:s + self.batch_size])[:, :-1].float()
                tgt = self.ids[s:s + self.batch_size, 1:]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
                total += float(nll.double().sum())
            self._cache[key] = math.exp(total / (n * (t - 1)))
        return self._cache[key]


def layer_sets(
    L: int, depths: dict[int, list[int]], keep_last: int, cos: list[float]
) -> dict[str, dict[int, list[int]]]:
    """method -> depth -> kept layer indices (ascending)."""
    # Highest cosine first (= lowest Block Influence); ties by index, so the ranking is deterministic.
    rank = sorted(range(L), key=lambda i: (-cos[i], i))
    rank_keep = [i for i in rank if i < L - keep_last]
    sets: dict[str, dict[int, list[int]]] = {k: {} for k in LABELS}
    for d, kept in depths.items():
        m = L - d
        sets["dp"][d] = sorted(kept)
        sets["last"][d] = list(range(d))
        tail = L - keep_last
        sets["last_keep"][d] = [i for i in range(L) if not tail - m <= i < tail]
        sets["shortgpt"][d] = sorted(set(range(L)) - set(rank[:m]))
        sets["shortgpt_keep"][d] = sorted(set(range(L)) - set(rank_keep[:m]))
    if sets["shortgpt_keep"] == sets["shortgpt"]:
        del sets["shortgpt_keep"]
    return sets


def removed_str(L: int, kept: list[int]) -> str:
    r = sorted(set(range(L)) - set(kept))
    return ",".join(map(str, r)) if r else "-"


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 1e5 else f"{x:.3e}"


def print_table(title: str, depths: list[int], methods: list[str], ppl: dict[str, dict[int, float]],
                extra: tuple[str, dict[int, float | None]] | None = None) -> None:
    cols = (["DP stored"] if extra else []) + [LABELS[k] for k in methods] + ["best"]
    rows = []
    for d in depths:
        row = [fmt(extra[1].get(d))] if extra else []
        vals = {k: ppl[k][d] for k in methods}
        best = min(vals.values())
        winners = [LABELS[k] for k in methods if vals[k] <= best * (1 + 1e-9)]
        row += [fmt(vals[k]) for k in methods]
        row.append("all equal" if len(winners) == len(methods) else " = ".join(winners))
        rows.append(row)
    widths = [max([9, len(c)] + [len(r[j]) for r in rows]) for j, c in enumerate(cols)]
    print(f"\n{title}")
    print("depth | " + " | ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("-" * (6 + sum(w + 3 for w in widths)))
    for d, row in zip(depths, rows):
        print(f"{d:5d} | " + " | ".join(c.rjust(w) for c, w in zip(row, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--strategy", default=str(DEFAULT_STRATEGY), help="strategy directory (default: the shipped SmolLM2 one)"
    )
    ap.add_argument("--model", default=None, help="base model directory (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows (default 16)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out window sample (default 0)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per LM-head / reference batch (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-calib-ppl", action="store_true", help="skip the calibration-text table")
    ap.add_argument("--no-verify", action="store_true", help="skip the fast-path check against masked()")
    ap.add_argument("--verify-depth", type=int, default=None, help="depth of that check (default: the smallest)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    strategy = Strategy.load(Path(args.strategy))
    elastic = ElasticModel(args.model, strategy)
    L = elastic.n_layers
    settings = strategy.meta.get("settings", {}) or {}
    keep_last = int(settings.get("keep_last", 1))
    depths = sorted(strategy.depths, reverse=True)
    stack, tok = elastic.stack(), elastic.tokenizer()

    # --- calibration windows: the DP's own; ShortGPT's cosines come from one full pass over them.
    calib_src = settings.get("calib", "lambada")
    calib_n = int(settings.get("depth_samples", 8))
    calib_len = int(settings.get("seq_len", args.seq_len))
    calib_seed = int(settings.get("seed", 0))
    calib_windows = pack_tokens(load_texts(calib_src), tok, calib_len, calib_n, calib_seed)
    t = time.time()
    calib = FastPPL(stack, calib_windows, args.batch_size)
    cos = calib.cosines()
    t_cos = time.time() - t
    sets = layer_sets(L, strategy.depths, keep_last, cos)
    methods = list(sets)

    # --- held-out perplexity of every (method, depth).
    windows = pack_tokens(heldout_texts(), tok, args.seq_len, args.windows, args.seed)
    t = time.time()
    calib_ppl: dict[str, dict[int, float]] = {}
    if not args.no_calib_ppl:
        calib_ppl = {k: {d: calib(sets[k][d]) for d in depths} for k in methods}
    t_calib = time.time() - t
    del calib
    t = time.time()
    held = FastPPL(stack, windows, args.batch_size)
    ppl = {k: {d: held(sets[k][d]) for d in depths} for k in methods}
    t_held = time.time() - t

    # --- the fast path against the reference forward through masked(), at one depth.
    verify = None
    if not args.no_verify:
        vd = args.verify_depth if args.verify_depth is not None else min(depths)
        t = time.time()
        ref = perplexity(elastic.logits_fn(layers=sets["dp"][vd]), windows, args.batch_size)
        rel = abs(ppl["dp"][vd] - ref) / ref
        verify = {"depth": vd, "fast": ppl["dp"][vd], "masked": ref, "rel_diff": rel, "ok": rel <= VERIFY_RTOL,
                  "seconds": round(time.time() - t, 1)}

    # --- report.
    dp_metric = {int(d): float(v) for d, v in (strategy.meta.get("depth_metric") or {}).items()}
    print(f"model {elastic.info.get('name')} ({L} layers), strategy {args.strategy}, keep_last={keep_last}")
    print(f"held-out: BoolQ passages, {len(windows)} windows x {windows.shape[1]} tokens (seed {args.seed}), "
          f"{len(windows) * (windows.shape[1] - 1)} predicted tokens")
    print(
        f"calibration (DP + ShortGPT): {calib_src}, {len(calib_windows)} windows x {calib_windows.shape[1]} tokens "
        f"(seed {calib_seed})"
    )
    print("ShortGPT cos(in, out) per layer: " + " ".join(f"{i}:{c:.3f}" for i, c in enumerate(cos)))
    print_table("held-out perplexity (BoolQ Wikipedia; lower is better)", depths, methods, ppl)
    if calib_ppl:
        print_table("calibration perplexity (the DP's own calibration windows; lower is better)", depths, methods,
                    calib_ppl, ("DP stored", dp_metric) if dp_metric else None)
    elif dp_metric:
        print(
            "\nDP calibration metric (meta.depth_metric): "
            + ", ".join(f"{d}: {dp_metric[d]:.3f}" for d in depths if d in dp_metric)
        )

    if "shortgpt_keep" not in sets:
        print(
            f"(ShortGPT never removes one of the last {keep_last} layer(s) at these depths, so its keep-last variant "
            "is the same)"
        )
    print("\nremoved layers")
    for d in depths:
        if d == L:
            continue
        print(f"  depth {d}: " + "; ".join(f"{LABELS[k]} [{removed_str(L, sets[k][d])}]" for k in methods))

    pruned = [d for d in depths if d < L]
    baselines = [k for k in methods if k != "dp"]
    summary = {}
    if pruned:
        best_base = {d: min(ppl[k][d] for k in baselines) for d in pruned}
        dp_best = [d for d in pruned if ppl["dp"][d] <= best_base[d] * (1 + 1e-9)]
        ratios = [ppl["dp"][d] / best_base[d] for d in pruned]
        summary = {"dp_best_depths": dp_best, "n_depths": len(pruned),
                   "mean_ratio_dp_to_best_baseline": sum(ratios) / len(ratios),
                   "max_ratio_dp_to_best_baseline": max(ratios)}
        print(f"\nDP is best (or tied) at {len(dp_best)}/{len(pruned)} pruned depths; "
              f"mean DP ppl / best-baseline ppl = {summary['mean_ratio_dp_to_best_baseline']:.4f} "
              f"(max {summary['max_ratio_dp_to_best_baseline']:.4f})")
        lost = [d for d in pruned if d not in dp_best]
        if lost:
            winner = {d: LABELS[min(baselines, key=lambda k: ppl[k][d])] for d in lost}
            print("DP not best at depths " + ", ".join(
                f"{d} (DP {ppl['dp'][d]:.3f} vs {winner[d]} {best_base[d]:.3f})" for d in lost))
            if calib_ppl:
                cal_best = [
                    d for d in lost if calib_ppl["dp"][d] <= min(calib_ppl[k][d] for k in baselines) * (1 + 1e-9)
                ]
                if cal_best:
                    print("  ...of which DP IS best on its calibration text at depths "
                          + ", ".join(map(str, cal_best)) + " (calibration/held-out mismatch)")
    if verify:
        print(
            f"\nverify (depth {verify['depth']}, DP layers): fast {verify['fast']:.9g} vs masked() "
            f"{verify['masked']:.9g}, "
            f"rel diff {verify['rel_diff']:.2e} -> {'OK' if verify['ok'] else 'MISMATCH'} (<= {VERIFY_RTOL:g})"
        )
    seconds = time.time() - t0
    print(
        f"time: {seconds:.1f}s total (cosines + calib prefixes {t_cos:.1f}s, calibration ppl {t_calib:.1f}s, "
        f"held-out {t_held:.1f}s, verify {verify['seconds'] if verify else 0:.1f}s), {torch.get_num_threads()} threads"
    )

    def depth_record(d: int) -> dict:
        rec = {}
        for k in methods:
            rec[k] = {"kept": sets[k][d], "removed": sorted(set(range(L)) - set(sets[k][d])), "heldout_ppl": ppl[k][d]}
            if calib_ppl:
                rec[k]["calib_ppl"] = calib_ppl[k][d]
        if d in dp_metric:
            rec["dp_stored_metric"] = dp_metric[d]
        return rec

    if args.json:
        doc = {
            "args": vars(args),
            "model": elastic.info,
            "keep_last": keep_last,
            "n_layers": L,
            "heldout": {
                "source": "boolq",
                "windows": len(windows),
                "seq_len": int(windows.shape[1]),
                "seed": args.seed,
            },
            "calibration": {
                "source": calib_src,
                "windows": len(calib_windows),
                "seq_len": int(calib_windows.shape[1]),
                "seed": calib_seed,
            },
            "cosine": cos,
            "block_influence": [1 - c for c in cos],
            "depths": {str(d): depth_record(d) for d in depths},
            "summary": summary,
            "verify": verify,
            "seconds": round(seconds, 1),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if (verify is None or verify["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
