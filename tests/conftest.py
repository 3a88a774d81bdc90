import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    """GQA (4 query / 2 KV heads), tied embeddings, no biases."""
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_gqa"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """Untied embeddings, q/k/v biases (Qwen2-style), 6 query / 3 KV heads, large rope_theta."""
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_qwen"), hidden=96, heads=6, kv_heads=3, tied=False, qkv_bias=True, seed=1)
