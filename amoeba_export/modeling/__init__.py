"""Model definitions for the PyTorch flow (registered with transformers' Auto classes on import)."""
from .amoeba_llama import LAYER_KEYS, AmoebaLlamaConfig, AmoebaLlamaForCausalLM

__all__ = ["AmoebaLlamaConfig", "AmoebaLlamaForCausalLM", "LAYER_KEYS"]
