"""Legalize: DenseModel × FlowCaps → DenseModel' + LegalizeReport.

A flow's runtime cannot express every shape: llama.cpp's `llama` arch, MLC and TensorRT-LLM want
one size for every layer, MLC has no o_proj/down_proj bias, some kernels take only certain head
sizes, quantisers want in-feature sizes in multiples of their block. Each exporter declares what its
runtime accepts in `CAPS`; this pass turns a shape into one the flow can load, and says what it did.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .errors import UserError
from .flap import select_uniform
from .shared_types import DenseModel, FlowCaps

LAYOUTS = ("auto", "native", "pad", "uniform")


@dataclass
class LegalizeReport:
    """What legalize changed and what it cost; goes into the manifest and the command's summary."""

    flow: str
    layout: str  # the layout used: native, pad or uniform
    quant: str | None
    changes: list[str]
    parameters_before: int
    parameters_after: int
    padded: dict  # zero query heads / KV heads / channels added here
    dropped_bias: dict | None = None  # {"perplexity_before", "perplexity_after", "delta"} when biases went
    reselected: dict | None = None  # the same, plus the new sizes, when --layout uniform re-selected

    @property
    def perplexity_before(self) -> float | None:
        """Held-out perplexity of the shape as calibrated, where legalize changed what it computes."""
        m = self.reselected or self.dropped_bias
        return m["perplexity_before"] if m else None

    @property
    def perplexity_after(self) -> float | None:
        """Held-out perplexity of what the flow runs, after every inexact change (None: exact, or not measured)."""
        m = self.dropped_bias or self.reselected
        return m["perplexity_after"] if m else None

    @property
    def inexact(self) -> str | None:
        """What legalize did that is not exact, in words (None: everything was exact)."""
        parts = [w for w, m in (("re-selecting one size per layer", self.reselected),
                                ("dropping the o_proj/down_proj compensation biases", self.dropped_bias)) if m]
        return " and ".join(parts) or None

    @property
    def padded_parameters(self) -> int:
        return self.parameters_after - self.parameters_before

    def to_json(self) -> dict:
        return {"flow": self.flow, "layout": self.layout, "quant": self.quant, "changes": self.changes,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "padded_parameters": self.padded_parameters, "padded": self.padded, "dropped_bias": self.dropped_bias,
                "reselected": self.reselected}


def legalize(dense: DenseModel, caps: FlowCaps, *, flow: str, layout: str = "auto", quant: str | None = None,
             strict: bool = False, perplexity: Callable[[DenseModel], float] | None = None
             ) -> tuple[DenseModel, LegalizeReport]:
    """Return a DenseModel the flow can load, and the report of what changed.

    - `native`: the shape as calibrated (per-layer sizes need `caps.per_layer`), n_ff rounded up per
      layer to the quantiser's block with zero channels;
    - `pad`: exact zero-padding to one size for every layer (docs/flow-internals.md §2): the most query heads
      per KV group, KV heads and channels of any layer (channels rounded to the block);
    - `uniform`: re-selection to one size per layer by FLAP importance (`uniform_shape`); not exact,
      the perplexity change is measured;
    - `auto`: the best exact option the flow allows: native where it takes per-layer sizes, else pad.
    o_proj/down_proj biases the flow cannot express are dropped only with the measured perplexity
    change reported (`perplexity`), or refused with `strict`. head_dim cannot be padded exactly
    (RoPE frequencies and the softmax scale depend on it), so a head_dim outside the flow's kernel
    set is an error.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if quant is not None and quant not in caps.quants:
        raise UserError(f"flow {flow!r} cannot write {quant!r}: choose one of {', '.join(caps.quants)}")
    D = dense.layers[0].head_dim
    if caps.head_dims is not None and D not in caps.head_dims:
        raise UserError(f"head_dim {D} is not in flow {flow!r}'s kernel set {list(caps.head_dims)}; head_dim cannot "
                        "be padded exactly (RoPE), so this model cannot be exported to this flow")
    # a flow without per-layer sizes runs a stock class, which wants the head count to divide hidden
    stock = dense.uniform and (not caps.heads_divide_hidden or dense.hidden_size % dense.layers[0].n_heads == 0)
    if layout == "auto":
        layout = "native" if caps.per_layer or stock else "pad"
        if (
            not caps.o_down_bias
            and _carries_bias(dense)
            and not dense.uniform
            and perplexity is not None
            and _can_reselect(dense)
        ):
            return _best_inexact(
                dense, caps, flow=flow, quant=quant, strict=strict, perplexity=perplexity, exact=layout
            )
    if layout == "native" and not (caps.per_layer or stock):
        why = ("has per-layer sizes" if not dense.uniform else
               f"has {dense.layers[0].n_heads} heads, which do not divide hidden size {dense.hidden_size}")
        raise UserError(
            f"flow {flow!r} needs the same sizes in every layer (a stock model class) and shape "
            f"{dense.record.get('shape')} {why}: use --layout pad (exact) or --layout uniform (re-selected)"
        )
    before = dense.parameters()
    changes: list[str] = []
    reselected = None
    if layout == "uniform" and not dense.uniform:
        original, dense = dense, uniform_shape(dense, caps.alignment(quant))
        reselected = _measured(perplexity, original, dense) | dense.record["reselected"]
        changes.append("re-selected heads and channels to the same counts in every layer (FLAP importance)"
                       + _ppl_note(reselected))
    align = caps.alignment(quant)
    if layout != "pad":  # native, or re-selected uniform: channels rounded to the block
        n_ff = [_round_up(s.n_ff, align) for s in dense.layers]
        sizes = [(len(p.kv_heads), len(p.q_heads) // len(p.kv_heads), f) for p, f in zip(dense.source.plans, n_ff)]
    else:
        n_kv = max(len(p.kv_heads) for p in dense.source.plans)
        group = max(len(p.q_heads) // len(p.kv_heads) for p in dense.source.plans)
        if caps.heads_divide_hidden:
            n_kv, group = _divisible_heads(n_kv, group, dense.hidden_size)
        n_ff = _round_up(max(len(p.channels) for p in dense.source.plans), align)
        sizes = [(n_kv, group, n_ff)] * len(dense.layers)
    dense, padded = _pad(dense, sizes)
    if padded["zero_query_heads"] or padded["zero_kv_heads"]:
        changes.append(f"padded attention with {padded['zero_query_heads']} zero query heads and "
                       f"{padded['zero_kv_heads']} zero KV heads (exact)")
    if padded["zero_channels"]:
        changes.append(f"padded MLPs with {padded['zero_channels']} zero channels (exact)"
                       + (f"; n_ff rounded to multiples of {align} for {quant}" if align > 1 else ""))
    dropped = None
    if not caps.o_down_bias and any(s.attn_bias or s.mlp_bias for s in dense.layers):
        dense, dropped = _drop_biases(dense, flow, strict, perplexity)
        changes.append("dropped o_proj/down_proj biases" + _ppl_note(dropped))
    report = LegalizeReport(flow, layout, quant, changes or ["none: the flow takes the shape as it is"], before,
                            dense.parameters(), padded, dropped, reselected)
    dense.record = {**dense.record, "legalize": report.to_json()}
    return dense, report


def _carries_bias(dense: DenseModel) -> bool:
    return any(s.attn_bias or s.mlp_bias for s in dense.layers)


def _can_reselect(dense: DenseModel) -> bool:
    return {"o_var", "o_mean", "down_var", "down_mean"} <= set(dense.source.elastic.strategy.stats)


def _best_inexact(dense: DenseModel, caps: FlowCaps, *, flow: str, quant, strict: bool, perplexity, exact: str):
    """A flow that cannot carry the compensation biases has no exact option for a shape that has
    them: keep the sizes and drop the biases, or re-select one size per layer (whose fresh biases
    go too), measure both, and keep the one with the lower held-out perplexity."""
    options = [legalize(dense, caps, flow=flow, layout=layout, quant=quant, strict=strict, perplexity=perplexity)
               for layout in (exact, "uniform")]
    after = [r.perplexity_after for _, r in options]
    best = int(np.argmin(after))
    out, report = options[best]
    report.changes.append(f"--layout auto: {flow} cannot carry the compensation biases, so no exact layout exists; "
                          f"{report.layout} measured better than {options[1 - best][1].layout} "
                          f"(held-out perplexity {after[best]:.3f} against {after[1 - best]:.3f})")
    out.record = {**out.record, "legalize": report.to_json()}
    return out, report


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _divisible_heads(n_kv: int, group: int, hidden: int) -> tuple[int, int]:
    """The fewest heads n_kv' x group' (each at least the given) with hidden % heads == 0."""
    best = None
    for g in range(group, hidden + 1):
        for k in range(n_kv, hidden // g + 1):
            if hidden % (k * g) == 0 and (best is None or k * g < best[0] * best[1]):
                best = (k, g)
                break
    return best or (n_kv, group)


def _pad(dense: DenseModel, sizes: list[tuple[int, int, int]]) -> tuple[DenseModel, dict]:
    """Pad each layer to (KV heads, query heads per KV group, channels) with zero units."""
    plans, specs = [], []
    padded = {"zero_query_heads": 0, "zero_kv_heads": 0, "zero_channels": 0}
    for p, s, (n_kv, group, n_ff) in zip(dense.source.plans, dense.layers, sizes):
        kv, g = len(p.kv_heads), len(p.q_heads) // len(p.kv_heads)
        if kv > n_kv or g > group or len(p.channels) > n_ff:
            raise ValueError("padding can only grow a layer")
        q: list[int | None] = []
        for i in range(n_kv):
            real = p.q_heads[i * g:(i + 1) * g] if i < kv else []
            q += real + [None] * (group - len(real))
        plans.append(replace(p, q_heads=q, kv_heads=p.kv_heads + [None] * (n_kv - kv),
                             channels=p.channels + [None] * (n_ff - len(p.channels))))
        specs.append(replace(s, n_heads=n_kv * group, n_kv_heads=n_kv, n_ff=n_ff))
        padded["zero_query_heads"] += n_kv * group - len(p.q_heads)
        padded["zero_kv_heads"] += n_kv - kv
        padded["zero_channels"] += n_ff - len(p.channels)
    return replace(dense, layers=specs, source=replace(dense.source, plans=plans)), padded


def uniform_shape(dense: DenseModel, align: int = 1) -> DenseModel:
    """The shape re-selected to one size for every layer: per KV group the mean number of query heads
    the shape keeps per kept group, and the mean number of channels (rounded to `align`), each layer
    choosing its own best heads and channels by FLAP importance with fresh compensation biases.

    The result is materialized from a copy of the elastic model whose strategy holds the re-selected
    width, so verify compares the artifact with the masked forward of what was actually exported.
    """
    from .materialize import materialize

    em = dense.source.elastic
    stats = em.strategy.stats
    if not _can_reselect(dense):
        raise UserError("--layout uniform re-selects heads and channels by FLAP importance, and this strategy has no "
                        "calibration statistics: recalibrate with `amoeba-export calibrate`, or use --layout pad")
    info = em.info
    G = info["n_heads"] // info["n_kv_heads"]
    real_q = [sum(h is not None for h in p.q_heads) for p in dense.source.plans]
    real_c = [sum(c is not None for c in p.channels) for p in dense.source.plans]
    per_group = np.mean(real_q) / (info["n_kv_heads"] if G > 1 else 1)
    heads = int(min(G if G > 1 else info["n_heads"], max(1, round(per_group))))
    channels = int(min(info["n_ff"], max(align, round(np.mean(real_c) / align) * align)))
    shape = dense.source.shape
    derived = _derived(em, shape.width, {p.source: select_uniform(stats, em.weights, info, p.source, heads, channels)
                                         for p in dense.source.plans})
    out = materialize(derived, shape, dense.dtype)
    out.record = {**out.record, "reselected": {"query_heads_per_kv_group" if G > 1 else "query_heads": heads,
                                               "channels": channels}}
    return out


def _drop_biases(dense: DenseModel, flow: str, strict: bool, perplexity) -> tuple[DenseModel, dict]:
    """Drop the o_proj/down_proj (FLAP compensation) biases, measuring what that costs."""
    w = dense.source.elastic.weights
    for p in dense.source.plans:
        for name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                     "mlp.gate_proj.bias", "mlp.up_proj.bias"):
            if f"model.layers.{p.source}.{name}" in w:
                raise UserError(f"flow {flow!r} has no linear biases and the base model has {name.split('.')[-2]} "
                                "biases: this model cannot be exported to this flow")
    if strict:
        raise UserError(f"flow {flow!r} cannot express the o_proj/down_proj compensation biases, and --strict "
                        "refuses to drop them: use a flow with biases, or drop --strict to drop them with the "
                        "perplexity change measured and reported")
    plans = [
        replace(p, o_bias=np.zeros_like(p.o_bias), down_bias=np.zeros_like(p.down_bias)) for p in dense.source.plans
    ]
    specs = [replace(s, attn_bias=False, mlp_bias=False) for s in dense.layers]
    src = dense.source
    elastic = _derived(src.elastic, src.shape.width, {
        p.source: replace(src.elastic.strategy.widths[src.shape.width][p.source], o_bias=np.zeros_like(p.o_bias),
                          down_bias=np.zeros_like(p.down_bias)) for p in src.plans})
    dropped = replace(dense, layers=specs, source=replace(src, plans=plans, elastic=elastic))
    return dropped, _measured(perplexity, dense, dropped)


def _derived(em, width: float, layers: dict):
    """A copy of the elastic model whose strategy has `layers` (source layer -> LayerWidth) at
    `width`: the masked reference of what legalize made, so verify checks the artifact exactly."""
    widths = list(em.strategy.widths[width])
    for i, lw in layers.items():
        widths[i] = lw
    derived = copy.copy(em)
    derived.strategy = replace(em.strategy, widths={**em.strategy.widths, width: widths})
    return derived


def _measured(perplexity, before: DenseModel, after: DenseModel) -> dict:
    """Perplexity before and after a change legalize makes to the model; None when only planning
    (the search's latency plans; the compile measures it)."""
    if perplexity is None:
        return {"perplexity_before": None, "perplexity_after": None, "delta": None}
    a, b = perplexity(before), perplexity(after)
    return {"perplexity_before": a, "perplexity_after": b, "delta": b - a}


def _ppl_note(m: dict) -> str:
    if m["delta"] is None:
        return " (perplexity change not measured)"
    return f" (held-out perplexity {m['perplexity_before']:.3f} -> {m['perplexity_after']:.3f})"
