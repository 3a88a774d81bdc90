"""The one-shot compile: ElasticModel × Shape → materialize → emit → verify → manifest.

Everything is written into a temporary directory beside `out` and renamed into place at the end, the
manifest last; an interrupted run leaves no artifact that looks complete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .elastic import ElasticModel
from .errors import UserError
from .exporters import get_exporter
from .io import atomic_dir
from .manifest import hash_inputs, write_manifest
from .materialize import DenseModel, materialize
from .shapes import Shape

VERIFY_TEXT = "The capital of France is Paris. Deployment engineers compile one elastic model for many devices."
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


@dataclass
class Result:
    out: Path
    shape: Shape
    dense: DenseModel
    manifest: dict


def verify(elastic: ElasticModel, shape: Shape, logits_fn) -> dict:
    """Compare the artifact's logits with the masked reference forward on a fixed prompt."""
    tok = elastic.tokenizer()
    ids = torch.tensor([tok(VERIFY_TEXT, add_special_tokens=False)["input_ids"]])
    ref = elastic.logits(ids, shape).float()
    got = logits_fn(ids).float()
    return {
        "prompt_tokens": int(ids.shape[1]),
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "greedy_token_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
    }


def compile_shape(elastic: ElasticModel, shape: Shape, flow: str, target: dict, out: Path,
                  dtype: str | None = None, check: bool = True, strategy_dir: Path | None = None,
                  adapter_dir: Path | None = None) -> Result:
    exporter = get_exporter(flow)
    if flow not in target.get("flows", []):
        raise UserError(f"flow {flow!r} is not available on target {target['name']!r} (it has: {', '.join(target.get('flows', []))})")
    shape = elastic.strategy.resolve(shape)
    dense = materialize(elastic, shape, dtype)
    with atomic_dir(out) as tmp:
        exporter.emit(dense, tmp, elastic.dir)
        parity = None
        if check:
            parity = verify(elastic, shape, exporter.load(tmp))
            parity["tolerance"] = TOLERANCE[dense.dtype]
            if dense.dtype == torch.float32 and parity["max_abs_logit_diff"] > parity["tolerance"]:
                raise RuntimeError(f"parity check failed: {parity}")
        body = {
            "flow": flow,
            "target": target,
            "shape": str(shape),
            "dtype": str(dense.dtype).removeprefix("torch."),
            "model": elastic.info,
            "inputs": hash_inputs({"model": elastic.dir, "strategy": strategy_dir, "adapter": adapter_dir}),
            "layers": [vars(s) for s in dense.layers],
            "parameters": dense.parameters(),
            "materialize": dense.record,
            "uniform": dense.uniform,
            "parity": parity,
        }
        manifest = write_manifest(tmp, body)
    return Result(Path(out), shape, dense, manifest)
