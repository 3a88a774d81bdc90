"""The selection strategy: which layers each depth keeps, which heads and channels each width keeps.

Stored as `strategy.json` (model description, kept layers per depth, metadata) plus
`strategy.safetensors` (per width: query-head masks [L, n_heads], MLP-channel masks [L, n_ff], and
the FLAP compensation biases of o_proj and down_proj [L, hidden]). Never pickle.

Per-layer sizes are explicit: a layer's kept KV heads are the groups that still have a kept query
head (the GQA generalisation, docs/amoeba-algorithm.md §1), recorded by `LayerWidth.kv_heads`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .io import dumps_json, read_json, safetensors_header
from .locations import SHIPPED_STRATEGIES, cache_dir
from .shapes import Shape, ShapeSpace, format_width

FORMAT = "amoeba-export/strategy"
VERSION = 1
# The fields of the base model that a strategy's masks and biases depend on.
MODEL_KEYS = ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "n_ff")


@dataclass
class LayerWidth:
    """One layer at one width: boolean masks and compensation biases (float32)."""

    q_heads: np.ndarray  # bool [n_heads]
    channels: np.ndarray  # bool [n_ff]
    o_bias: np.ndarray  # float32 [hidden]
    down_bias: np.ndarray  # float32 [hidden]

    def kv_heads(self, n_kv: int) -> np.ndarray:
        """KV heads kept: those with at least one kept query head (query i uses kv i // G)."""
        return self.q_heads.reshape(n_kv, -1).any(axis=1)


@dataclass
class Strategy:
    model: dict  # MODEL_KEYS + "fingerprint" + "name"
    depths: dict[int, list[int]]  # depth -> kept layer indices (ascending)
    widths: dict[float, list[LayerWidth]]  # width -> one LayerWidth per base layer
    meta: dict = field(default_factory=dict)
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # calibration statistics (FLAP), kept for audits

    @property
    def space(self) -> ShapeSpace:
        return ShapeSpace(tuple(sorted(self.depths)), tuple(sorted(self.widths)))

    def layers(self, depth: int) -> list[int]:
        return list(self.depths[depth])

    def width(self, w: float) -> list[LayerWidth]:
        return self.widths[w]

    def resolve(self, shape: Shape) -> Shape:
        return self.space.resolve(shape)

    # ----------------------------------------------------------------- checks
    def check_model(self, model: dict) -> None:
        """Refuse a base model whose structure differs from the one the strategy was made for."""
        diff = [k for k in MODEL_KEYS if self.model.get(k) != model.get(k)]
        if diff:
            got = ", ".join(f"{k}={model.get(k)} (strategy: {self.model.get(k)})" for k in diff)
            raise UserError(f"strategy does not match the model: {got}; calibrate this model first")

    def validate(self) -> None:
        m = self.model
        for d, layers in self.depths.items():
            if len(layers) != d or sorted(set(layers)) != list(layers) or not all(
                0 <= i < m["n_layers"] for i in layers
            ):
                raise UserError(f"corrupt strategy: depth {d} lists layers {layers}")
        for w, per_layer in self.widths.items():
            if len(per_layer) != m["n_layers"]:
                raise UserError(f"corrupt strategy: width {format_width(w)} has {len(per_layer)} layers")
            for lw in per_layer:
                if lw.q_heads.shape != (m["n_heads"],) or lw.channels.shape != (m["n_ff"],) or (
                    lw.o_bias.shape != (m["hidden_size"],) or lw.down_bias.shape != (m["hidden_size"],)
                ):
                    raise UserError(f"corrupt strategy: width {format_width(w)} has wrong tensor sizes")

    # --------------------------------------------------------------- storage
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for w, per_layer in self.widths.items():
            key = format_width(w)
            tensors[f"width.{key}.q_heads"] = torch.from_numpy(
                np.stack([l.q_heads for l in per_layer]).astype(np.uint8)
            )
            tensors[f"width.{key}.channels"] = torch.from_numpy(
                np.stack([l.channels for l in per_layer]).astype(np.uint8)
            )
            tensors[f"width.{key}.o_bias"] = torch.from_numpy(
                np.stack([l.o_bias for l in per_layer]).astype(np.float32)
            )
            tensors[f"width.{key}.down_bias"] = torch.from_numpy(
                np.stack([l.down_bias for l in per_layer]).astype(np.float32)
            )
        for k, v in self.stats.items():
            tensors[f"stats.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        save_file(tensors, str(directory / "strategy.safetensors"))
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "depths": {str(d): list(map(int, ls)) for d, ls in sorted(self.depths.items())},
            "widths": [format_width(w) for w in sorted(self.widths, reverse=True)],
            "meta": self.meta,
        }
        (directory / "strategy.json").write_text(dumps_json(doc))

    @classmethod
    def load(cls, directory: Path) -> "Strategy":
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"missing strategy directory {directory}")
        doc = read_json(directory / "strategy.json")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise UserError(f"{directory / 'strategy.json'} is not an amoeba-export strategy")
        if doc.get("version") != VERSION:
            raise UserError(f"strategy version {doc.get('version')} is not supported (expected {VERSION})")
        _check_doc(doc, directory / "strategy.json")
        path = directory / "strategy.safetensors"
        safetensors_header(path)
        t = load_file(str(path))
        widths = {}
        try:
            for key in doc["widths"]:
                q, c = t[f"width.{key}.q_heads"].numpy().astype(bool), t[f"width.{key}.channels"].numpy().astype(bool)
                ob, db = t[f"width.{key}.o_bias"].numpy(), t[f"width.{key}.down_bias"].numpy()
                widths[float(key)] = [LayerWidth(q[i], c[i], ob[i], db[i]) for i in range(len(q))]
            depths = {int(d): [int(i) for i in ls] for d, ls in doc["depths"].items()}
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"corrupt strategy in {directory}: {e}") from None
        stats = {k[len("stats."):]: v.numpy() for k, v in t.items() if k.startswith("stats.")}
        s = cls(model=doc["model"], depths=depths, widths=widths, meta=doc.get("meta", {}), stats=stats)
        s.validate()
        return s


# What a strategy directory may hold besides strategy.json: its tensors and the accuracy tables
# scored on it (and their in-flight temporary files).
_STRATEGY_FILES = re.compile(r"strategy\.safetensors|accuracy-.*\.json|\.accuracy-.*\.partial-.*")


def is_strategy_dir(path: Path) -> bool:
    """An earlier strategy of ours (what `--force` may replace): strategy.json in our format and
    nothing but the files a strategy directory holds."""
    path = Path(path)
    try:
        doc = json.loads((path / "strategy.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return False
    return all(p.name == "strategy.json" or (p.is_file() and _STRATEGY_FILES.fullmatch(p.name)) for p in path.iterdir())


def _check_doc(doc: dict, path: Path) -> None:
    """strategy.json as data: the fields `load` reads, of the types it reads them as."""
    def bad(field: str, what: str):
        raise UserError(f"corrupt strategy {path}: '{field}' {what}")

    model = doc.get("model")
    if not isinstance(model, dict):
        bad("model", "must be an object")
    for k in MODEL_KEYS:
        if isinstance(model.get(k), bool) or not isinstance(model.get(k), int) or model[k] < 1:
            bad(f"model.{k}", f"must be a positive integer, got {model.get(k)!r}")
    depths = doc.get("depths")
    if not isinstance(depths, dict) or not depths:
        bad("depths", "must be a non-empty object of depth -> kept layers")
    for d, layers in depths.items():
        if (
            not str(d).isdigit()
            or not isinstance(layers, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            bad(f"depths.{d}", "must list layer indices")
    widths = doc.get("widths")
    if not isinstance(widths, list) or not widths or not all(isinstance(w, str) for w in widths):
        bad("widths", "must be a non-empty list of width keys")
    if not isinstance(doc.get("meta", {}), dict):
        bad("meta", "must be an object")


def full_width(model: dict) -> list[LayerWidth]:
    """Keep everything, no compensation: the width-1 plan of our own calibration."""
    h = model["hidden_size"]
    return [
        LayerWidth(
            np.ones(model["n_heads"], bool),
            np.ones(model["n_ff"], bool),
            np.zeros(h, np.float32),
            np.zeros(h, np.float32),
        )
        for _ in range(model["n_layers"])
    ]


SHIPPED = SHIPPED_STRATEGIES


def calibrated_dir(info: dict) -> Path:
    """Where `amoeba-export calibrate` writes a model's strategy by default (keyed by fingerprint)."""
    return cache_dir() / "strategies" / info["fingerprint"]


def locate(info: dict, explicit: str | Path | None = None) -> Path:
    """The strategy to use: the explicit one, else this model's calibrated one, else a shipped one."""
    if explicit is not None:
        return Path(explicit)
    candidates = [calibrated_dir(info)] + sorted(SHIPPED.glob("*/"))
    for d in candidates:
        j = d / "strategy.json"
        if j.is_file() and read_json(j).get("model", {}).get("fingerprint") == info["fingerprint"]:
            return d
    raise UserError(
        f"no strategy for model {info['name']} (fingerprint {info['fingerprint']}): "
        "run `amoeba-export calibrate --model PATH` first or pass --strategy DIR"
    )
