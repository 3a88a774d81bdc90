"""The PyTorch-flow profiler: times an exported HF directory as transformers runs it.

What ships is what was timed: the profiler loads the artifact directory the PyTorch exporter
wrote (stock `LlamaForCausalLM`, or `amoeba_llama` for per-layer shapes), in the artifact's own
dtype unless told otherwise, and times the three things a budget can bound:

- TTFT: one forward over the `batch x prompt_len` prompt with a fresh KV cache, keeping only the
  last position's logits (as `generate` does, `logits_to_keep=1`), plus the argmax of the first token.
- TPOT: one decode step, a one-token forward with a KV cache of exactly `prompt_len` tokens, plus
  its argmax. The prompt is prefilled once, untimed; before every call (untimed, `measure`'s
  `setup`) the cache is cropped back to `prompt_len`, so each sample does the same work: attend
  over `prompt_len` cached positions and append one (a `DynamicCache` append concatenates, so the
  step allocates its grown cache exactly as a real decode step does).
- E2E: a whole greedy request: prefill (the first token) then `gen_len - 1` decode steps, so that
  `gen_len` tokens come out, as `generate(max_new_tokens=gen_len)` would.

On CUDA every sample is bracketed by `torch.cuda.synchronize`.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from amoeba_export.errors import UserError
from amoeba_export.materialize import DTYPES

from .timing import Timing, environment, measure, pinned_threads, profile_record
from .workload import Workload

FLOW = "pytorch"
DEVICES = ("cpu", "cuda")  # --target host times the CPU; a GPU target (on the device) times CUDA


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported by the PyTorch profiler: use cpu or cuda")
    return dev


def load_artifact(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """The exported directory, loaded by transformers in eval mode on `device`.

    `dtype=None` keeps the artifact's own dtype (its config), because that is what ships.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not an exported PyTorch-flow directory (no config.json); "
                        "export one with `amoeba-export --flow pytorch --out DIR`")
    dev = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    from amoeba_export.exporters.pytorch import load_model

    return load_model(path, dtype if dtype is not None else "auto").to(dev)


# ---------------------------------------------------------------- the steps that are timed

def prefill_kwargs(model) -> dict:
    """Keep only the last position's logits in prefill where the model allows it, as generate does."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def next_token(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice from the last position: `[batch, 1]` ids."""
    return logits[:, -1, :].argmax(-1, keepdim=True)


def prefill(model, ids: torch.Tensor, **kwargs):
    """(first token ids [batch, 1], the KV cache of len(ids) positions)."""
    out = model(input_ids=ids, use_cache=True, **kwargs)
    return next_token(out.logits), out.past_key_values


def decode_step(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: the `[batch, 1]` token attends over `cache` (grown by one in place)."""
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return next_token(out.logits)


def generate(model, ids: torch.Tensor, gen_len: int, **kwargs) -> torch.Tensor:
    """Greedy: prefill gives the first token, then `gen_len - 1` decode steps. `[batch, gen_len]`."""
    token, cache = prefill(model, ids, **kwargs)
    tokens = [token]
    for _ in range(gen_len - 1):
        token = decode_step(model, token, cache)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def cache_lengths(cache) -> list[int]:
    """Cached positions per layer."""
    return [cache.get_seq_length(i) for i in range(len(cache))]


def rewind(cache, length: int) -> None:
    """Crop a KV cache back to `length` positions, in place.

    `crop` with a negative count removes that many tokens in transformers 4.x and 5.x alike (5.x
    refuses a positive absolute length). Cropping slices views; no data is copied.
    """
    n = cache.get_seq_length()
    if n < length:
        raise ValueError(f"cache holds {n} positions, cannot rewind to {length}")
    if n > length:
        cache.crop(length - n)


# ---------------------------------------------------------------- timing them

def time_workload(model, workload: Workload, *, device: str | torch.device | None = None, seed: int = 0,
                  metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict[str, Timing]:
    """Time `metrics` (default: ttft, tpot, and the workload's own metric) for `workload`.

    `measure_kwargs` go to `timing.measure` (warmup, min_repeats, max_repeats, max_seconds,
    rel_tol, ...). Returns {metric: Timing}, seconds.
    """
    metrics, _ = workload.timed(metrics, getattr(model.config, "max_position_embeddings", None),
                                "max_position_embeddings")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda":
        measure_kwargs.setdefault("sync", lambda: torch.cuda.synchronize(dev))

    ids = torch.from_numpy(workload.prompt_ids(model.config.vocab_size, seed)).to(dev)
    kwargs = prefill_kwargs(model)
    out: dict[str, Timing] = {}
    with torch.inference_mode():
        for metric in metrics:
            if metric == "ttft":
                out[metric] = measure(lambda: prefill(model, ids, **kwargs)[0], **measure_kwargs)
            elif metric == "tpot":
                token, cache = prefill(model, ids, **kwargs)
                P = workload.prompt_len
                out[metric] = measure(lambda: decode_step(model, token, cache), setup=lambda: rewind(cache, P),
                                      **measure_kwargs)
                del cache
            else:
                out[metric] = measure(lambda: generate(model, ids, workload.gen_len, **kwargs), **measure_kwargs)
    return out


def profile_artifact(path: str | Path, workload: Workload, *, threads: int | None = None,
                     device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, seed: int = 0,
                     metrics: tuple[str, ...] | None = None, **measure_kwargs) -> dict:
    """Load the artifact, pin threads, record the environment, time the workload.

    Returns a JSON-serialisable record: {"workload", "timings": {metric: Timing fields},
    "environment", "artifact", "runtime", "measure"}.
    """
    path = Path(path)
    model = load_artifact(path, device, dtype)
    with pinned_threads(threads) as n:
        env = environment()  # inside the pin: records the thread count the run uses
        timings = time_workload(model, workload, device=device, seed=seed, metrics=metrics, **measure_kwargs)
    runtime = {
        "flow": FLOW, "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": n, "model_type": model.config.model_type, "class": type(model).__name__,
        "prefill_kwargs": prefill_kwargs(model), "seed": seed,
    }
    return profile_record(path, workload, timings, env, runtime, measure_kwargs)
