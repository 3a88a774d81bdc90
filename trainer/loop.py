"""`amoeba-export train`: one-for-all fine-tuning of a SMOL adapter (docs/amoeba-algorithm.md §5-§7) on HF accelerate.

One process runs it on a CPU or a GPU; `accelerate launch` runs the same command on several GPUs
(DDP: every process takes its own rows of each step, gradients are averaged). The base model is
frozen and never materialised per shape: every subnet runs the elastic model's masked forward with
the mixture applied (trainer/mixture.py).

Determinism and resume: the rows of every micro-batch, the sandwich of shapes and the router noise
are functions of (seed, step, micro-batch), never of a running RNG, so a run resumed from
`checkpoint-N` continues exactly as the uninterrupted run would have (tested).

Output directory:
- `checkpoint-N/`: `adapter/` (SMOL), `optimizer.pt` (tensors only, read with weights_only=True),
  `trainer_state.json` (step, configuration, elapsed time); the newest `keep` are kept;
- `adapter/`: the final adapter, what `--adapter OUT` merges at export;
- `train_log.jsonl`: one line per step (per-subnet losses and shapes, grad norm, seconds);
- `eval.json`: held-out perplexity of every shape before training (the stage-1 model: B starts at
  zero) and after.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amoeba_export.adapter import PROJECTIONS, checkpoints
from amoeba_export.compute import Compute
from amoeba_export.elastic import load_elastic
from amoeba_export.errors import UserError
from amoeba_export.errors import notice as default_notice
from amoeba_export.io import (
    atomic_dir,
    check_destination,
    output_lock,
    read_json,
    write_json,
    write_json_atomic,
    write_text_atomic,
)
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape
from amoeba_export.smol import SMOL

from . import distill, instruct
from .mixture import Mixture, Supernet


@dataclass
class TrainConfig:
    data: str = "instruct"
    heldout_fraction: float = 0.02
    eval_pairs: int = 32  # held-out pairs every shape is scored on (0: no evaluation)
    eval_before: bool = True  # score the stage-1 model too (identical for every run of one strategy and data)
    seq_len: int = 512
    batch: int = 2  # rows per micro-batch per process
    grad_accum: int = 4
    steps: int = 10000
    lr: float = 2e-4
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    random_subnets: int = 2
    balancing: bool = True
    adapter: str = "smol"  # "lora": one expert, top-1, the same update for every shape
    rank: int = 64
    alpha: float = 16.0
    experts: int = 5
    top_k: int = 2
    targets: tuple[str, ...] = PROJECTIONS
    router_hidden: int = 16
    schedule: str = "sandwich"  # or "mlfs"
    stages: int = 3
    seed: int = 42
    save_every: int = 100
    keep: int = 2
    max_minutes: float | None = None  # stop early (with a checkpoint) after this much training time

    # settings a resumed run may change; every other one must match the checkpoint's
    RESUMABLE = ("steps", "save_every", "keep", "max_minutes", "eval_pairs", "eval_before")

    def check(self) -> None:
        if self.adapter not in ("smol", "lora"):
            raise UserError(f"--adapter-kind must be smol or lora (got {self.adapter!r})")
        if self.schedule not in ("sandwich", "mlfs"):
            raise UserError(f"--schedule must be sandwich or mlfs (got {self.schedule!r})")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise UserError(
                f"--targets: unknown projection {bad[0] if bad else '(none given)'}; use {', '.join(PROJECTIONS)}"
            )
        for name in ("steps", "batch", "grad_accum", "rank", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.adapter == "smol" and not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top-k {self.top_k} must be between 1 and --experts {self.experts}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")

    @property
    def experts_top_k(self) -> tuple[int, int]:
        """(experts, top_k): a plain LoRA is one expert that is always selected."""
        return (1, 1) if self.adapter == "lora" else (self.experts, self.top_k)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class Checkpoint:
    """A checkpoint-N read back whole: the run continues from it."""

    path: Path
    state: dict  # step, elapsed, config
    smol: SMOL
    optimizer: dict


def _read_checkpoint(path: Path) -> Checkpoint:
    state = read_json(path / "trainer_state.json")
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("config"), dict)
        or not isinstance(state.get("step"), int)
    ):
        raise UserError(f"{path / 'trainer_state.json'} lacks the step or the configuration")
    smol = SMOL.load(path / "adapter")
    try:
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # torch reports a damaged zip as RuntimeError, a missing file as OSError
        raise UserError(f"unreadable optimizer state {path / 'optimizer.pt'} ({type(e).__name__})") from None
    return Checkpoint(path, state, smol, optimizer)


def _resume_from(out: Path, cfg: TrainConfig, resume: bool, protect=(), notice=default_notice) -> Checkpoint | None:
    """The newest readable checkpoint to continue from (a damaged one is reported and skipped),
    after checking its configuration matches; without `resume`, `out` must not hold anything."""
    found = checkpoints(out)
    if not resume:
        if found or (out / "adapter").exists():
            raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
        check_destination(out, ours=lambda _: False, force=False, protect=protect)
        return None
    check_destination(out, ours=lambda _: True, force=True, protect=protect)
    if not found:
        raise UserError(f"--resume: {out} has no checkpoint-N to continue from")
    ckpt = None
    for path in reversed(found):
        try:
            ckpt = _read_checkpoint(path)
            break
        except UserError as e:
            notice(f"skipping damaged checkpoint {path.name}: {e}")
    if ckpt is None:
        raise UserError(f"--resume: none of the {len(found)} checkpoints in {out} can be read; start a new --out")
    saved, now = ckpt.state["config"], cfg.to_json()
    differ = [k for k in now if k not in TrainConfig.RESUMABLE and saved.get(k) != now[k]]
    if cfg.schedule == "mlfs" and saved.get("steps") != cfg.steps:
        differ.append("steps")
    if differ:
        k = differ[0]
        raise UserError(f"--resume: {ckpt.path.name} was trained with {k}={saved.get(k)!r}, not {now[k]!r}; "
                        f"resume with the same settings or start a new --out")
    return ckpt


def _saved_report(path: Path, notice=default_notice) -> dict:
    """eval.json of the run being resumed; an unreadable one is reported, and its evaluations redone."""
    if not path.is_file():
        return {}
    try:
        report = read_json(path)
        if isinstance(report, dict):
            return report
    except UserError:
        pass
    notice(f"unreadable {path}: its evaluations are run again")
    return {}


def _logged_step(line: str) -> int | None:
    """The step of a train_log.jsonl line; None for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def _micro_rows(step: int, micro: int, cfg: TrainConfig, n_rows: int, rank: int, world: int) -> np.ndarray:
    """Row indices of one micro-batch: a seeded permutation per epoch, walked in order."""
    first = (
        (step * cfg.grad_accum + micro) * world + rank
    ) * cfg.batch  # = (step, micro * world + rank) of one process
    return np.array([_epoch_order(cfg.seed, i // n_rows, n_rows)[i % n_rows] for i in range(first, first + cfg.batch)])


def _device_rows(packed: instruct.Packed, index, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in packed.rows(index).items()}


@torch.no_grad()
def evaluate(net: Supernet, packed: instruct.Packed, shapes: list[Shape], accelerator, batch: int = 4,
             progress: bool = False) -> dict[Shape, float]:
    """Held-out perplexity (response tokens only) of every shape, deterministic gate."""
    from tqdm import tqdm

    rows = np.arange(len(packed))[accelerator.process_index::accelerator.num_processes]
    out = {}
    for shape in tqdm(shapes, desc="held-out ppl", disable=not progress, leave=False):
        nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for at in range(0, len(rows), batch):
            b = _device_rows(packed, rows[at:at + batch], accelerator.device)
            logits = net(b["input_ids"], b["position_ids"], shape)
            mask = b["labels"][:, 1:] != instruct.IGNORE
            nll[0] += torch.nn.functional.cross_entropy(
                logits[:, :-1][mask].float(), b["labels"][:, 1:][mask], reduction="sum"
            )
            nll[1] += mask.sum()
        nll = accelerator.reduce(nll, reduction="sum")
        out[shape] = math.exp(float(nll[0] / nll[1]))
    return out


def train(model, strategy_dir, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
          allow_other_weights: bool = False, compute: Compute | None = None) -> dict:
    """Run (or continue) a training run into `out`; returns the summary written to eval.json. The
    frozen base runs in `compute`'s dtype; each process's GPU is accelerate's (its local rank)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg.check()
    out = Path(out)
    compute = compute or Compute()
    if compute.device not in ("cpu", "cuda:0"):
        raise UserError(
            f"--device {compute.device}: train places each process on its own GPU (accelerate's local "
            f"rank); choose the GPU with CUDA_VISIBLE_DEVICES={compute.device.partition(':')[2]} and --device cuda"
        )
    elastic, sdir = load_elastic(model, strategy_dir, allow_other_weights=allow_other_weights, compute=compute)
    ckpt = _resume_from(out, cfg, resume, protect=(elastic.dir, sdir))
    accelerator = Accelerator(cpu=compute.device == "cpu",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    with output_lock(out) if main else contextlib.nullcontext():  # a second run into the same --out is refused
        return _train(elastic, sdir, cfg, out, ckpt, accelerator, progress)


def _train(elastic, sdir, cfg: TrainConfig, out: Path, ckpt: Checkpoint | None, accelerator, progress: bool) -> dict:
    from tqdm import tqdm

    main = accelerator.is_main_process
    strategy = elastic.strategy
    tokenizer = elastic.tokenizer()
    train_pairs, held = instruct.split(instruct.load_pairs(cfg.data), cfg.heldout_fraction)
    train_pack = instruct.pack(tokenizer, train_pairs, cfg.seq_len)
    eval_pack = instruct.pack(tokenizer, held[:cfg.eval_pairs], cfg.seq_len) if cfg.eval_pairs > 0 else None

    widths = sorted(strategy.widths, reverse=True)
    if ckpt is not None:
        smol = ckpt.smol
    else:
        n_experts, top_k = cfg.experts_top_k
        smol = SMOL.init(elastic.info, widths, r=cfg.rank, alpha=cfg.alpha, n_experts=n_experts, top_k=top_k,
                         targets=cfg.targets, router_hidden=cfg.router_hidden, seed=cfg.seed)
    mixture = Mixture(smol)
    net = Supernet(elastic, mixture)
    optimizer = torch.optim.AdamW(mixture.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    net, optimizer = accelerator.prepare(net, optimizer)
    inner: Supernet = accelerator.unwrap_model(net)

    shapes = list(strategy.space)
    # MLFS releases shapes by parameter count (from tensor sizes: nothing is read)
    params = {s: materialize(elastic, s).parameters() for s in shapes} if cfg.schedule == "mlfs" else {}
    state = ckpt.state if ckpt is not None else {"step": 0, "elapsed": 0.0}
    start, elapsed = int(state["step"]), float(state["elapsed"])
    report = _saved_report(out / "eval.json") if ckpt is not None else {}
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if main and ckpt is not None and log_path.is_file():  # drop steps logged after the checkpoint
        kept = [
            line for line in log_path.read_text().splitlines() if (n := _logged_step(line)) is not None and n < start
        ]
        write_text_atomic(log_path, "".join(line + "\n" for line in kept))

    def run_eval(label: str):
        if eval_pack is None:
            return
        ppl = evaluate(net, eval_pack, shapes, accelerator, progress=progress and main)
        report[label] = {str(s): v for s, v in ppl.items()}
        report["eval"] = {"pairs": min(cfg.eval_pairs, len(held)), "windows": len(eval_pack),
                          "target_tokens": eval_pack.target_tokens, "seq_len": cfg.seq_len}
        if main:
            write_json_atomic(out / "eval.json", report)

    if "before" not in report and cfg.eval_before:
        run_eval("before")

    def save(step: int):
        accelerator.wait_for_everyone()
        if main:
            with atomic_dir(out / f"checkpoint-{step}") as tmp:
                inner.mixture.to_smol({"trained": {"step": step, "config": cfg.to_json()}}).save(tmp / "adapter")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                write_json(tmp / "trainer_state.json", {"step": step, "elapsed": elapsed, "config": cfg.to_json()})
            for old in checkpoints(out)[:-cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (progress and main), dynamic_ncols=True)
    step = start
    stopped_early = False
    with (log_path.open("a") if main else contextlib.nullcontext()) as log:
        while step < cfg.steps:
            t0 = time.perf_counter()
            losses, drawn = _step(net, optimizer, accelerator, train_pack, shapes, params, cfg, step)
            grad_norm = accelerator.clip_grad_norm_(inner.mixture.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            elapsed += seconds
            step += 1
            if main:
                log.write(
                    json.dumps(
                        {
                            "step": step - 1,
                            "shapes": [[str(s) for s in m] for m in drawn],
                            "loss": losses,
                            "grad_norm": float(grad_norm),
                            "seconds": round(seconds, 3),
                        }
                    )
                    + "\n"
                )
                log.flush()
                teacher = np.mean([m[0] for m in losses])
                students = (
                    np.mean([x for m in losses for x in m[1:]]) if any(len(m) > 1 for m in losses) else float("nan")
                )
                bar.set_postfix(ce=f"{teacher:.3f}", kd=f"{students:.3f}", s_per_step=f"{seconds:.1f}")
                bar.update(1)
            out_of_time = cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                save(step)
            if out_of_time:
                stopped_early = step < cfg.steps
                break
    bar.close()

    run_eval("after")
    if main:
        final = inner.mixture.to_smol({"trained": {"step": step, "config": cfg.to_json()}})
        with atomic_dir(out / "adapter") as tmp:
            final.save(tmp)
        report.update({"steps": step, "stopped_early": stopped_early, "train_seconds": round(elapsed, 1),
                       "seconds_per_step": round(elapsed / max(step, 1), 2), "config": cfg.to_json(),
                       "strategy": str(sdir), "processes": accelerator.num_processes,
                       "train_windows": len(train_pack), "train_pairs": len(train_pairs), "heldout_pairs": len(held)})
        write_json_atomic(out / "eval.json", report)
    accelerator.wait_for_everyone()
    return report if main else {}  # only the main process reports


def _step(net, optimizer, accelerator, packed, shapes, params, cfg: TrainConfig, step: int):
    """One optimizer step's gradients: grad_accum micro-batches, each a sandwich of shapes."""
    pool = shapes if cfg.schedule == "sandwich" else distill.mlfs_pool(shapes, params, step, cfg.steps, cfg.stages)
    losses, drawn = [], []
    for micro in range(cfg.grad_accum):
        rows = _device_rows(packed, _micro_rows(step, micro, cfg, len(packed), accelerator.process_index,
                                                accelerator.num_processes), accelerator.device)
        # seeded by the micro-batch's index in the whole step, so N processes draw what one process
        # accumulating N micro-batches draws (the two runs are the same computation; tested)
        index = micro * accelerator.num_processes + accelerator.process_index
        sandwich = distill.sandwich(pool, cfg.random_subnets, np.random.default_rng([cfg.seed, step, index, 1]))
        noise = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, index, 2]).integers(2**62)))
        drawn.append(sandwich)
        raw, teacher, reference = [], None, None
        for i, shape in enumerate(sandwich):
            last = micro == cfg.grad_accum - 1 and i == len(sandwich) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(net):
                logits = net(rows["input_ids"], rows["position_ids"], shape, noise)
                if i == 0:
                    loss = distill.response_ce(logits, rows["labels"])
                    teacher, reference = distill.teacher_probs(logits, rows["labels"]), loss.detach()
                else:
                    loss = distill.soft_ce_to(logits, teacher, rows["labels"])
                raw.append(float(loss.detach()))
                if i and cfg.balancing:
                    loss = distill.balanced(loss, reference)
                accelerator.backward(loss / cfg.grad_accum)
        losses.append(raw)
    return losses, drawn
