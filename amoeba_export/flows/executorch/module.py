"""The module the ExecuTorch writer exports: the dense model's transformers layers, run with a static
KV cache that ExecuTorch's LLM custom operators write and read (docs/flow-executorch.md §2).

`llama::update_cache(value, cache, start_pos)` copies `value` [B, T, H, D] into the cache
[B, max_cache_len, H, D] at slots start_pos .. start_pos+T-1, in place; `llama::custom_sdpa(q, k_cache,
v_cache, start_pos, None, 0, True, scale)` is causal attention of q [B, T, Hq, D] at positions
start_pos.. over the cache's slots 0 .. start_pos+t (grouped-query heads: query head i reads KV head
i // (Hq // Hkv)). Each is one kernel in the program, where the stock static cache needs an
`index_put`, a mask and a repeat of the KV heads, none of which XNNPACK takes: the lowering then cut
every layer into several delegated pieces (docs/flow-executorch.md §5).

Each layer owns its cache buffers, shaped by its own KV-head count.
"""
from __future__ import annotations

import torch


def load_custom_ops() -> None:
    """Register the `llama::` operators with torch (for export) and their kernels with the ExecuTorch
    runtime (the program calls them by name). One import does both."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class CachedLM(torch.nn.Module):
    """forward(input_ids int64 [B, T], cache_position int64 [T]) -> logits [B, T, vocab]: the tokens
    are written to cache slots cache_position[0] .. +T-1 (contiguous), which are also their positions."""

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int):
        super().__init__()
        load_custom_ops()
        self.model = model  # transformers LlamaForCausalLM / AmoebaLlamaForCausalLM, eval mode
        self.cache_len = cache_len
        dtype = model.lm_head.weight.dtype
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            shape = (batch, cache_len, attn.k_proj.out_features // attn.head_dim, attn.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=dtype), persistent=False)

    def cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        lm = self.model.model
        B, T = input_ids.shape
        start = cache_position[0].item()
        torch._check_is_size(start)
        torch._check(start + T <= self.cache_len)
        h = lm.embed_tokens(input_ids)
        cos, sin = lm.rotary_emb(h, cache_position[None, :])  # [1, T, D], RoPE scaling included
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            D = attn.head_dim
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, -1, D)
            k = attn.k_proj(x).view(B, T, -1, D)
            v = attn.v_proj(x).view(B, T, -1, D)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # heads on dim 2 here
            k_cache, v_cache = self.cache(i)
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True, attn.scaling)
            h = h + attn.o_proj(o.reshape(B, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(lm.norm(h))
