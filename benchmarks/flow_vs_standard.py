"""Decode speed per flow on the host: our artifact against the same model converted by the flow's
standard tool, for the dense model and a half-size subnet, side by side in one run.

For each CPU flow, two shapes: the dense one and the one whose parameter count is closest to half
the dense model's (as benchmarks/flow_decode.py picks it). Ours: the shape legalised, exported and
built as `amoeba-export` would (`measure_shape`). Standard: our pytorch flow's Hugging Face
directory of the same shape, converted by the flow's own tool, at the same weight type:

- pytorch: the HF directory is the standard format (stock `LlamaForCausalLM`), run by transformers;
- gguf: llama.cpp's `convert_hf_to_gguf.py` (`--outtype` = our quant), run by llama-cpp-python;
- openvino: `optimum-cli export openvino --weight-format fp32 --task text-generation-with-past`;
- executorch: `optimum-cli export executorch --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache`;
- onnx: none (optimum's ONNX exporter lives in `optimum-onnx`, which neither tool venv holds).

The standard tools take one size for every layer. No uniform shape of the shipped strategy is near
half the parameters (depth-only shapes stop at 19x1.0, 71%), so the standard tools get the subnet
zero-padded to one size per layer (`--layout pad`: exact, docs/flow-internals.md §2): the model they
can run for it. The table gives both parameter counts.

Every artifact is timed by the same loop (`profilers.timing.time_steps`, one decode step over a
128-token cache, batch 1) in the runtime of OUR venv, with the same threads and runtime settings:
optimum's artifacts have other inputs than ours, so small step adapters below drive them. The tool
venvs come from scripts/setup-standard-tools.sh (run it first).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from amoeba_export.errors import UserError

STANDARD_ROOT = "standard"  # under the amoeba-export cache (scripts/setup-standard-tools.sh)
TOOL = {"pytorch": "transformers (HF dir)", "gguf": "convert_hf_to_gguf.py", "openvino": "optimum-cli openvino",
        "executorch": "optimum-cli executorch"}


def tools_dir() -> Path:
    from amoeba_export.locations import cache_dir

    return cache_dir() / STANDARD_ROOT


def run_tool(cmd: list, what: str) -> float:
    """Run a converter; its seconds. Its output is shown only when it fails."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise UserError(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def venv_tool(name: str, exe: str) -> Path:
    path = tools_dir() / name / "bin" / exe
    if not path.is_file():
        raise UserError(f"{path} is missing: run scripts/setup-standard-tools.sh")
    return path


# ---------------------------------------------------------------- converters: HF dir -> artifact dir

def convert_gguf(hf: Path, out: Path, quant: str | None) -> float:
    script = tools_dir() / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"{script} is missing: run scripts/setup-standard-tools.sh gguf")
    outtype = {None: "f32", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(quant, quant)
    return run_tool([sys.executable, script, hf, "--outfile", out / "model.gguf", "--outtype", outtype],
                    "convert_hf_to_gguf.py")


def convert_openvino(hf: Path, out: Path, quant: str | None) -> float:
    return run_tool([venv_tool("optimum-intel", "optimum-cli"), "export", "openvino", "--model", hf,
                     "--task", "text-generation-with-past", "--weight-format", "fp32", out],
                    "optimum-cli export openvino")


def convert_executorch(hf: Path, out: Path, quant: str | None, max_seq_len: int = 256) -> float:
    return run_tool([venv_tool("optimum-executorch", "optimum-cli"), "export", "executorch", "--model", hf,
                     "--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
                     "--max_seq_len", max_seq_len, "--dtype", "float32", "--output_dir", out],
                    "optimum-cli export executorch")


# ---------------------------------------------------------------- step adapters for optimum's artifacts

class OptimumOVSteps:
    """optimum-intel's stateful IR: inputs input_ids, attention_mask, position_ids, beam_idx; the KV
    cache is the request's state, cut back to `length` positions on rewind."""

    def __init__(self, request):
        self.request, self.pos = request, 0

    def _run(self, ids: np.ndarray) -> int:
        T = ids.shape[1]
        self.request.infer({"input_ids": ids, "attention_mask": np.ones((1, self.pos + T), np.int64),
                            "position_ids": np.arange(self.pos, self.pos + T, dtype=np.int64)[None],
                            "beam_idx": np.zeros(1, np.int32)})
        self.pos += T
        return int(self.request.get_tensor("logits").data[0, -1].argmax())

    def prefill(self, ids) -> int:
        return self._run(np.asarray(ids, np.int64))

    def decode(self, token) -> int:
        return self._run(np.array([[token]], np.int64))

    def rewind(self, length: int) -> None:
        import openvino as ov

        if length == 0:
            self.request.reset_state()
        else:  # states are [batch, kv_heads, positions, head_dim]
            for state in self.request.query_state():
                state.state = ov.Tensor(np.ascontiguousarray(state.state.data[:, :, :length]))
        self.pos = length


class OptimumETSteps:
    """optimum-executorch's .pte: forward(input_ids [1, T], cache_position [T]) -> logits; the KV
    cache lives in the program's buffers and attends up to the cache position, so rewinding only
    moves the position."""

    def __init__(self, method):
        self.method, self.pos = method, 0

    def _run(self, ids) -> int:
        import torch

        T = ids.shape[1]
        logits = self.method.execute([ids, torch.arange(self.pos, self.pos + T, dtype=torch.long)])[0]
        self.pos += T
        return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())

    def prefill(self, ids) -> int:
        return self._run(ids)

    def decode(self, token) -> int:
        import torch

        return self._run(torch.tensor([[token]], dtype=torch.long))

    def rewind(self, length: int) -> None:
        self.pos = length


def open_optimum_openvino(path, workload, metrics=None, *, threads=None, seed=0, device="cpu"):
    """optimum-intel's IR compiled exactly as our flow's runtime compiles ours for timing (threads,
    one stream, LATENCY, its TIMED_HINTS)."""
    import openvino as ov

    from amoeba_export.flows.base import Opened
    from amoeba_export.flows.openvino import runtime as ours
    from profilers.timing import resolve_threads

    n = resolve_threads(threads)
    compiled = ours.compile_model(Path(path), n, ours.TIMED_HINTS)  # reads openvino_model.xml, as optimum names it
    vocab = compiled.output("logits").get_partial_shape()[-1].get_length()
    metrics, _ = workload.timed(metrics, None, "max positions")
    runtime = {"flow": "openvino", "artifact": "optimum-intel", "openvino": ov.get_version(), "threads": n,
               "hints": dict(ours.TIMED_HINTS) or "plugin defaults", "properties": ours.properties(compiled)}
    return Opened(OptimumOVSteps(compiled.create_infer_request()), workload.prompt_ids(vocab, seed), runtime, n,
                  metrics)


def open_optimum_executorch(path, workload, metrics=None, *, threads=None, seed=0, device="cpu"):
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (custom_sdpa, update_cache kernels)
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from amoeba_export.flows.base import Opened
    from profilers.timing import resolve_threads

    n = resolve_threads(threads)
    portable_lib._unsafe_reset_threadpool(n)
    method = Runtime.get().load_program(Path(path) / "model.pte").load_method("forward")
    metrics, _ = workload.timed(metrics, None, "max positions")
    vocab = int(method.metadata.output_tensor_meta(0).sizes()[-1]) if hasattr(method, "metadata") else 49152
    ids = torch.from_numpy(workload.prompt_ids(vocab, seed))
    return Opened(OptimumETSteps(method), ids, {"flow": "executorch", "artifact": "optimum-executorch", "threads": n},
                  n, metrics)


# flow -> (convert HF dir into an artifact dir, an `open` for it where our flow's cannot read it)
STANDARD = {
    "pytorch": (None, None),
    "gguf": (convert_gguf, None),
    "openvino": (convert_openvino, open_optimum_openvino),
    "executorch": (convert_executorch, open_optimum_executorch),
}


NO_STANDARD = {"onnx": "no standard tool: optimum's ONNX exporter (optimum-onnx) is not installed"}


# ---------------------------------------------------------------- the run

def standard_artifact(flow, hf_plan, tokenizer_dir: Path, quant, tmp: Path, keep: Path | None = None
                      ) -> tuple[Path, float]:
    """`hf_plan` (a uniform DenseModel) exported by our pytorch flow and converted by `flow`'s
    standard tool: (the artifact's folder, seconds the tool took). With `keep`, the converted artifact
    is kept in (and reused from) a folder there named by flow, depth, parameters and format."""
    from amoeba_export.flows import get_flow
    from amoeba_export.io import read_json, write_json

    convert = STANDARD[flow.name][0]
    art = tmp / "standard"
    if keep is not None and convert is not None:
        fmt = quant or str(hf_plan.dtype).removeprefix("torch.")
        art = keep / f"{flow.name}-{len(hf_plan.layers)}x{hf_plan.parameters()}-{fmt}"
    done = art / "converted.json"
    if done.is_file():
        return art, read_json(done)["convert_s"]
    hf = tmp / "hf"
    hf.mkdir()
    get_flow("pytorch").emit(hf_plan, hf, tokenizer_dir)
    if convert is None:
        return hf, 0.0
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir(parents=True)
    seconds = convert(hf, art, quant)
    shutil.rmtree(hf)  # the scratch folder holds one model at a time
    write_json(done, {"convert_s": seconds})
    return art, seconds


# Timed in this order: the first timing in a process runs slow (caches, allocator, CPU frequency), so
# each side is timed once early and once late, and its two medians are averaged.
ORDER = ("ours", "std", "std", "ours")


def time_pair(flow, ours_plan, hf_plan, wl, tokenizer_dir: Path, quant, threads: int, target: dict,
              keep: Path | None = None) -> tuple[dict, dict | None]:
    """Our artifact (exported and built as the compile would) and the standard tool's (None where the
    flow has none), each timed twice in ORDER by the same loop in our runtime: (ours, standard), each
    the first timing record with "median" the mean of its two medians, "medians" both, "noisy" if
    either was, and for the standard one "convert_s"."""
    from amoeba_export.flows import write_artifact
    from amoeba_export.io import scratch_dir
    from profilers.profile import time_artifact

    opener = STANDARD.get(flow.name, (None, None))[1]
    timed = {"ours": flow, "std": flow if opener is None else dataclasses.replace(flow, open=opener)}
    with scratch_dir("amoeba-ours-") as ours_dir, scratch_dir("amoeba-standard-") as tmp:
        write_artifact(flow, ours_plan, Path(ours_dir), tokenizer_dir, target, quant=quant, workload=wl,
                       build=flow.times_build, **flow.profile_emit)
        art = {"ours": Path(ours_dir)}
        seconds = None
        if flow.name in STANDARD:
            art["std"], seconds = standard_artifact(flow, hf_plan, tokenizer_dir, quant, Path(tmp), keep)
        runs: dict[str, list[dict]] = {}
        for who in ORDER:
            if who in art:
                runs.setdefault(who, []).append(time_artifact(art[who], timed[who], wl, threads=threads))
    out = {}
    for who, records in runs.items():
        medians = [r["median"] for r in records]
        out[who] = {**records[0], "median": sum(medians) / len(medians), "medians": medians,
                    "noisy": any(r["noisy"] for r in records),
                    "other_load": max(r["other_load"] or 0 for r in records)}
    if "std" in out:
        out["std"]["convert_s"] = seconds
    return out["ours"], out.get("std")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", default="pytorch,onnx,gguf,openvino,executorch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--strategy", default=None)
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the standard tools' artifacts here and reuse them (converting takes minutes)")
    args = ap.parse_args()

    from amoeba_export.elastic import load_elastic
    from amoeba_export.flows import FLOWS, get_flow
    from amoeba_export.pipeline import legal_plans
    from amoeba_export.search import format_time
    from profilers.timing import environment
    from profilers.workload import Workload
    from targets import load_target

    elastic, _ = load_elastic(args.model, args.strategy)
    target = load_target("host")
    wl = Workload(1, args.prompt_len, 1, "tpot")
    space = elastic.strategy.space
    dense_shape = space.largest
    env = environment(args.threads)
    load_before = env["loadavg"]
    for w in env.get("warnings", []):
        print(f"warning: {w}")
    print(f"host: {env['cpu']}, {env['usable_cpus']} CPUs, threads {args.threads}, workload {wl.key()}, "
          f"load average before {load_before}")
    # the HF directories the standard tools convert: one size per layer (zero-padded where needed)
    hf_plans = legal_plans(elastic, get_flow("pytorch"), target, layout="pad").shapes
    rows, missing = [], []
    for name in args.flows.split(","):
        if name not in FLOWS:
            missing.append(f"{name}: not a flow on this checkout")
            continue
        flow = get_flow(name)
        why = flow.unavailable()
        if why:
            missing.append(f"{name}: {why}")
            continue
        planned = legal_plans(elastic, flow, target)
        plans, quant = planned.shapes, planned.quant
        full = plans[dense_shape].parameters()
        half = min(space, key=lambda s: abs(plans[s].parameters() - full / 2))
        for shape in (dense_shape, half):
            fmt = quant or str(plans[shape].dtype).removeprefix("torch.")
            print(f"{name} {shape} ({fmt}): ours and {TOOL.get(name, 'no standard tool')} ...", flush=True)
            try:
                ours, std = time_pair(flow, plans[shape], hf_plans[shape], wl, elastic.dir, quant, args.threads,
                                      target, args.keep)
            except Exception as e:  # one flow's failure must not cost the other rows of the run
                traceback.print_exc()
                missing.append(f"{name} {shape}: failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            note = NO_STANDARD.get(name, "no standard tool") if std is None else (
                f"convert {std['convert_s']:.0f} s" if std["convert_s"] else "")
            if name == "pytorch" and shape == dense_shape:
                note = "the same HF dir as ours, timed again"
            rows.append((name, fmt, str(shape), plans[shape].parameters(), ours,
                         hf_plans[shape].parameters() if std else None, std, note))
    load_after = environment(args.threads)["loadavg"]

    print(f"\nthreads={args.threads}, workload {wl.key()} (TPOT: one decode step over a {args.prompt_len}-token "
          f"cache), load average before {load_before}, after {load_after}")
    print(f"{'flow':10} {'dtype':8} {'shape':8} {'params':>7} {'our TPOT':>9} {'std params':>10} {'std TPOT':>9} "
          f"{'ours/std':>8}  notes")
    for name, fmt, shape, params, ours, std_params, std, note in rows:
        noisy = [who for who, t in (("ours", ours), ("std", std)) if t and t.get("noisy")]
        if noisy:
            busy = max((t or {}).get("other_load") or 0 for t in (ours, std))
            note = "; ".join(n for n in (note, f"noisy: {','.join(noisy)} (other load {busy:.1f} CPUs)") if n)
        pairs = [f"{who} {'/'.join(format_time(m) for m in t['medians'])}" for who, t in (("ours", ours), ("std", std))
                 if t]
        note = "; ".join(n for n in (note, "early/late medians: " + ", ".join(pairs)) if n)
        std_p = f"{std_params / 1e6:.1f}M" if std else "-"
        std_t = format_time(std["median"]) if std else "-"
        ratio = f"{ours['median'] / std['median']:.2f}" if std else "-"
        print(f"{name:10} {fmt:8} {shape:8} {params / 1e6:>6.1f}M {format_time(ours['median']):>9} {std_p:>10} "
              f"{std_t:>9} {ratio:>8}  {note}")
    for m in missing:
        print(f"missing: {m}")


if __name__ == "__main__":
    main()
