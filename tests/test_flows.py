"""The flow registry: one object per flow, resolved once, and artifacts unchanged by how flows are organised."""
import hashlib
import json
from pathlib import Path

import pytest
import tiny

import targets
from amoeba_export import flows
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.legalize import legalize
from amoeba_export.materialize import materialize

# sha256 of every file the five original writers emit for one tiny model (a uniform and a per-layer
# shape), recorded with the code before flows became objects (commit ebec3da). A writer that changes
# a byte fails here; if a change is meant, regenerate the file and say why in the commit.
GOLDEN = Path(__file__).parent / "data" / "artifact_sha256.json"


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    """head_dim 32: in TensorRT-LLM's kernel set, so every original flow can take it."""
    root = tmp_path_factory.mktemp("golden")
    model = tiny.make_tiny_model(root / "m", layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, ff=96)
    return ElasticModel(model, tiny.random_strategy(model))


def test_registry_holds_one_object_per_flow():
    assert list(flows.FLOWS) == list(targets.FLOWS)
    for name, flow in flows.FLOWS.items():
        assert flow.name == name and str(flow) == name
        assert (flow.open is None) != (flow.profile is None)  # timed by the shared step loop, or its own way
    with pytest.raises(UserError, match="unknown flow 'tflite'"):
        flows.get_flow("tflite")


def test_artifacts_are_byte_identical_to_the_original_writers(golden_model, tmp_path):
    em = golden_model
    want = json.loads(GOLDEN.read_text())
    got = {}
    for name in ("pytorch", "onnx", "gguf", "trtllm", "mlc"):
        flow = flows.FLOWS[name]
        for which, shape in (("largest", em.strategy.space.largest), ("smallest", em.strategy.space.smallest)):
            dense, _ = legalize(materialize(em, shape), flow.caps, flow=name)
            out = tmp_path / f"{name}-{which}"
            out.mkdir()
            emitted = flow.emit(dense, out, em.dir, **({"genai": False} if name == "onnx" else {}))
            got.update({f"{name}-{which}/{f}": hashlib.sha256((out / f).read_bytes()).hexdigest()
                        for f in emitted.files if f != "onnx_config.json"})  # it records whether genai/ was built
    assert got == want


def test_the_command_line_resolves_the_flow_once(setup_cli, capsys, tmp_path, monkeypatch):
    """Every lookup of a flow by name goes through `get_flow`; the walk from the command line to the
    emitted, verified artifact calls it once."""
    model, sdir = setup_cli
    calls = []
    real = flows.get_flow
    monkeypatch.setattr(flows, "get_flow", lambda name: calls.append(name) or real(name))
    code, _, err = tiny.run_cli(
        capsys,
        "--target",
        "host",
        "--flow",
        "onnx",
        "--shape",
        "5x0.75",
        "--model",
        str(model),
        "--strategy",
        str(sdir),
        "--out",
        str(tmp_path / "a"),
        "--json",
    )
    assert code == 0, err
    assert calls == ["onnx"]


@pytest.fixture(scope="module")
def setup_cli(tmp_path_factory, tiny_gqa):
    sdir = tmp_path_factory.mktemp("flows-cli") / "strategy"
    tiny.random_strategy(tiny_gqa).save(sdir)
    return tiny_gqa, sdir
