"""Import upstream AmoebaLLM files: the selection strategy (`dp_selection_strategy.npy`) and the
released fine-tuned checkpoint (`checkpoint-N/adapter_model/`, docs/amoeba-algorithm.md §8).

The upstream file is a 0-d numpy object array holding a pickled dict (docs/amoeba-algorithm.md §4):

    {'strategy':   {m: float array(L) of 0/1},            m = number of removed layers
     'metric':     {m: float},
     'width_mask': {module: None | {ratio: bool array(out_features)}},
     'bias':       {module: None | {ratio: float array(hidden)}}}

`np.load(..., allow_pickle=True)` on such a third-party file would run whatever code its pickle
names (docs/amoeba-algorithm.md §4), so `restricted_load_npy` parses the .npy header itself and unpickles
the payload with an unpickler that can only rebuild numpy arrays, numpy scalars and dtypes; plain
containers (dict, list, tuple, str, int, float, bool, None) have their own pickle opcodes and never
reach `find_class`.

`import_dp_strategy` turns the dict into our `Strategy`: depth d = L - m keeps the layers whose
mask bit is 1 (depth L, all layers, is added as upstream does at load time), and each width ratio
becomes per-layer query-head masks, MLP-channel masks and the FLAP compensation biases of o_proj
and down_proj. Stored masks are kept exactly, even at ratio 1 (docs/amoeba-algorithm.md §3: FLAP drops one unit
there); ratio keys are snapped onto the exact width_choice values (docs/amoeba-algorithm.md §1).

`import_adapter` reads the checkpoint's mixture of LoRAs into a `SMOL` (safetensors only; sizes
from the tensors, the router's input width included), and `import_checkpoint` pairs it with the
strategy, snapping the strategy's width keys onto the adapter's own width_choice.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format
from safetensors import safe_open

from .errors import UserError
from .io import read_json, safetensors_header
from .shapes import WIDTH_TOLERANCE, format_width, parse_width
from .strategy import MODEL_KEYS, LayerWidth, Strategy, full_width

DEFAULT_WIDTH_CHOICE = (1.0, 7 / 8, 3 / 4, 5 / 8, 1 / 2)
SOURCE = "upstream AmoebaLLM dp_selection_strategy.npy"

# --------------------------------------------------------------------------- restricted loading

# (module, name) a pickle may reference -> (module to import, attribute). A real np.save of the
# upstream dict references exactly: <core>.multiarray._reconstruct, numpy.ndarray, numpy.dtype and
# <core>.multiarray.scalar, where <core> is numpy.core (numpy 1.x writers, protocol 3) or numpy._core
# (numpy 2.x writers, protocol 4). Both spellings resolve to the installed numpy's own objects.
_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"
ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy.core.multiarray", "_reconstruct"): (f"{_CORE}.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (f"{_CORE}.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): (f"{_CORE}.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): (f"{_CORE}.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are the numpy array/scalar/dtype constructors."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UserError(
                f"refusing to load {self._path}: it contains a pickled {module}.{name}, "
                "which is not a numpy array, dict, list or scalar"
            )
        return getattr(importlib.import_module(target[0]), target[1])


def restricted_load_npy(path) -> object:
    """Load a .npy file without ever executing code named by its pickle.

    Plain (non-object) arrays come back as arrays. An object array is unpickled with
    `_NumpyOnlyUnpickler`; a 0-d object array (how np.save stores a dict) comes back as the object
    it holds, any other object array as the array. Missing, truncated or non-.npy files, and
    pickles that reference anything besides numpy arrays, scalars and dtypes, raise `UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        raw = f.read()
    fp = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(fp)
    except ValueError:
        raise UserError(f"{path} is not a .npy file") from None
    try:
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise UserError(f"{path}: .npy format version {version[0]}.{version[1]} is not supported")
    except UserError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise UserError(f"corrupt .npy file {path}: unreadable header ({e})") from None

    if dtype.hasobject:
        try:
            obj = _NumpyOnlyUnpickler(fp, path).load()
        except UserError:
            raise
        except Exception as e:  # any failure while rebuilding is a corrupt/truncated file
            raise UserError(f"corrupt or truncated .npy file {path}: {type(e).__name__}: {e}") from None
        if not isinstance(obj, np.ndarray) or obj.shape != tuple(shape):
            raise UserError(f"corrupt .npy file {path}: payload does not match its header")
        return obj.item() if obj.ndim == 0 else obj

    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    data = fp.read(nbytes)
    if len(data) < nbytes:
        raise UserError(f"truncated .npy file {path}: {len(data)} of {nbytes} data bytes present")
    array = np.frombuffer(data, dtype=dtype, count=count).copy()
    if fortran_order:
        return array.reshape(tuple(shape)[::-1]).transpose()
    return array.reshape(shape)


# --------------------------------------------------------------------------- conversion

_MODULE_RE = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
_PROJ = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_MASKED = ("q", "k", "v", "gate", "up")  # modules whose output rows FLAP prunes
_BIASED = ("o", "down")  # modules that receive the compensation bias


def _section(doc: dict, name: str):
    """An optional top-level entry; missing or None means empty."""
    value = doc.get(name)
    return {} if value is None else value


def _describe(layers: list[int]) -> str:
    return ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")


def _snap(key, width_choice: list[float], what: str) -> float:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, float, np.integer, np.floating)):
        raise UserError(f"{what}: width key {key!r} is not a number")
    value = float(key)
    if not 0.0 < value <= 1.0 + WIDTH_TOLERANCE:
        raise UserError(f"{what}: width key {key!r} is out of range (0, 1]")
    best = min(width_choice, key=lambda c: abs(c - value))
    return float(best) if abs(best - value) <= WIDTH_TOLERANCE else value


def _binary(arr, what: str, length: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 1 or a.shape[0] != length:
        raise UserError(f"{what} has shape {tuple(a.shape)}, expected ({length},) for this model")
    if a.dtype == bool:
        return a.copy()
    if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
        raise UserError(f"{what} must hold only 0/1 values")
    return a.astype(bool)


def _group_modules(section: dict, name: str, n_layers: int) -> dict[str, dict[int, dict]]:
    """{proj: {layer: {raw_ratio: value}}} for the non-None entries of one section of the file."""
    if not isinstance(section, dict):
        raise UserError(f"'{name}' in the upstream strategy is a {type(section).__name__}, expected a dict")
    out: dict[str, dict[int, dict]] = {p: {} for p in _PROJ.values()}
    seen: set[tuple[int, str]] = set()
    for key, value in section.items():
        m = _MODULE_RE.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            if value is None:
                continue
            raise UserError(f"'{name}' has an entry for unrecognised module {key!r}")
        layer, proj = int(m.group(1)), _PROJ[m.group(2)]
        if layer >= n_layers:
            raise UserError(f"'{name}' names layer {layer} ({key}) but the model has {n_layers} layers")
        if (layer, proj) in seen:
            raise UserError(f"'{name}' lists layer {layer} {m.group(2)} twice")
        seen.add((layer, proj))
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UserError(f"'{name}'[{key!r}] is a {type(value).__name__}, expected None or a dict")
        out[proj][layer] = value
    return out


def _by_width(entries: dict, width_choice, what: str) -> dict[float, object]:
    snapped: dict[float, object] = {}
    for raw, value in entries.items():
        w = _snap(raw, width_choice, what)
        if w in snapped:
            raise UserError(f"{what}: two width keys snap to {format_width(w)}")
        snapped[w] = value
    return snapped


def _depths(strategy, L: int) -> dict[int, list[int]]:
    if not isinstance(strategy, dict) or not strategy:
        raise UserError("'strategy' in the upstream strategy must be a non-empty dict {removed layers: mask}")
    depths: dict[int, list[int]] = {L: list(range(L))}
    for key, mask in strategy.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, float, np.integer, np.floating)) or (
            not math.isfinite(float(key)) or float(key) != int(key)
        ):
            raise UserError(f"'strategy' key {key!r} is not a number of removed layers")
        m = int(key)
        if not 0 <= m < L:
            raise UserError(f"'strategy' removes {m} layers but the model has {L} layers")
        what = f"'strategy'[{m}] (depth {L - m})"
        a = np.asarray(mask)
        if a.ndim != 1 or a.shape[0] != L:
            raise UserError(f"{what} has {a.size} entries but the model has {L} layers")
        kept = _binary(a, what, L)
        if int(kept.sum()) != L - m:
            raise UserError(f"{what} keeps {int(kept.sum())} layers, expected {L - m}")
        layers = [int(i) for i in np.flatnonzero(kept)]
        if L - m in depths and depths[L - m] != layers:
            raise UserError(f"{what} is listed twice with different layers")
        depths[L - m] = layers
    return depths


def import_dp_strategy(npy_path, model: dict, width_choice: list[float] | None = None) -> Strategy:
    """Convert an upstream `dp_selection_strategy.npy` into a `Strategy` for `model`.

    `model` is the base-model description (n_layers, hidden_size, n_heads, n_kv_heads, head_dim,
    n_ff, fingerprint, name); `width_choice` lists the exact width values ratio keys snap onto
    (within 1e-6; others are kept as they are). A file without any width masks yields width 1 with
    everything kept and no compensation.
    """
    missing = [k for k in MODEL_KEYS if not isinstance(model.get(k), (int, np.integer))]
    if missing:
        raise UserError(f"model description lacks {', '.join(missing)}")
    L, hidden, nq, nkv, hd, nff = (int(model[k]) for k in MODEL_KEYS)
    if nkv <= 0 or nq % nkv:
        raise UserError(f"model has {nq} query heads, not a multiple of its {nkv} KV heads")
    choice = [float(c) for c in (DEFAULT_WIDTH_CHOICE if width_choice is None else width_choice)]
    if not choice:
        raise UserError("width_choice is empty")
    path = Path(npy_path)

    doc = restricted_load_npy(path)
    if not isinstance(doc, dict) or "strategy" not in doc:
        raise UserError(f"{path} is not an upstream AmoebaLLM strategy: expected a dict with a 'strategy' entry")

    depths = _depths(doc["strategy"], L)
    metric = _section(doc, "metric")
    if not isinstance(metric, dict):
        raise UserError(f"'metric' in {path} is not a dict")
    try:
        metric = {str(int(m)): float(v) for m, v in metric.items()}
    except (TypeError, ValueError):
        raise UserError(f"'metric' in {path} holds non-numeric entries") from None

    masks = _group_modules(_section(doc, "width_mask"), "width_mask", L)
    biases = _group_modules(_section(doc, "bias"), "bias", L)
    raw_keys: set[float] = set()
    for section in (masks, biases):
        for per_layer in section.values():
            for entries in per_layer.values():
                raw_keys.update(float(k) for k in entries if isinstance(k, (int, float, np.integer, np.floating)))

    # {proj: {layer: {snapped width: value}}}
    m_w = {
        p: {i: _by_width(e, choice, f"width_mask layer {i} {p}_proj") for i, e in d.items()} for p, d in masks.items()
    }
    b_w = {p: {i: _by_width(e, choice, f"bias layer {i} {p}_proj") for i, e in d.items()} for p, d in biases.items()}
    for p in ("o", "down"):
        if m_w[p]:
            bad = [i for i, e in m_w[p].items() if any(not np.asarray(v).all() for v in e.values())]
            if bad:
                raise UserError(
                    f"width_mask prunes {p}_proj outputs (layers {_describe(bad)}): the hidden size is never pruned"
                )
    for p in _MASKED:
        if b_w[p]:
            raise UserError(
                f"bias has entries for {p}_proj (layers {_describe(sorted(b_w[p]))}); only o_proj and down_proj take "
                "a bias"
            )

    widths_found = sorted({w for p in _MASKED for e in m_w[p].values() for w in e}, reverse=True)
    all_layers = set(range(L))
    # Every width must be present, for every layer, in each module family that has it at all.
    for p in _MASKED + _BIASED:
        src = b_w[p] if p in _BIASED else m_w[p]
        for w in {w for e in src.values() for w in e}:
            have = {i for i, e in src.items() if w in e}
            if p in _BIASED and w not in widths_found:
                raise UserError(f"bias for {p}_proj has width {format_width(w)} but no layer has a mask at that width")
            if have != all_layers:
                raise UserError(
                    f"width {format_width(w)} has a {p}_proj {'bias' if p in _BIASED else 'mask'} for some layers "
                    f"but not for layers {_describe(sorted(all_layers - have))}"
                )
    for w in widths_found:
        for p in ("q", "gate"):
            if not any(w in e for e in m_w[p].values()):
                raise UserError(f"width {format_width(w)} has masks but no {p}_proj mask in any layer")

    widths: dict[float, list[LayerWidth]] = {}
    for w in widths_found:
        ws = format_width(w)
        per_layer = []
        for i in range(L):
            q = _binary(m_w["q"][i][w], f"q_proj mask of layer {i} at width {ws}", nq * hd)
            blocks = q.reshape(nq, hd)
            partial = [h for h in range(nq) if blocks[h].any() and not blocks[h].all()]
            if partial:
                raise UserError(
                    f"q_proj mask of layer {i} at width {ws} keeps only part of head(s) {_describe(partial)}; "
                    f"heads of {hd} dims must be kept or dropped whole"
                )
            heads = blocks[:, 0].copy()
            for p in ("k", "v"):
                if i in m_w[p] and w in m_w[p][i]:
                    kv = _binary(m_w[p][i][w], f"{p}_proj mask of layer {i} at width {ws}", nkv * hd)
                    if nkv == nq and not np.array_equal(kv, q):
                        raise UserError(f"{p}_proj mask of layer {i} at width {ws} differs from the q_proj mask")
            channels = _binary(m_w["gate"][i][w], f"gate_proj mask of layer {i} at width {ws}", nff)
            if i in m_w["up"] and w in m_w["up"][i]:
                up = _binary(m_w["up"][i][w], f"up_proj mask of layer {i} at width {ws}", nff)
                if not np.array_equal(up, channels):
                    raise UserError(f"up_proj mask of layer {i} at width {ws} differs from the gate_proj mask")
            bias = []
            for p in _BIASED:
                if i in b_w[p]:
                    b = np.asarray(b_w[p][i][w])
                    if b.ndim != 1 or b.shape[0] != hidden or not np.issubdtype(b.dtype, np.number):
                        raise UserError(
                            f"{p}_proj bias of layer {i} at width {ws} has shape {tuple(b.shape)}, expected ({hidden},)"
                        )
                    b = b.astype(np.float32)
                    if not np.isfinite(b).all():
                        raise UserError(f"{p}_proj bias of layer {i} at width {ws} holds non-finite values")
                else:
                    b = np.zeros(hidden, np.float32)
                bias.append(b)
            per_layer.append(LayerWidth(heads, channels, bias[0], bias[1]))
        widths[w] = per_layer
    if not widths:  # depth-only file: width 1 keeps everything, no compensation
        widths[1.0] = full_width(model)

    meta = {
        "source": SOURCE,
        "path": str(path),
        "metric": metric,
        "width_keys": sorted(raw_keys, reverse=True),
    }
    strategy = Strategy(model=dict(model), depths=dict(sorted(depths.items())), widths=widths, meta=meta)
    strategy.validate()
    return strategy


# --------------------------------------------------------------------------- the released checkpoint

CHECKPOINT_SOURCE = "upstream AmoebaLLM checkpoint"
_ROUTER_NAMES = {  # our SMOL router tensor -> the upstream name (docs/amoeba-algorithm.md §8)
    "w1": "base_model.lora_sparsemoe.router.topkroute_linear.0.weight",
    "b1": "base_model.lora_sparsemoe.router.topkroute_linear.0.bias",
    "w2": "base_model.lora_sparsemoe.router.topkroute_linear.1.weight",
    "b2": "base_model.lora_sparsemoe.router.topkroute_linear.1.bias",
    "noise_w": "base_model.lora_sparsemoe.router.noise_linear.weight",
    "noise_b": "base_model.lora_sparsemoe.router.noise_linear.bias",
}
_EXPERT_RE = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"\.lora_([AB])\.(\d+)\.weight"
)
# Frozen embeddings PEFT saves beside the adapter when the vocabulary was resized (the [PAD] row
# that makes LLaMA2's 32000 tokens 32001, docs/amoeba-algorithm.md §8). They are not trained, so nothing is lost
# by keeping the base model's own embeddings, which also drops the [PAD] row.
_EMBED_RE = re.compile(r"base_model\.model\.(?:model\.embed_tokens|lm_head)\.weight")


def parse_width_choice(value, where: str) -> list[float]:
    """Upstream stores width_choice as a Python expression string, e.g. "[1,7/8,3/4,5/8]", and
    `eval`s it; here each item is read as an exact fraction (no eval), in the stored order, which is
    the router's one-hot order. 7/8 as a Fraction rounds to the same double as Python's 7/8."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[(" and text[-1:] in "])":
            text = text[1:-1]
        items = [t.strip() for t in text.split(",") if t.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise UserError(f"{where}: width_choice {value!r} is not a list of widths")
    if not items:
        raise UserError(f"{where}: width_choice {value!r} lists no width")
    try:
        return [parse_width(str(v)) for v in items]
    except UserError as e:
        raise UserError(f"{where}: width_choice {value!r}: {e}") from None


def import_adapter(directory, model: dict, width_choice: list[float] | None = None):
    """The upstream mixture-of-LoRA adapter (adapter_config.json + adapter_model.safetensors with the
    tensor names of docs/amoeba-algorithm.md §8) as a SMOL, for the base model `model`.

    Sizes come from the tensors: the expert count from the expert indices and the router, the rank
    from lora_A, and the router's input width from topkroute_linear.0.weight. That width minus the
    model's layers is the number of widths the router was trained with; the config's width_choice
    (or `width_choice`, when given) must list exactly that many, in one-hot order. r and lora_alpha
    come from the config. Expert tensors stay in the file and are read one projection at a time.
    """
    from .adapter import resolve_adapter_dir
    from .smol import SMOL, ExpertFile

    directory = resolve_adapter_dir(directory)
    cfg_path = directory / "adapter_config.json"
    cfg = read_json(cfg_path)
    if not cfg.get("use_moe_lora"):
        raise UserError(
            f"{cfg_path} is not an AmoebaLLM mixture-of-LoRA adapter (no use_moe_lora): pass it as a PEFT LoRA"
        )
    for key, what in (("use_dora", "DoRA"), ("moe_lora_v2", "moe_lora_v2"), ("rank_pattern", "rank_pattern"),
                      ("alpha_pattern", "alpha_pattern"), ("modules_to_save", "modules_to_save")):
        if cfg.get(key):
            raise UserError(f"{cfg_path}: {what} is not part of the released AmoebaLLM format and is not supported")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise UserError(
            f"{directory} holds a pickled adapter_model.bin, which is never loaded: convert it to safetensors"
        )
    header = safetensors_header(weights)
    L, hidden = int(model["n_layers"]), int(model["hidden_size"])

    names: dict[tuple[int, str], dict[str, dict[int, str]]] = {}
    ignored = []
    router_names = set(_ROUTER_NAMES.values())
    for name, spec in header.items():
        if name == "__metadata__" or name in router_names:
            continue
        m = _EXPERT_RE.fullmatch(name)
        if m is not None:
            layer, block, proj, ab, e = int(m.group(1)), m.group(2), m.group(3), m.group(4), int(m.group(5))
            if (block == "self_attn") != (proj in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise UserError(f"{weights}: tensor {name} puts {proj} under {block}")
            names.setdefault((layer, proj), {"A": {}, "B": {}})[ab][e] = name
        elif _EMBED_RE.fullmatch(name):
            if len(spec["shape"]) != 2 or spec["shape"][1] != hidden:
                raise UserError(f"{weights}: tensor {name} has shape {spec['shape']}, not [vocab, {hidden}]")
            ignored.append(name)
        else:
            raise UserError(
                f"{weights}: unexpected tensor {name} (not a LoRA expert, the router, or frozen embeddings)"
            )
    missing = [n for n in _ROUTER_NAMES.values() if n not in header]
    if missing:
        raise UserError(f"{weights} has no {missing[0]}: not an AmoebaLLM checkpoint with the global router")
    if not names:
        raise UserError(f"{weights} holds no LoRA experts")
    with safe_open(str(weights), framework="pt") as f:
        router = {k: f.get_tensor(n).float() for k, n in _ROUTER_NAMES.items()}

    n_in, E = int(router["w1"].shape[1]), int(router["w2"].shape[0])
    n_widths = n_in - L
    if width_choice is None:
        if "width_choice" not in cfg:
            raise UserError(
                f"{cfg_path} has no width_choice: pass --width-choice with the router's {n_widths} widths in order"
            )
        width_choice = parse_width_choice(cfg["width_choice"], str(cfg_path))
    if n_widths < 1:
        raise UserError(f"the router takes {n_in} inputs ({_ROUTER_NAMES['w1']}), too few for this {L}-layer model: "
                        "the checkpoint was trained on another base model")
    if len(width_choice) != n_widths:
        raise UserError(f"the router takes {n_in} inputs ({_ROUTER_NAMES['w1']}): {L} layers + {n_widths} widths, but "
                        f"width_choice lists {len(width_choice)} ({', '.join(map(format_width, width_choice))}); pass "
                        f"--width-choice with the {n_widths} trained widths in their one-hot order")
    if cfg.get("num_experts") is not None and int(cfg["num_experts"]) != E:
        raise UserError(f"{cfg_path} says num_experts={cfg['num_experts']}, but the router scores {E} experts")
    entries = {}
    for (layer, proj), ab in sorted(names.items()):
        for part in "AB":
            if sorted(ab[part]) != list(range(E)):
                raise UserError(
                    f"{weights}: layer {layer} {proj} has lora_{part} experts {sorted(ab[part])}, expected 0..{E - 1}"
                )
        entries[(layer, proj)] = ([ab["A"][e] for e in range(E)], [ab["B"][e] for e in range(E)])
    experts = ExpertFile(weights, entries, stacked=False)
    r = int(experts.shapes(next(iter(entries)))[0][1])
    if cfg.get("r") is not None and int(cfg["r"]) != r:
        raise UserError(f"{cfg_path} says r={cfg['r']}, but the lora_A tensors have rank {r}")
    if "top_k" not in cfg or "lora_alpha" not in cfg:
        raise UserError(f"{cfg_path} lacks {'top_k' if 'top_k' not in cfg else 'lora_alpha'}")
    alpha = float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    kept = (
        "r",
        "lora_alpha",
        "num_experts",
        "top_k",
        "width_choice",
        "use_rslora",
        "target_modules",
        "base_model_name_or_path",
    )
    smol = SMOL(r=r, alpha=alpha, scale=scale, top_k=int(cfg["top_k"]), n_layers=L, width_choice=list(width_choice),
                router=router, experts=experts, model={k: model[k] for k in MODEL_KEYS},
                meta={"source": CHECKPOINT_SOURCE, "path": str(directory),
                      "config": {k: cfg[k] for k in kept if k in cfg}, "ignored_tensors": sorted(ignored)})
    smol.check_model(model)
    return smol


def import_checkpoint(checkpoint_dir, npy_path, model: dict, width_choice: list[float] | None = None):
    """(Strategy, SMOL) from a released AmoebaLLM checkpoint and its dp_selection_strategy.npy.

    The strategy's width keys are snapped onto the adapter's own width_choice (docs/amoeba-algorithm.md §1), so the
    masks and the router's one-hot agree exactly. Widths the router has no input for are dropped
    from the strategy, and listed in its meta, since no gate exists for them.
    """
    smol = import_adapter(checkpoint_dir, model, width_choice)
    strategy = import_dp_strategy(npy_path, model, smol.width_choice)
    trained = set(smol.width_choice).__contains__  # import_dp_strategy snapped the keys onto these exact values
    dropped = sorted((w for w in strategy.widths if not trained(w)), reverse=True)
    if len(dropped) == len(strategy.widths):
        raise UserError(
            f"none of the strategy's widths ({', '.join(map(format_width, dropped))}) is among the adapter's "
            f"width_choice ({', '.join(map(format_width, smol.width_choice))})"
        )
    strategy.widths = {w: v for w, v in strategy.widths.items() if trained(w)}
    strategy.meta["adapter"] = {
        "source": CHECKPOINT_SOURCE,
        "path": smol.meta["path"],
        "width_choice": smol.width_choice,
    }
    if dropped:
        strategy.meta["dropped_widths"] = [format_width(w) for w in dropped]
    smol.bind(strategy)
    return strategy, smol


def is_import_dir(path: Path) -> bool:
    """An earlier `import-checkpoint` output (what `--force` may replace): exactly our strategy/ and
    adapter/ directories."""
    from .smol import FORMAT as ADAPTER_FORMAT
    from .strategy import is_strategy_dir

    path = Path(path)
    if {p.name for p in path.iterdir()} != {"strategy", "adapter"} or not is_strategy_dir(path / "strategy"):
        return False
    try:
        doc = json.loads((path / "adapter" / "adapter.json").read_text())
    except (OSError, ValueError):
        return False
    names = {p.name for p in (path / "adapter").iterdir()}
    return (
        isinstance(doc, dict)
        and doc.get("format") == ADAPTER_FORMAT
        and names <= {"adapter.json", "adapter.safetensors"}
    )
