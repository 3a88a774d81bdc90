"""SMOL as trainable parameters, and the elastic model's masked forward with the mixture applied.

`Mixture` holds a SMOL adapter's router and experts as `nn.Parameter`s. Its gate is the one of
docs/amoeba-algorithm.md §5, differentiable: z = W2(W1 x + b1) + b2, plus ε ⊙ softplus(Wn x + bn) while training
(ε from the step's generator), top-k, softmax over the selected experts. Gradients reach the
selected experts through the mixed weights and the router through g (the noise scale through the
noisy logits), as upstream trains them; unselected experts get none that step. One expert with
top-1 is a plain LoRA: g = 1 for every shape.

`Supernet` is the training forward: the frozen base model under `ElasticModel.masked` (kept layers,
head and channel masks, compensation biases; nothing is materialised) plus, on every adapted
projection of a kept layer, `y += s · B_mix (A_mix x)` with A_mix = Σ g_i A_i and B_mix = Σ g_i B_i.
It is the same computation as the masked reference forward with the exported SMOL attached
(tested), so what is trained is what is exported.

The hooks and the layer selection exist only during the forward call, so activation
recomputation (gradient checkpointing), which replays the forward during backward, cannot be used.
"""
from __future__ import annotations

import torch
from torch import nn

from amoeba_export.adapter import weight_name
from amoeba_export.elastic import ElasticModel
from amoeba_export.shapes import Shape
from amoeba_export.smol import ROUTER, SMOL, affine_router


def _name(key) -> str:
    return f"{key[0]}_{key[1]}"


class Mixture(nn.Module):
    def __init__(self, smol: SMOL):
        super().__init__()
        self.spec = smol  # configuration, router input, kept layers; its tensors are copied below
        self.router = nn.ParameterDict({k: nn.Parameter(smol.router[k].detach().clone().float()) for k in ROUTER})
        self.keys = sorted(smol.experts, key=lambda k: (k[0], k[1]))
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for key in self.keys:
            A, B = smol.experts[key]
            self.A[_name(key)] = nn.Parameter(A.detach().clone().float())
            self.B[_name(key)] = nn.Parameter(B.detach().clone().float())

    def route(self, shape: Shape, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights of the selected experts, their indices): differentiable in the router."""
        spec = self.spec
        z, noise = affine_router(
            self.router, spec.router_input(spec.kept_layers(shape), shape.width).to(self.router["w1"].device)
        )
        if generator is not None:
            z = z + torch.randn(z.shape, generator=generator).to(z.device) * noise
        top = torch.topk(z, spec.top_k)
        return torch.softmax(top.values, dim=0), top.indices

    def mixed(self, key, g: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_mix [r, in], B_mix [out, r]) of one projection."""
        A, B = self.A[_name(key)], self.B[_name(key)]
        return torch.einsum("k,kri->ri", g, A[chosen]), torch.einsum("k,kor->or", g, B[chosen])

    def to_smol(self, meta: dict | None = None) -> SMOL:
        """The current parameters as a SMOL adapter (CPU, detached; attaching it to a model binds it)."""
        spec = self.spec
        return SMOL(
            r=spec.r,
            alpha=spec.alpha,
            scale=spec.scale,
            top_k=spec.top_k,
            n_layers=spec.n_layers,
            width_choice=list(spec.width_choice),
            router={k: v.detach().cpu().clone() for k, v in self.router.items()},
            experts={
                key: (self.A[_name(key)].detach().cpu().clone(), self.B[_name(key)].detach().cpu().clone())
                for key in self.keys
            },
            model=dict(spec.model),
            meta={**spec.meta, **(meta or {})},
        )


class Supernet(nn.Module):
    """The frozen base model (a submodule, so accelerate places and wraps it) and the mixture."""

    def __init__(self, elastic: ElasticModel, mixture: Mixture):
        super().__init__()
        if elastic.adapter is not None:
            raise ValueError("train on the model without an adapter attached")
        self.base = elastic.hf_model()  # in eval mode, and kept there: no dropout in the frozen base
        self.base.requires_grad_(False)
        self.mixture = mixture
        self._elastic = elastic
        mixture.spec.bind(elastic.strategy)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, shape: Shape,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits [B, T, V] of `shape`: noisy gate with a generator (training), deterministic without."""
        elastic, mixture = self._elastic, self.mixture
        layers, width = elastic.shape_plan(shape)
        g, chosen = mixture.route(elastic.strategy.resolve(shape), generator)
        scale = mixture.spec.scale
        hooks = []

        def lora(A, B):
            return lambda mod, args, out: out + (scale * ((args[0].to(A.dtype) @ A.T) @ B.T)).to(out.dtype)

        kept = set(layers)
        modules = {key: self.base.get_submodule(weight_name(*key).removesuffix(".weight"))  # before masked() renumbers
                   for key in mixture.keys if key[0] in kept}
        with elastic.masked(layers, width) as model:
            try:
                for key, module in modules.items():
                    hooks.append(module.register_forward_hook(lora(*mixture.mixed(key, g, chosen))))
                return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            finally:
                for h in hooks:
                    h.remove()
