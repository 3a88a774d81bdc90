"""The adapter interface: what materialize and the reference forward need from a fine-tuned adapter.

For a fixed shape an adapter is, per kept layer and projection, one low-rank update
`ΔW = scale · B @ A` (for SMOL, A and B are the gate-mixed expert matrices of docs/amoeba-algorithm.md §5-§6, so the
cross-expert terms are included). Materialize merges it into the dense weight in fp32; the masked
reference forward applies it unmerged, `y += scale · B (A x)`, so the two are independent checks of
each other. `LoRA` here is one plain, shape-independent low-rank update per projection (a standard
PEFT LoRA reads into it, `peft_lora.py`); the SMOL adapter lives in `smol.py`.

`load_adapter` is the one entry point for `--adapter PATH`: it recognises our SMOL directory, a
standard PEFT LoRA directory and the upstream AmoebaLLM checkpoint layout.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .shapes import Shape

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_path(proj: str) -> str:
    """A projection's module within a decoder layer: attention projections live under self_attn, the rest under mlp."""
    return f"{'self_attn' if proj in PROJECTIONS[:4] else 'mlp'}.{proj}"


def weight_name(layer: int, proj: str) -> str:
    """HF name of a projection's weight."""
    return f"model.layers.{layer}.{module_path(proj)}.weight"


def projection_shape(info: dict, proj: str) -> tuple[int, int]:
    """(out_features, in_features) of a projection of the base model described by `info`."""
    h, q, kv, ff = (
        info["hidden_size"],
        info["n_heads"] * info["head_dim"],
        info["n_kv_heads"] * info["head_dim"],
        info["n_ff"],
    )
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (ff, h), "up_proj": (ff, h), "down_proj": (h, ff)}[proj]


def check_factors(info: dict, layer: int, proj: str, a_shape, b_shape, names: tuple[str, str]) -> None:
    """Refuse low-rank factors made for another base model, naming the offending tensor.

    A is [..., r, in] and B is [..., out, r] (SMOL has a leading expert axis); shapes only, so a
    lazily read adapter is checked from its file header."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if not 0 <= layer < info["n_layers"]:
        raise UserError(f"adapter tensor {names[0]} is for layer {layer}, but the model has {info['n_layers']} layers")
    out_f, in_f = projection_shape(info, proj)
    if len(a_shape) < 2 or a_shape[-1] != in_f:
        raise UserError(f"adapter tensor {names[0]} has shape {list(a_shape)}, but the model's {proj} takes {in_f} "
                        "inputs: the adapter was trained for another base model")
    if len(b_shape) < 2 or b_shape[-2] != out_f:
        raise UserError(f"adapter tensor {names[1]} has shape {list(b_shape)}, but the model's {proj} has {out_f} "
                        "outputs: the adapter was trained for another base model")
    if a_shape[-2] != b_shape[-1] or a_shape[:-2] != b_shape[:-2]:
        raise UserError(f"adapter tensors {names[0]} {list(a_shape)} and {names[1]} {list(b_shape)} do not pair up")


@dataclass
class LoRADelta:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def weight(self) -> torch.Tensor:
        """The dense update in fp32 (docs/amoeba-algorithm.md §6: merge in fp32, then cast)."""
        return self.scale * (self.B.double() @ self.A.double()).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * ((x.to(self.A.dtype) @ self.A.T) @ self.B.T).to(x.dtype)

    def to(self, device: torch.device) -> "LoRADelta":
        return LoRADelta(self.A.to(device), self.B.to(device), self.scale)


class Adapter:
    """Base class: `delta` gives the update of one projection of one base layer for a shape."""

    def delta(self, shape: Shape, layer: int, proj: str) -> LoRADelta | None:
        raise NotImplementedError

    def record(self, shape: Shape) -> dict:
        """What the manifest says about how the adapter was applied (gate, experts, ...)."""
        return {}

    def check_model(self, info: dict) -> None:
        """Refuse a base model whose sizes differ from the adapter's (called when attached)."""

    def bind(self, strategy) -> None:
        """Learn what a shape means (its kept layers) from the strategy of the model it is attached
        to. A shape-independent adapter needs nothing; SMOL's router reads the kept-layer mask."""


@dataclass
class LoRA(Adapter):
    """One plain LoRA, the same for every shape: {(layer, proj): LoRADelta}."""

    deltas: dict[tuple[int, str], LoRADelta] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def delta(self, shape: Shape, layer: int, proj: str) -> LoRADelta | None:
        return self.deltas.get((layer, proj))

    def record(self, shape: Shape) -> dict:
        return {"kind": "lora", "projections": len(self.deltas), **self.meta}

    def check_model(self, info: dict) -> None:
        for (layer, proj), d in sorted(self.deltas.items()):
            check_factors(
                info, layer, proj, d.A.shape, d.B.shape, (f"layer {layer} {proj} A", f"layer {layer} {proj} B")
            )


# ------------------------------------------------------------------------------------ loading

def adapter_fingerprint(directory: Path) -> str:
    """sha256 (first 16 hex) over an adapter directory's JSON and safetensors files: what an accuracy
    table scored with the adapter is keyed by, so a retrained adapter never reuses stale scores."""
    from .io import hash_into

    directory = Path(directory)
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(str(f.relative_to(directory)).encode() + b"\0")
        hash_into(h, f)
    return h.hexdigest()[:16]


def checkpoints(path: Path) -> list[Path]:
    """The `checkpoint-N` directories in `path` (a training output: ours or upstream's), oldest first."""
    found = [p for p in Path(path).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_adapter_dir(path: str | Path) -> Path:
    """The directory that holds the adapter's files: `path` for our SMOL format, else where
    adapter_config.json is (`path`, its adapter_model/, or the newest checkpoint-N's)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter {path} does not exist" if not path.exists() else f"adapter {path} is not a directory")
    if (path / "adapter.json").is_file():
        return path
    if (path / "adapter" / "adapter.json").is_file():  # an `amoeba-export train` run directory
        return path / "adapter"
    found = checkpoints(path)
    ours = [p for p in found if (p / "adapter" / "adapter.json").is_file()]
    if ours:  # a run stopped before its end: its newest checkpoint
        return ours[-1] / "adapter"
    for candidate in (path / "adapter_model", path):  # upstream's checkpoint-N layout first, then PEFT's
        if (candidate / "adapter_config.json").is_file():
            return candidate
    # a training output directory: its newest checkpoint-N (what upstream's get_last_checkpoint picks)
    if found:
        newest = found[-1]
        for candidate in (newest / "adapter_model", newest):
            if (candidate / "adapter_config.json").is_file():
                return candidate
        raise UserError(
            f"{newest} has no adapter_config.json (looked in {newest.name}/adapter_model and {newest.name})"
        )
    raise UserError(f"{path} holds no adapter: expected adapter.json (amoeba-export SMOL), adapter_config.json "
                    "(PEFT LoRA), or checkpoint-N/adapter_model/ (upstream AmoebaLLM)")


def load_adapter(path: str | Path, info: dict) -> Adapter:
    """The adapter at `path`, checked against the base model `info`.

    Recognised: our SMOL directory (`adapter.json` + `adapter.safetensors`); the upstream AmoebaLLM
    checkpoint (`adapter_config.json` with `use_moe_lora`, also found inside
    `checkpoint-N/adapter_model/` or the newest `checkpoint-N` of a training output directory); a
    standard PEFT LoRA directory (`adapter_config.json` with peft_type LORA).
    """
    from .io import read_json

    where = resolve_adapter_dir(path)
    if (where / "adapter.json").is_file():
        from .smol import SMOL

        adapter: Adapter = SMOL.load(where)
    else:
        config = read_json(where / "adapter_config.json")
        if config.get("use_moe_lora"):
            from .upstream import import_adapter

            adapter = import_adapter(where, info)
        elif str(config.get("peft_type", "")).upper() == "LORA":
            from .peft_lora import read_peft_lora

            adapter = read_peft_lora(where, info)
        else:
            raise UserError(f"{where / 'adapter_config.json'} is a {config.get('peft_type')!r} PEFT adapter; "
                            "only LoRA (and AmoebaLLM's mixture of LoRAs) can be merged")
    adapter.check_model(info)
    return adapter
