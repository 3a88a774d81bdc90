"""ElasticModel: base weights + Strategy (+ Adapter), with the masked reference forward.

The masked forward is the ground truth every exported artifact is checked against. It runs the
unmodified base model, one layer at a time from the memory-mapped weights (layerwise.py,
docs/reference-forward.md), and only *masks*: skipped decoder blocks leave the residual untouched, the
inputs of o_proj and down_proj are zeroed on pruned heads and channels (that is what removing them
means, under MHA and GQA alike), the compensation biases are added to their outputs, and the adapter
is applied unmerged (`y += s·B(Ax)`). Nothing here slices a weight, so a slicing or merging bug in
materialize cannot hide in the reference.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open

from .adapter import PROJECTIONS, Adapter, module_path
from .base_model import check_weights, model_info, read_config, resolve_model, weight_files
from .compute import Compute
from .errors import UserError
from .layerwise import LayerStack
from .shapes import Shape
from .strategy import LayerWidth, Strategy


class WeightSource:
    """Lazily read base weights: one tensor in memory at a time.

    Each read opens the file's memory map and drops it with the tensor, so pages of tensors
    already exported do not stay resident (holding every map open doubled an export's peak RSS).
    """

    def __init__(self, model_dir: Path):
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, list[int]] = {}
        self._dtypes: dict[str, str] = {}
        for f in weight_files(model_dir):
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    self._where[name] = f
                    self._shapes[name] = list(part.get_shape())
                    self._dtypes[name] = part.get_dtype()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"the base model has no tensor {name!r}")
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._shapes[name])

    def dtype(self, name: str) -> torch.dtype:
        """From the header: no tensor is read."""
        return _ST_DTYPES[self._dtypes[name]]


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ElasticModel:
    def __init__(
        self,
        model: str | Path | None = None,
        strategy: Strategy | None = None,
        adapter: Adapter | None = None,
        allow_other_weights: bool = False,
        compute: Compute | None = None,
        resident: bool | None = None,
    ):
        self.dir = resolve_model(model)
        self.config = read_config(self.dir)
        self.info = model_info(self.dir)
        self.allow_other_weights = allow_other_weights
        self.other_weights: dict[str, str] = {}  # what was made for other weights, allowed: role -> its fingerprint
        self.strategy = None
        self._adapter = None
        if strategy is not None:
            self.use_strategy(strategy)
        self.adapter = adapter
        self.weights = WeightSource(self.dir)
        self.compute = compute or Compute()
        self.resident = resident  # None: the layer stack decides by memory (layerwise.py)
        self._shared: dict[str, LayerStack] = {}  # the layer stack, shared with copies (legalize's derived models)
        self._hf = None
        self._tokenizer = None

    def use_strategy(self, strategy: Strategy) -> None:
        """Attach a strategy after checking it was made for this model (its sizes and its weights)."""
        strategy.check_model(self.info)
        other = check_weights(strategy.model, self.info, "strategy", self.allow_other_weights)
        if other:
            self.other_weights["strategy"] = other
        self.strategy = strategy
        if self._adapter is not None:
            self._adapter.bind(strategy)

    @property
    def adapter(self) -> Adapter | None:
        return self._adapter

    @adapter.setter
    def adapter(self, adapter: Adapter | None) -> None:
        """Attach an adapter after checking its sizes against this model, and tell it what the
        strategy's shapes mean (SMOL's router reads the kept layers of a depth)."""
        if adapter is not None:
            adapter.check_model(self.info)
            other = check_weights(getattr(adapter, "model", None) or {}, self.info, "adapter", self.allow_other_weights)
            if other:
                self.other_weights["adapter"] = other
            if self.strategy is not None:
                adapter.bind(self.strategy)
        self._adapter = adapter

    # ------------------------------------------------------------- the model
    @property
    def n_layers(self) -> int:
        return self.info["n_layers"]

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.weights

    def hf_model(self):
        """The whole unmodified base model in the compute dtype (loaded once), for training; the
        reference forward runs layer by layer instead (`logits_many`)."""
        if self._hf is None:
            from transformers import AutoModelForCausalLM

            self._hf = AutoModelForCausalLM.from_pretrained(self.dir, dtype=self.compute.torch_dtype).eval()
        return self._hf

    def tokenizer(self):
        """The base model's tokenizer (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.dir)
            except Exception as e:  # transformers raises many types for a broken tokenizer file
                raise UserError(f"cannot load the tokenizer of {self.dir}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'unreadable'}") from None
        return self._tokenizer

    def shape_plan(self, shape: Shape) -> tuple[list[int], list[LayerWidth]]:
        if self.strategy is None:
            raise UserError("no strategy: run `amoeba-export calibrate` or pass --strategy DIR")
        shape = self.strategy.resolve(shape)
        return self.strategy.layers(shape.depth), self.strategy.width(shape.width)

    # ---------------------------------------------------------- masked forward
    def stack(self) -> LayerStack:
        """The base model as a layer stack in the compute setting (built once, shared by copies)."""
        if "stack" not in self._shared:
            self._shared["stack"] = LayerStack(self.dir, self.weights, self.compute, self.resident)
        return self._shared["stack"]

    def release(self) -> None:
        """Free a streamed stack's weights (a resident one keeps them: it is meant to)."""
        stack = self._shared.get("stack")
        if stack is not None and not stack.resident:
            stack.release()

    def layer_hooks(self, i: int, block: torch.nn.Module, lw: LayerWidth | None, shape: Shape | None) -> list:
        """Layer i's masks, compensation biases and adapter as hooks on `block` (returns the handles)."""
        device = next(block.parameters()).device  # beside the weights (a GPU when the model runs there)
        dtype = next(block.parameters()).dtype
        hooks = []

        def premask(mask):
            return lambda mod, args: (args[0] * mask,) + tuple(args[1:])

        def add(vec):
            return lambda mod, args, out: out + vec

        def lora(delta):
            return lambda mod, args, out: out + delta.apply(args[0])

        if lw is not None:
            D = self.info["head_dim"]
            heads = torch.from_numpy(np.repeat(lw.q_heads, D).astype(np.float32)).to(device, dtype)
            chans = torch.from_numpy(lw.channels.astype(np.float32)).to(device, dtype)
            o, down = block.self_attn.o_proj, block.mlp.down_proj
            hooks += [o.register_forward_pre_hook(premask(heads)), down.register_forward_pre_hook(premask(chans))]
            hooks += [o.register_forward_hook(add(torch.from_numpy(lw.o_bias).to(device, dtype))),
                      down.register_forward_hook(add(torch.from_numpy(lw.down_bias).to(device, dtype)))]
        if self.adapter is not None and shape is not None:
            for proj in PROJECTIONS:
                delta = self.adapter.delta(shape, i, proj)
                if delta is not None:
                    module = block.get_submodule(module_path(proj))
                    hooks.append(module.register_forward_hook(lora(delta.to(device))))
        return hooks

    @contextlib.contextmanager
    def masked(
        self, layers: list[int] | None = None, width: list[LayerWidth] | None = None, shape: Shape | None = None
    ):
        """The whole HF model (`hf_model`) with only `layers` active, `width` masks and biases, and
        the adapter at `shape`: what training differentiates through."""
        model = self.hf_model()
        blocks = model.model.layers
        kept = list(range(len(blocks))) if layers is None else list(layers)
        hooks = []
        try:
            for i in kept:
                hooks += self.layer_hooks(i, blocks[i], None if width is None else width[i], shape)
            model.model.layers = torch.nn.ModuleList([blocks[i] for i in kept])
            yield model
        finally:
            model.model.layers = blocks
            for h in hooks:
                h.remove()

    def logits_many(self, batches: list[torch.Tensor], shape: Shape | None = None,
                    layers: list[int] | None = None) -> Iterator[torch.Tensor]:
        """Reference logits of `shape` for each batch, in order, on the compute device (without a
        shape: the unpruned base model, or only its `layers`). Every batch goes through a layer
        before the next layer is read (layerwise.py); logits are made one batch at a time."""
        stack = self.stack()
        if shape is None:
            kept, hooks = range(self.n_layers) if layers is None else layers, None
        else:
            shape = self.strategy.resolve(shape)
            kept, width = self.shape_plan(shape)
            hooks = lambda i, block: self.layer_hooks(i, block, width[i], shape)  # noqa: E731
        states = stack.run([stack.embed(ids) for ids in batches], kept, hooks)
        with torch.inference_mode():
            for s in states:
                yield stack.logits(s.hidden)

    def logits(self, input_ids: torch.Tensor, shape: Shape | None = None) -> torch.Tensor:
        """Reference logits of `shape` for one batch, on the CPU."""
        return next(self.logits_many([input_ids], shape)).cpu()

    def logits_fn(self, shape: Shape | None = None, layers: list[int] | None = None) -> "ReferenceLogits":
        return ReferenceLogits(self, shape, None if layers is None else tuple(layers))


@dataclass(frozen=True)
class ReferenceLogits:
    """The masked reference of one shape as a logits function; `many` runs a list of batches in
    one layer-wise pass (the metrics use it)."""

    elastic: ElasticModel
    shape: Shape | None
    layers: tuple[int, ...] | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return next(self.many([ids])).cpu()

    def many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        return self.elastic.logits_many(batches, self.shape, self.layers)


def load_elastic(model=None, strategy_dir=None, adapter_path=None, allow_other_weights: bool = False,
                 compute: Compute | None = None) -> tuple[ElasticModel, Path]:
    """(the ElasticModel with its strategy and, when given, the adapter checked against the model,
    the strategy's directory): the model as every command opens it."""
    from .strategy import Strategy, locate

    elastic = ElasticModel(model, allow_other_weights=allow_other_weights, compute=compute)
    sdir = locate(elastic.info, strategy_dir)
    elastic.use_strategy(Strategy.load(sdir))
    if adapter_path is not None:
        from .adapter import load_adapter

        elastic.adapter = load_adapter(adapter_path, elastic.info)
    return elastic, sdir
