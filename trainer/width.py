"""Stage-1 width: FLAP importance, selection and bias compensation (docs/amoeba-algorithm.md §3), generalised to GQA.

Statistics: for every input channel j of o_proj and down_proj, the mean μ_j and variance F_j over
all calibration tokens of the unpruned model (exact per-token variance; upstream's running
estimate is an approximation of the same quantity).

Scores: MLP channel `F_j·‖W_down[:, j]‖²`; attention channel `(F_j·‖W_o[:, j]‖²)²`; z-scored within
each layer and module; a head's score is the mean over its head_dim channels.

Policies:
- `flap`: one global ranking of every attention unit and MLP channel, each weighted by the decoder
  parameters it carries; keep the best units until the kept weight is closest to `ratio × total`.
  A unit is a query head (its KV head goes when its whole group goes; the KV parameters are shared
  out across the group's heads in the weight) or a whole KV group (`head_unit="group"`).
  Per-layer sizes differ, as in the paper.
- `uniform`: the same counts in every layer (for flows without per-layer sizes): per KV group
  `max(1, round(ratio·G))` query heads (all groups kept; MHA: `round(ratio·heads)` heads), and
  `round(ratio·n_ff / align)·align` channels, each chosen by the same scores.

Width 1 keeps everything (no unit is dropped, unlike upstream's strict `>` threshold).
Compensation: `b_o = W_o[:, pruned] μ_o[pruned]`, `b_down = W_down[:, pruned] μ_down[pruned]`.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from amoeba_export.distributed import Group
from amoeba_export.flap import compensate, scores, select_uniform
from amoeba_export.strategy import LayerWidth, full_width


@torch.inference_mode()
def collect_stats(stack, windows: torch.Tensor, batch_size: int = 4, layers: int | None = None,
                  group: Group = Group()) -> dict[str, np.ndarray]:
    """Mean and variance of the inputs of o_proj and down_proj over every token of `windows`, run
    through the base model's LayerStack layer by layer (every batch through a layer, then the next).

    Sums are taken per batch in float64 and added in batch order, so a `group` of processes, each
    running its share of the batches, gets the one-process numbers bit for bit. `layers` limits
    collection (and the forward) to the first layers, for audits of a slice.
    """
    n = stack.n_layers if layers is None else layers
    starts = list(range(0, len(windows), batch_size))
    mine = group.mine(starts)
    sums: dict = {}  # (kind, layer, batch start) -> (tokens, sum, sum of squares), on the CPU

    def hook(key):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = (x.shape[0], x.sum(0).cpu(), (x * x).sum(0).cpu())
        return fn

    states = [stack.embed(windows[b:b + batch_size]) for b in mine]
    for i in tqdm(range(n), desc="FLAP statistics", unit="layer", disable=not group.main):
        with stack.layer(i) as block:
            for j, b in enumerate(mine):
                hooks = [block.self_attn.o_proj.register_forward_pre_hook(hook(("o", i, b))),
                         block.mlp.down_proj.register_forward_pre_hook(hook(("down", i, b)))]
                try:
                    states[j] = stack.step(block, states[j])
                finally:
                    for h in hooks:
                        h.remove()
    for part in group.gather(sums):  # every process's batches (one process: its own)
        sums.update(part)
    out = {}
    for kind in ("o", "down"):
        means, vars_ = [], []
        for i in range(n):
            cnt, s, ss = 0, 0.0, 0.0
            for b in starts:
                c, x, xx = sums[(kind, i, b)]
                cnt, s, ss = cnt + c, s + x, ss + xx
            mean = s / cnt
            means.append(mean.numpy().astype(np.float32))
            vars_.append(((ss / cnt) - mean * mean).clamp_min(0).numpy().astype(np.float32))
        out[f"{kind}_mean"], out[f"{kind}_var"] = np.stack(means), np.stack(vars_)
    return out


def flap_widths(stats, weights, info, ratio: float, head_unit: str = "query") -> list[LayerWidth]:
    """Global (adaptive across layers and modules) FLAP selection at `ratio` of decoder parameters."""
    if ratio >= 1.0:
        return full_width(info)
    L, NH, NKV, D, H = (info[k] for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size"))
    G = NH // NKV
    head_s, chan_s = scores(stats, weights, info)
    # Weights in units of one MLP channel (3·H parameters: a row of gate and up, a column of down).
    per_query = (2 * D * H + 2 * D * H / G) / (3 * H)
    units = []  # (score, weight, kind, layer, index)
    for i in range(L):
        if head_unit == "group":
            for g in range(NKV):
                units.append((head_s[i, g * G:(g + 1) * G].mean(), G * per_query, "group", i, g))
        else:
            units += [(head_s[i, h], per_query, "head", i, h) for h in range(NH)]
        units += [(chan_s[i, c], 1.0, "chan", i, c) for c in range(info["n_ff"])]
    order = sorted(range(len(units)), key=lambda u: -units[u][0])
    cum = np.cumsum([units[u][1] for u in order])
    k = int(np.argmin(np.abs(cum - ratio * cum[-1]))) + 1
    q_keep = np.zeros((L, NH), bool)
    c_keep = np.zeros((L, info["n_ff"]), bool)
    for u in order[:k]:
        _, _, kind, i, j = units[u]
        if kind == "group":
            q_keep[i, j * G:(j + 1) * G] = True
        elif kind == "head":
            q_keep[i, j] = True
        else:
            c_keep[i, j] = True
    return [compensate(weights, info, stats, q_keep[i], c_keep[i], i) for i in range(L)]


def uniform_widths(stats, weights, info, ratio: float, align: int = 32) -> list[LayerWidth]:
    """The same head and channel counts in every layer, chosen per layer by the FLAP scores."""
    if ratio >= 1.0:
        return full_width(info)
    NH, NKV, n_ff = info["n_heads"], info["n_kv_heads"], info["n_ff"]
    G = NH // NKV
    heads = max(1, round(ratio * (NH if G == 1 else G)))
    c = int(min(n_ff, max(align, round(ratio * n_ff / align) * align)))
    return [select_uniform(stats, weights, info, i, heads, c) for i in range(info["n_layers"])]
