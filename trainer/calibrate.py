"""`amoeba-export calibrate`: stage-1 calibration of a base model into a Strategy.

Depth by the DP (trainer/depth.py), width by FLAP or the uniform policy (trainer/width.py). Long
phases checkpoint beside the output (`.<name>.calibration/`): the DP after every row, FLAP
statistics once collected; a rerun with the same settings resumes, different settings start over.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.numpy import load_file, save

from amoeba_export import distributed
from amoeba_export.compute import Compute
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.errors import notice as default_notice
from amoeba_export.io import (
    atomic_dir,
    check_destination,
    output_lock,
    safetensors_header,
    write_atomic,
    write_text_atomic,
)
from amoeba_export.metrics import mc_accuracy
from amoeba_export.strategy import Strategy, calibrated_dir, is_strategy_dir

from .data import load_texts, mc_items, pack_tokens
from .depth import LayerRunner, dp_select, kept_layers, ppl_evaluator
from .width import collect_stats, flap_widths, uniform_widths


@dataclass(frozen=True)
class CalibrationConfig:
    min_depth: int | None = None
    keep_last: int = 1
    widths: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)
    policy: str = "flap"
    head_unit: str = "query"
    align: int = 32
    depth_metric: str = "ppl"
    calib: str = "lambada"
    depth_samples: int = 8
    width_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    mc_task: str = "arc_easy"
    mc_limit: int = 200

    def resolved_min_depth(self, n_layers: int) -> int:
        d = self.min_depth if self.min_depth is not None else math.ceil(0.625 * n_layers)
        if not self.keep_last <= d <= n_layers:
            raise UserError(
                f"--min-depth {d} must be between --keep-last ({self.keep_last}) and the model's {n_layers} layers"
            )
        return d


def depth_windows(elastic: ElasticModel, cfg: CalibrationConfig) -> torch.Tensor:
    return pack_tokens(load_texts(cfg.calib), elastic.tokenizer(), cfg.seq_len, cfg.depth_samples, cfg.seed)


def width_windows(elastic: ElasticModel, cfg: CalibrationConfig) -> torch.Tensor:
    return pack_tokens(load_texts(cfg.calib), elastic.tokenizer(), cfg.seq_len, cfg.width_samples, cfg.seed + 1)


def depth_evaluator(elastic: ElasticModel, cfg: CalibrationConfig):
    if cfg.depth_metric == "ppl":
        return ppl_evaluator(LayerRunner(elastic.stack(), depth_windows(elastic, cfg))), False
    items, tok = mc_items(cfg.mc_task, cfg.mc_limit, cfg.seed), elastic.tokenizer()

    def evaluate(first_removed, kept):
        return mc_accuracy(elastic.logits_fn(layers=kept), tok, items)["acc"]

    return evaluate, True


def run_calibration(model, cfg: CalibrationConfig, out: str | Path | None = None, force: bool = False,
                    notice=default_notice, compute: Compute | None = None) -> tuple[Strategy, Path]:
    t0 = time.time()
    elastic = ElasticModel(model, compute=compute)
    info = elastic.info
    L = info["n_layers"]
    min_depth = cfg.resolved_min_depth(L)
    if any(not 0 < w <= 1 for w in cfg.widths):
        raise UserError("widths must be in (0, 1]")
    out = Path(out) if out is not None else calibrated_dir(info)
    check_destination(out, ours=is_strategy_dir, force=force, protect=(elastic.dir,))
    work = out.parent / f".{out.name}.calibration"
    group = distributed.group(elastic.compute.device)
    if not group.main:  # rank 0 holds the lock and writes; the others compute their shares
        return _calibrate(elastic, cfg, min_depth, work, notice, t0, group), out
    with output_lock(out):
        strategy = _calibrate(elastic, cfg, min_depth, work, notice, t0, group)
        with atomic_dir(out, ours=is_strategy_dir, force=force, protect=(elastic.dir,), notice=notice) as tmp:
            strategy.save(tmp)
        shutil.rmtree(work, ignore_errors=True)
    return strategy, out


def _calibrate(elastic: ElasticModel, cfg: CalibrationConfig, min_depth: int, work: Path, notice, t0: float,
               group: distributed.Group) -> Strategy:
    """The DP and FLAP, checkpointed in `work` (by rank 0): a rerun with the same settings resumes,
    other settings start over, and an unreadable checkpoint is reported and redone."""
    info = elastic.info
    L = info["n_layers"]
    settings = {**asdict(cfg), "min_depth": min_depth, "fingerprint": info["fingerprint"]}
    if group.main:
        if work.is_dir():
            try:
                same = json.loads((work / "settings.json").read_text()) == json.loads(json.dumps(settings))
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        write_text_atomic(work / "settings.json", json.dumps(settings))
    group.barrier()  # every process resumes from the same checkpoints
    torch.manual_seed(cfg.seed)

    evaluate, higher = depth_evaluator(elastic, cfg)
    tables = dp_select(L, min_depth, cfg.keep_last, evaluate, higher, checkpoint=work / "depth_dp.json", notice=notice,
                       group=group)
    depths = kept_layers(tables, L, cfg.keep_last)
    del evaluate

    stats_file = work / "flap_stats.safetensors"
    stats = None
    if stats_file.is_file():
        try:
            safetensors_header(stats_file)  # a cut-short file is found here, before load_file reads it
            stats = load_file(str(stats_file))
        except UserError as e:
            if group.main:
                notice(f"unreadable FLAP statistics checkpoint ({e}): collecting them again")
    if group.world > 1 and len(set(group.gather(stats is None))) > 1:
        stats = None  # one process could not read it: all collect again, together
    if stats is None:
        stats = collect_stats(elastic.stack(), width_windows(elastic, cfg), group=group)
        if group.main:
            write_atomic(stats_file, lambda f: f.write(save(stats)))
    widths = {}
    for w in cfg.widths:
        if cfg.policy == "flap":
            widths[w] = flap_widths(stats, elastic.weights, info, w, cfg.head_unit)
        else:
            widths[w] = uniform_widths(stats, elastic.weights, info, w, cfg.align)

    meta = {
        "source": "amoeba-export calibrate",
        "settings": settings,
        "depth_dp": tables.to_json(),
        "depth_metric": {str(L - m): v for m, v in enumerate(tables.metric[-1]) if m and v is not None},
        "kept_fraction": {str(w): _kept_fraction(widths[w], info) for w in cfg.widths},
        "seconds": round(time.time() - t0, 1),
    }
    strategy = Strategy(model=info, depths=depths, widths=widths, meta=meta, stats=stats)
    strategy.validate()
    return strategy


def _kept_fraction(per_layer, info) -> float:
    """Fraction of decoder linear parameters kept (attention by heads and KV heads, MLP by channels)."""
    D, H, NKV = info["head_dim"], info["hidden_size"], info["n_kv_heads"]
    full = info["n_layers"] * (2 * info["n_heads"] * D * H + 2 * NKV * D * H + 3 * H * info["n_ff"])
    kept = sum(
        2 * lw.q_heads.sum() * D * H + 2 * lw.kv_heads(NKV).sum() * D * H + 3 * H * lw.channels.sum()
        for lw in per_layer
    )
    return round(float(kept / full), 4)
