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
    return tiny.make_tiny_model(
        tmp_path_factory.mktemp("tiny_qwen"), hidden=96, heads=6, kv_heads=3, tied=False, qkv_bias=True, seed=1
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A real `qwen2` model type (q/k/v biases, no o_proj bias), tied embeddings."""
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), model_type="qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    return tiny.make_tiny_model(
        tmp_path_factory.mktemp("tiny_mistral"), model_type="mistral", tied=False, seed=3, sliding_window=None
    )


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory):
    """Llama-3.1 style: untied, GQA, rope_type llama3 scaling."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_llama3"), tied=False, seed=4, rope_parameters=rope)


@pytest.fixture(scope="session")
def default_elastic():
    """The real default model (SmolLM2-135M-Instruct) with its shipped strategy, loaded once for the
    slow tests (they only read it)."""
    from amoeba_export.elastic import ElasticModel
    from amoeba_export.strategy import SHIPPED, Strategy

    return ElasticModel(None, Strategy.load(SHIPPED / "smollm2-135m-instruct"))
