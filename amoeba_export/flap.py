"""FLAP importance and bias compensation (docs/amoeba-algorithm.md §3), shared by calibration and legalize.

Scores: MLP channel `F_j·‖W_down[:, j]‖²`; attention channel `(F_j·‖W_o[:, j]‖²)²`; z-scored within
each layer and module; a head's score is the mean over its head_dim channels (F_j, μ_j: variance and
mean of input channel j of o_proj / down_proj over the calibration tokens, kept in the strategy's
`stats`). Compensation: `b_o = W_o[:, pruned] μ_o[pruned]`, `b_down = W_down[:, pruned] μ_down[pruned]`.
"""
from __future__ import annotations

import numpy as np

from .strategy import LayerWidth


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def layer_scores(stats: dict, weights, info: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer i's standardised head scores [n_heads] and channel scores [n_ff]."""
    wo = weights.get(f"model.layers.{i}.self_attn.o_proj.weight").double().numpy()
    wd = weights.get(f"model.layers.{i}.mlp.down_proj.weight").double().numpy()
    attn = (stats["o_var"][i] * (wo ** 2).sum(0)) ** 2
    mlp = stats["down_var"][i] * (wd ** 2).sum(0)
    return _zscore(attn).reshape(-1, info["head_dim"]).mean(1), _zscore(mlp)


def scores(stats: dict, weights, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's head scores [L, n_heads] and channel scores [L, n_ff]."""
    per_layer = [layer_scores(stats, weights, info, i) for i in range(info["n_layers"])]
    return np.stack([h for h, _ in per_layer]), np.stack([c for _, c in per_layer])


def compensate(weights, info: dict, stats: dict, q_keep: np.ndarray, c_keep: np.ndarray, i: int) -> LayerWidth:
    """Layer i's LayerWidth with the compensation biases of what it prunes."""
    D = info["head_dim"]
    wo = weights.get(f"model.layers.{i}.self_attn.o_proj.weight").double().numpy()
    wd = weights.get(f"model.layers.{i}.mlp.down_proj.weight").double().numpy()
    o_pruned = ~np.repeat(q_keep, D)
    b_o = wo[:, o_pruned] @ stats["o_mean"][i][o_pruned].astype(np.float64)
    b_d = wd[:, ~c_keep] @ stats["down_mean"][i][~c_keep].astype(np.float64)
    return LayerWidth(q_keep, c_keep, b_o.astype(np.float32), b_d.astype(np.float32))


def select_uniform(stats: dict, weights, info: dict, i: int, heads_per_group: int, channels: int) -> LayerWidth:
    """Layer i keeping the best `heads_per_group` query heads of every KV group (MHA: the best heads
    overall) and the best `channels` MLP channels, with compensation biases."""
    NH, NKV, n_ff = info["n_heads"], info["n_kv_heads"], info["n_ff"]
    G = NH // NKV
    head_s, chan_s = layer_scores(stats, weights, info, i)
    q = np.zeros(NH, bool)
    if G == 1:
        q[np.argsort(-head_s, kind="stable")[:heads_per_group]] = True
    else:
        for g in range(NKV):
            q[g * G + np.argsort(-head_s[g * G:(g + 1) * G], kind="stable")[:heads_per_group]] = True
    ch = np.zeros(n_ff, bool)
    ch[np.argsort(-chan_s, kind="stable")[:channels]] = True
    return compensate(weights, info, stats, q, ch, i)
