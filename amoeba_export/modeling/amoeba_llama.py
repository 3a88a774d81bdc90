"""A LLaMA whose decoder layers each have their own head count, KV-head count and MLP width.

Stock `LlamaConfig` has one size for every layer; FLAP's adaptive selection gives each layer its
own. This module is the smallest change that fixes that: the config carries `layer_specs` (one
dict per layer) and the model builds each `LlamaDecoderLayer` from a copy of the config with that
layer's sizes. Attention, RoPE, the KV cache and `generate` are transformers' own.

This file imports nothing but transformers: exporters copy it into the artifact as
`modeling_amoeba_llama.py` with an `auto_map`, so either of these loads an export:

    import amoeba_export.modeling            # registers amoeba_llama with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(export_dir)

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)  # no amoeba-export
"""
from __future__ import annotations

import copy

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "attention_bias", "mlp_bias")


class AmoebaLlamaConfig(LlamaConfig):
    model_type = "amoeba_llama"

    def __init__(self, layer_specs: list[dict] | None = None, **kwargs):
        self.layer_specs = [dict(s) for s in (layer_specs or [])]
        super().__init__(**kwargs)
        if self.layer_specs and len(self.layer_specs) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_specs)} layer_specs for {self.num_hidden_layers} layers")

    def validate_architecture(self):
        """Per-layer head counts need not divide hidden_size (head_dim is explicit); stock
        LlamaConfig in transformers 5 insists on it, so the check is dropped here."""

    def layer_config(self, i: int) -> LlamaConfig:
        """A plain LlamaConfig with layer i's sizes, used only to build that layer."""
        cfg = copy.deepcopy(self)
        for k, v in (self.layer_specs[i] if self.layer_specs else {}).items():
            setattr(cfg, k, v)
        return cfg


class AmoebaLlamaModel(LlamaModel):
    config_class = AmoebaLlamaConfig

    def __init__(self, config: AmoebaLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config.layer_config(i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class AmoebaLlamaForCausalLM(LlamaForCausalLM):
    config_class = AmoebaLlamaConfig

    def __init__(self, config: AmoebaLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = AmoebaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register("amoeba_llama", AmoebaLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(AmoebaLlamaConfig, AmoebaLlamaForCausalLM, exist_ok=True)
