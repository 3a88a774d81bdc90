"""Runs inside vLLM's own virtualenv (scripts/setup-vllm.sh), started by runtime.py as a subprocess:

    <vllm venv>/bin/python runner.py REQUEST.json

The request is JSON: {"jobs": [job, ...]}, every job one artifact, all in this one process (`import
vllm` alone costs 15-28 s on two cores). A job is

    {"model": DIR, "dtype": "float32", "max_model_len": N, "trust_remote_code": bool, "out": PATH,
     "mode": "logits", "prompts": [[id, ...], ...]}
        -> PATH (.npy): float32 [n_prompts, T, V], the raw logits at every prompt position
    {..., "mode": "profile", "workload": {...}, "metrics": [...], "seed": 0, "threads": 1, "measure": {...}}
        -> PATH (.json): {"timings": {metric: Timing fields}, "environment": ..., "runtime": ...}

Logits: `logprobs_mode="raw_logits"` makes vLLM return logits, not log-probabilities, both for the
prompt (`prompt_logprobs`: positions 0..T-2) and for the one generated token (position T-1); full
vocabulary for both (docs/flow-vllm.md §6). Profile: profilers.timing.time_requests over whole
requests, so PYTHONPATH must hold the repository root. Only JSON and .npy are written.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np


def make_llm(job: dict, vocab: int | None = None):
    from vllm import LLM

    return LLM(model=job["model"], tokenizer=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
               enforce_eager=True, max_logprobs=vocab or 20, logprobs_mode="raw_logits",
               trust_remote_code=job["trust_remote_code"], seed=0, enable_prefix_caching=False,
               max_num_seqs=job.get("max_num_seqs", 8), max_num_batched_tokens=max(job["max_model_len"], 256))


def _row(entry: dict, vocab: int) -> np.ndarray:
    row = np.full(vocab, np.nan, dtype=np.float32)
    for token, lp in entry.items():
        row[token] = lp.logprob
    return row


def logits(job: dict) -> dict:
    from vllm import SamplingParams, TokensPrompt

    vocab = json.loads((Path(job["model"]) / "config.json").read_text())["vocab_size"]
    t0 = time.perf_counter()
    llm = make_llm(job, vocab)
    loaded = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=-1, prompt_logprobs=-1, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in job["prompts"]], params,
                        use_tqdm=False)
    result = []
    for out in outs:
        rows = [_row(e, vocab) for e in out.prompt_logprobs[1:]] + [_row(out.outputs[0].logprobs[0], vocab)]
        result.append(np.stack(rows))
    arr = np.stack(result)
    if np.isnan(arr).any():
        raise RuntimeError("vLLM returned fewer logits than the vocabulary: is max_logprobs below it?")
    np.save(job["out"], arr)
    del llm
    return {"load_s": round(loaded, 2), "run_s": round(time.perf_counter() - t0 - loaded, 2)}


def profile(job: dict) -> dict:
    import torch
    import vllm
    from vllm import SamplingParams, TokensPrompt

    from amoeba_export.shared_types import Workload
    from profilers import timing

    wl = Workload.from_json(job["workload"])
    vocab = json.loads((Path(job["model"]) / "config.json").read_text())["vocab_size"]
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in wl.prompt_ids(vocab, job.get("seed", 0))]
    env = timing.environment(run_threads=job["threads"])
    t0 = time.perf_counter()
    llm = make_llm({**job, "max_num_seqs": wl.batch})
    loaded = time.perf_counter() - t0

    def run(n: int):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [n] * len(outs):
            raise RuntimeError(f"asked vLLM for {n} tokens per request, got {got}")

    timings = timing.time_requests(run, wl, tuple(job["metrics"]), **job.get("measure", {}))
    runtime = {"runtime": "vllm", "vllm": vllm.__version__, "torch": torch.__version__, "device": "cpu",
               "dtype": job["dtype"], "threads": job["threads"], "enforce_eager": True, "prefix_caching": False,
               "load_s": round(loaded, 2), "timed_as": "whole requests (timing.time_requests)"}
    Path(job["out"]).write_text(json.dumps({"timings": {m: t.to_dict() for m, t in timings.items()},
                                            "environment": env, "runtime": runtime}))
    return {"load_s": round(loaded, 2)}


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    t0 = time.perf_counter()
    import vllm  # noqa: F401  (timed apart from the jobs)
    report = {"import_s": round(time.perf_counter() - t0, 2), "jobs": []}
    for job in request["jobs"]:
        report["jobs"].append({"logits": logits, "profile": profile}[job["mode"]](job))
        gc.collect()  # one engine's KV cache (VLLM_CPU_KVCACHE_SPACE) at a time
    report["total_s"] = round(time.perf_counter() - t0, 2)
    print("RUNNER-REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
