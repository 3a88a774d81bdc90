"""The ExecuTorch writer: `model.pte`, one program lowered to XNNPACK with its KV cache inside.

The module is the transformers model of the dense model (`pytorch.in_memory`: stock
`LlamaForCausalLM`, or `amoeba_llama` for per-layer sizes) run by `module.CachedLM` over a static
cache that ExecuTorch's `llama::update_cache` / `llama::custom_sdpa` operators write and read: mutable
buffers of the program, one pair per layer, each with that layer's own KV-head count. The program's
one method, `forward`, is

    forward(input_ids int64 [batch, T], cache_position int64 [T]) -> logits float [batch, T, vocab]

with T dynamic (1 .. max_cache_len): a prefill writes T positions into the cache from
`cache_position[0]` on, a decode step writes one. See docs/flow-executorch.md for the I/O, the cache
and the traps (strict export, the custom operators' library).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from ...errors import UserError
from ...io import write_json
from ...manifest import package_versions
from ...shared_types import DenseModel, FlowCaps, Workload
from ..base import Emitted
from ..pytorch import writer as pytorch
from .module import CachedLM

NAME = "executorch"
# float16 lowers and runs too, but is not offered yet (docs/flow-executorch.md §6)
CAPS = FlowCaps(per_layer=True, o_down_bias=True, quants=("float32",))
MODEL_FILE = "model.pte"
CONFIG_FILE = "executorch_config.json"
METHOD = "forward"
EXAMPLE_T = 4  # the traced prefill length; T is dynamic in the program


def cache_length(dense: DenseModel, workload: Workload | None) -> int:
    """Positions the static cache holds: the workload's prompt plus what it generates (the pipeline's
    default workload when none is given), capped by the model's max_position_embeddings."""
    workload = workload or Workload()
    want = workload.prompt_len + workload.gen_len
    limit = dense.config.get("max_position_embeddings") or want
    return int(min(want, limit))


def check_quant(dense: DenseModel, quant: str | None) -> None:
    dtype = str(dense.dtype).removeprefix("torch.")
    if quant not in (None, dtype) or dtype not in CAPS.quants:
        raise UserError(f"the executorch flow writes {', '.join(CAPS.quants)} weights, not {quant or dtype}: "
                        "pass --dtype float32")


def exportable(dense: DenseModel, batch: int, cache_len: int) -> CachedLM:
    """The dense model's transformers module with one cache buffer pair per layer, each shaped
    [batch, cache_len, n_kv_heads_of_that_layer, head_dim] (module.CachedLM)."""
    module = CachedLM(pytorch.in_memory(dense), batch, cache_len)
    got = [tuple(module.cache(i)[0].shape) for i in range(len(dense.layers))]
    want = [(batch, cache_len, s.n_kv_heads, s.head_dim) for s in dense.layers]
    if got != want:
        raise RuntimeError(f"static cache shapes {got} differ from the model's {want}")
    return module


@contextlib.contextmanager
def _quiet():
    """torch.export and the lowering warn about their own internals on every model."""
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "executorch", "torchao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def lower(dense: DenseModel, batch: int, cache_len: int) -> bytes:
    """The serialised program: strict torch.export with a dynamic prefill length, then the XNNPACK
    partitioner; the custom cache and attention operators stay portable kernels between the
    delegated linears (docs/flow-executorch.md §2)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    module = exportable(dense, batch, cache_len)
    ids = torch.zeros(batch, EXAMPLE_T, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=cache_len)
    with _quiet(), torch.no_grad():
        program = torch.export.export(module, (ids, torch.arange(EXAMPLE_T)),
                                      dynamic_shapes=({1: seq}, {0: seq}), strict=True)
        del module
        # the llama:: operators are not core ATen: the edge dialect must not insist on it
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                              compile_config=EdgeCompileConfig(_check_ir_validity=False))
        lowered = lowered.to_executorch()
    return lowered.buffer


def executorch_config(dense: DenseModel, batch: int, cache_len: int) -> dict:
    """What a runner needs besides the program: the method and its I/O, the cache, per-layer shapes."""
    return {
        "format": "amoeba-export executorch",
        "schema": 1,
        "program": MODEL_FILE,
        "backend": "XnnpackBackend",
        "methods": [METHOD],
        "inputs": ["input_ids int64 [batch, T]", "cache_position int64 [T]"],
        "outputs": ["logits [batch, T, vocab]"],
        "batch_size": batch,
        "max_cache_len": cache_len,
        "dtype": str(dense.dtype).removeprefix("torch."),
        **dense.sizes(),
    }


def emit(dense: DenseModel, out_dir: Path, tokenizer_dir: Path, quant: str | None = None,
         workload: Workload | None = None) -> Emitted:
    """Write model.pte, executorch_config.json and the tokenizer files. The program runs
    `workload.batch` sequences (default 1) over a cache of `cache_length` positions."""
    out_dir = Path(out_dir)
    check_quant(dense, quant)
    batch = (workload or Workload()).batch
    cache_len = cache_length(dense, workload)
    (out_dir / MODEL_FILE).write_bytes(lower(dense, batch, cache_len))
    files = [MODEL_FILE, *pytorch.copy_tokenizer(tokenizer_dir, out_dir)]
    write_json(out_dir / CONFIG_FILE, executorch_config(dense, batch, cache_len))
    record = {"batch_size": batch, "max_cache_len": cache_len,
              "toolchain": {"torch": torch.__version__, **package_versions(("executorch", "transformers"))}}
    return Emitted(files=files + [CONFIG_FILE], record=record)
