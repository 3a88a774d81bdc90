"""Configuration of a DeciLM / Nemotron-NAS checkpoint, as vLLM's `DeciLMForCausalLM` reads it.

Written by amoeba-export and copied into every per-layer vLLM artifact (`auto_map` in config.json):
neither transformers nor vLLM ships a config class for model_type "nemotron-nas", so the artifact
brings its own and loads with `trust_remote_code=True` (docs/flow-vllm.md §2). It is a LlamaConfig
plus `block_configs`, one per layer:

    {"attention": {"no_op": bool, "n_heads_in_group": int}, "ffn": {"no_op": bool, "intermediate_size": int}}

vLLM reads the blocks by attribute (`block.ffn.no_op`), so they are dicts that also answer attribute
access and still save as plain JSON. `ffn_mult` must stay absent: vLLM prefers it whenever
`hasattr(ffn, "ffn_mult")` and then rounds the width up to a multiple of 256.
"""
from transformers import LlamaConfig


class BlockConfig(dict):
    """A dict whose keys read as attributes; a missing key is an AttributeError (so hasattr is False)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _blocks(value):
    if isinstance(value, dict):
        return BlockConfig({k: _blocks(v) for k, v in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_blocks(b) for b in (block_configs or [])]
