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
from amoeba_export.shared_types import Workload
from profilers.timing import pinned_threads

from ..base import Opened


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
    from .writer import load_model

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


# ---------------------------------------------------------------- the runtime the timing loop steps

class Steps:
    """The model's KV cache between steps (`profilers.timing.time_steps`)."""

    def __init__(self, model):
        self.model, self.kwargs, self.cache = model, prefill_kwargs(model), None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self.kwargs)
        self.cache = out.past_key_values
        return next_token(out.logits)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, token, self.cache)

    def rewind(self, length: int) -> None:
        if length == 0:
            self.cache = None  # a fresh cache, as a new request has
        else:
            rewind(self.cache, length)


def open(path: str | Path, workload: Workload, metrics: tuple[str, ...] | None = None, *, threads: int | None = None,
         seed: int = 0, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> Opened:
    """The exported directory loaded by transformers on `device`, its threads pinned until `close`."""
    model = load_artifact(path, device, dtype)
    metrics, _ = workload.timed(metrics, getattr(model.config, "max_position_embeddings", None),
                                "max_position_embeddings")
    dev = resolve_device(device)
    pin = pinned_threads(threads)
    n = pin.__enter__()
    ids = torch.from_numpy(workload.prompt_ids(model.config.vocab_size, seed)).to(dev)
    runtime = {
        "flow": "pytorch", "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": n, "model_type": model.config.model_type, "class": type(model).__name__,
        "prefill_kwargs": prefill_kwargs(model), "seed": seed,
    }
    sync = {"sync": lambda: torch.cuda.synchronize(dev)} if dev.type == "cuda" else {}
    return Opened(Steps(model), ids, runtime, n, metrics, sync, close=lambda: pin.__exit__(None, None, None))
