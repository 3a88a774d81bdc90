"""The llama.cpp-flow profiler: times an exported `model.gguf` as llama.cpp runs it (llama-cpp-python).

What ships is what was timed: the file the GGUF exporter wrote (or built, for K-quants), with
llama-cpp-python's default context settings (F16 KV cache, no flash attention, n_batch and n_ubatch
min(n_ctx, 512), n_ctx = the workload's longest sequence), `n_threads` and `n_threads_batch` both
set to `threads`; the record keeps them all. Only the last position's logits are computed
(no `logits_all`: it would add a full vocabulary projection per prompt position).

- TTFT: the prompt (`prompt_len` seeded random ids) evaluated from an empty KV cache (cleared in
  the untimed setup), plus the argmax of the last position's logits.
- TPOT: one decode step over exactly `prompt_len` cached positions. The prompt is prefilled once,
  untimed; before every sample (untimed) the KV cells at positions >= prompt_len are removed
  (`llama_memory_seq_rm`) and the context's token count set back, so every sample attends over
  the same `prompt_len` positions and appends one.
- E2E: prefill then `gen_len - 1` greedy decode steps, so `gen_len` tokens come out.

llama-cpp-python's high-level `Llama` runs one sequence; batch > 1 is refused rather than timed
as something it is not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from amoeba_export.errors import UserError
from amoeba_export.shared_types import Workload
from profilers.timing import resolve_threads

from ..base import Opened
from .writer import FILE, llama_cpp_module


def artifact_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {FILE} here; export one with `amoeba-export --flow gguf --out DIR`")
    return file


def read_meta(file: Path) -> dict:
    """Vocabulary size, training context and arch from the file's metadata (no weights read)."""
    from gguf import GGUFReader

    fields = GGUFReader(file).fields
    arch = fields["general.architecture"].contents()
    return {"arch": arch, "vocab_size": int(fields[f"{arch}.vocab_size"].contents()),
            "context_length": int(fields[f"{arch}.context_length"].contents()),
            "file_type": int(fields["general.file_type"].contents())}


def load_artifact(file: Path, n_ctx: int, threads: int):
    """The file in llama.cpp, one sequence of up to `n_ctx` tokens, last-token logits only."""
    llama_cpp = llama_cpp_module()
    return llama_cpp.Llama(str(file), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=False, verbose=False)


# ---------------------------------------------------------------- the steps that are timed

def next_token(llm) -> int:
    """Greedy choice from the last evaluated position's logits."""
    llama_cpp = llama_cpp_module()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).argmax())


def rewind(llm, length: int) -> None:
    """Drop the KV cells at positions >= `length` and set the context back to `length` tokens."""
    llama_cpp = llama_cpp_module()
    if llm.n_tokens < length:
        raise ValueError(f"context holds {llm.n_tokens} tokens, cannot rewind to {length}")
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, length, -1)
    llm.n_tokens = length


def prefill(llm, ids: list[int]) -> int:
    """Evaluate the prompt after the cached tokens (none after `rewind(llm, 0)`); the first token."""
    llm.eval(ids)
    return next_token(llm)


def decode_step(llm, token: int) -> int:
    llm.eval([token])
    return next_token(llm)


class Steps:
    """llama.cpp's context between steps (one sequence)."""

    def __init__(self, llm):
        self.llm = llm

    def prefill(self, ids: list[int]) -> int:
        return prefill(self.llm, ids)

    def decode(self, token: int) -> int:
        return decode_step(self.llm, token)

    def rewind(self, length: int) -> None:
        rewind(self.llm, length)


def open(path: str | Path, workload: Workload, metrics: tuple[str, ...] | None = None, *, threads: int | None = None,
         seed: int = 0, device: str = "cpu") -> Opened:
    """The GGUF in llama.cpp with `threads` (default: physical cores) for both decode and batch work."""
    if device != "cpu":
        raise UserError(f"the gguf profiler times the CPU, not {device}")
    if workload.batch != 1:
        raise UserError(f"the gguf profiler times batch 1 (llama-cpp-python runs one sequence); got batch "
                        f"{workload.batch}: use --batch 1")
    n = resolve_threads(threads)
    file = artifact_file(path)
    meta = read_meta(file)
    metrics, longest = workload.timed(metrics, meta["context_length"], "context length")
    llm = load_artifact(file, longest, n)
    cp = llm.context_params
    runtime = {
        "flow": "gguf", "device": "cpu", "threads": n, "n_threads": cp.n_threads,
        "n_threads_batch": cp.n_threads_batch, "n_ctx": llm.n_ctx(), "n_batch": cp.n_batch,
        "n_ubatch": cp.n_ubatch, "type_k": int(cp.type_k), "type_v": int(cp.type_v),
        "flash_attn_type": int(cp.flash_attn_type), "arch": meta["arch"], "file_type": meta["file_type"],
        "seed": seed,
    }
    return Opened(Steps(llm), workload.prompt_ids(meta["vocab_size"], seed)[0].tolist(), runtime, n, metrics)
