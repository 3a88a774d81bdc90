"""Stage-2 fine-tuning and its two ablations, side by side: SMOL with loss-magnitude balancing,
SMOL without balancing, one plain LoRA. Held-out perplexity of every shape before (the stage-1
model: B starts at zero, so all three runs start from the same model) and after each run, and
seconds per step.

    python benchmarks/train_ablation.py --out runs/ablation                  # run the three, then report
    python benchmarks/train_ablation.py --out runs/ablation --parallel --threads 1   # the three at once, a thread each
    python benchmarks/train_ablation.py --out runs/ablation --report-only    # report runs already made

Extra arguments after `--` go to every `amoeba-export train` (defaults below: the CPU settings of
the closing note of issue 6: 48 steps of 4 x 256-token rows, rank 8, alpha 16, lr 1e-3).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RUNS = {"smol": [], "no-balancing": ["--no-balancing"], "lora": ["--adapter-kind", "lora"]}
DEFAULTS = ["--steps", "48", "--batch", "4", "--seq-len", "256", "--grad-accum", "1", "--rank", "8", "--alpha", "16",
            "--lr", "1e-3", "--eval-pairs", "8", "--save-every", "12"]


def run(out: Path, extra: list[str], parallel: bool, threads: int | None) -> None:
    procs = []
    for name, flags in RUNS.items():
        cmd = [sys.executable, "-m", "amoeba_export.cli", "train", "--out", str(out / name), *DEFAULTS, *flags, *extra]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if name != "smol":
            cmd.append("--no-eval-before")  # the stage-1 model is the same for the three runs: scored once
        print("$", " ".join(cmd[2:]), flush=True)
        log = open(out / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if parallel:
            procs.append(proc)
        elif proc.wait():
            sys.exit(f"{name} failed: see {out / name}.log")
    for proc in procs:
        if proc.wait():
            sys.exit(f"a run failed: see the logs in {out}")


def report(out: Path) -> None:
    docs = {
        name: json.loads((out / name / "eval.json").read_text())
        for name in RUNS
        if (out / name / "eval.json").is_file()
    }
    before = next((d["before"] for d in docs.values() if "before" in d), None)
    if before is None or not docs:
        sys.exit(f"no finished run with a 'before' score in {out}")
    names = [n for n in RUNS if n in docs and "after" in docs[n]]
    print(f"held-out perplexity, {next(iter(docs.values()))['eval']['target_tokens']} response tokens; "
          f"before = the stage-1 model (no adapter)\n")
    print(f"{'shape':>9} {'before':>8} " + " ".join(f"{n:>13}" for n in names))
    for shape in before:
        print(f"{shape:>9} {before[shape]:8.2f} " + " ".join(f"{docs[n]['after'][shape]:13.2f}" for n in names))
    print()
    for n in names:
        after = docs[n]["after"]
        change = [after[s] / before[s] - 1 for s in before]
        better = sum(c < 0 for c in change)
        print(f"{n:>13}: improved {better}/{len(change)} shapes ({better / len(change):.0%}), median change "
              f"{statistics.median(change):+.1%}, best {min(change):+.1%}, worst {max(change):+.1%}; "
              f"{docs[n]['steps']} steps, {docs[n]['seconds_per_step']:.1f} s/step "
              f"({docs[n]['config']['batch']} x {docs[n]['config']['seq_len']} tokens x "
              f"{docs[n]['config']['grad_accum']} per step)")
    if "smol" in names:
        for n in names[1:]:
            wins = sum(docs["smol"]["after"][s] < docs[n]["after"][s] for s in before)
            print(f"smol better than {n} on {wins}/{len(before)} shapes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", action="store_true", help="Run the three at once.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args.out, extra, args.parallel, args.threads)
    report(args.out)


if __name__ == "__main__":
    main()
