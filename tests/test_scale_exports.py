"""Bounded memory at scale, checked on tiny models by counting bytes, not by timing.

Every exporter reads `DenseModel.tensors()` one tensor at a time; here each yielded tensor is
tracked (a weak reference) and the largest number of bytes alive at once is compared with one
layer's weights. The artifact side of the NumPy check (the MLC and TensorRT-LLM `load`) is tracked
the same way through the arrays its lazy readers hand out. A deep tiny model makes "one layer" much
less than "the whole model", so holding everything fails these tests (the ONNX exporter's
in-memory route, kept for small models, is the counter-example).
"""
import weakref

import numpy as np
import pytest
import tiny
import torch

from amoeba_export import numpy_llama
from amoeba_export.elastic import ElasticModel
from amoeba_export.flows.gguf import writer as gguf
from amoeba_export.flows.mlc import writer as mlc
from amoeba_export.flows.onnx import writer as ox
from amoeba_export.flows.pytorch import writer as pytorch
from amoeba_export.flows.trtllm import writer as trtllm
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape

LAYERS = 10


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """An untied GQA model deep enough that one layer is a small part of it, full width and depth."""
    d = tiny.make_tiny_model(tmp_path_factory.mktemp("deep"), layers=LAYERS, hidden=128, heads=4, kv_heads=2,
                             head_dim=32, ff=256, tied=False, seed=5)  # head_dim 32: a TensorRT-LLM kernel size
    em = ElasticModel(d, tiny.random_strategy(d, widths=(1.0,), seed=1, min_depth=SHALLOW))
    return em, Shape(LAYERS, 1.0)


SHALLOW = 4  # the ONNX tests' depth (torch.onnx's export time grows with the layers)


class Live:
    """Bytes of tracked objects alive now, and the most alive at once."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, obj, nbytes: int):
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(obj, self._gone, nbytes)
        return obj

    def _gone(self, nbytes: int):
        self.now -= nbytes


def tracked(dense) -> Live:
    live = Live()
    stream = dense.tensors

    def tensors():
        for name, t in stream():
            yield name, live.track(t, t.numel() * t.element_size())

    dense.tensors = tensors
    return live


def layer_bytes(dense) -> tuple[int, int, int]:
    """(one layer's bytes, the largest single tensor's, the whole model's) in the dense dtype."""
    item = torch.empty((), dtype=dense.dtype).element_size()
    sizes = {n: int(np.prod(s)) * item for n, s in dense.tensor_specs()}
    per_layer = max(
        sum(v for n, v in sizes.items() if n.startswith(f"model.layers.{j}.")) for j in range(len(dense.layers))
    )
    return per_layer, max(sizes.values()), sum(sizes.values())


FLOWS = [
    ("pytorch", None), ("gguf", None), ("gguf", "q8_0"), ("mlc", "q0f32"), ("mlc", "q4f32_1"), ("trtllm", None),
    ("onnx-external", None),
]


@pytest.mark.parametrize("flow,quant", FLOWS, ids=[f"{f}-{q}" if q else f for f, q in FLOWS])
def test_exporters_hold_about_one_layer(deep, tmp_path, monkeypatch, flow, quant):
    em, shape = deep
    if flow.startswith("onnx"):
        shape = Shape(SHALLOW, 1.0)
    dense = materialize(em, shape)
    layer, largest, total = layer_bytes(dense)
    assert layer + largest < total / 3  # the model is deep enough for the bound to mean something
    live = tracked(dense)
    if flow == "onnx-external":
        monkeypatch.setattr(ox, "LARGE_BYTES", 0)  # the streamed route, taken past protobuf's limit
        files = ox.emit(dense, tmp_path, em.dir, genai=False).files
        assert ox.DATA_FILE in files
    else:
        exporter = {"pytorch": pytorch, "gguf": gguf, "mlc": mlc, "trtllm": trtllm}[flow]
        exporter.emit(dense, tmp_path, em.dir, quant=quant)
    # one layer (MLC and TensorRT-LLM hold q/k/v until all three are there) plus the tensor the
    # producer's frame still refers to
    assert live.peak <= layer + largest, (live.peak, layer, largest, total)


def test_onnx_in_memory_route_is_not_bounded(deep, tmp_path):
    """The counter-example: below LARGE_BYTES the ONNX graph is built with the real weights in memory."""
    em, _ = deep
    shape = Shape(SHALLOW, 1.0)
    dense = materialize(em, shape)
    layer, largest, total = layer_bytes(dense)
    live = tracked(dense)
    ox.emit(dense, tmp_path, em.dir, genai=False)
    assert live.peak > layer + largest


def test_onnx_streamed_route_matches_in_memory(deep, tmp_path, monkeypatch):
    """The graph traced from placeholders, weights streamed into model.onnx.data, computes what the
    in-memory route's graph computes, exactly; tensors are 64 KiB aligned."""
    em, _ = deep
    shape = Shape(SHALLOW, 1.0)
    ids = tiny.ids(12, batch=2, seed=3)
    small, large = tmp_path / "inline", tmp_path / "external"
    small.mkdir(), large.mkdir()
    for dtype in ("float16",):
        ox.emit(materialize(em, shape, dtype), small, em.dir, genai=False)
        monkeypatch.setattr(ox, "LARGE_BYTES", 0)
        ox.emit(materialize(em, shape, dtype), large, em.dir, genai=False)
        monkeypatch.undo()
        got = [ox.step(ox.session(d / ox.MODEL_FILE), ids.numpy(), ox.empty_past(ox.read_config(d), 2))[0]
               for d in (small, large)]
        assert np.array_equal(got[0], got[1]), dtype
    import onnx

    model = onnx.load(str(large / ox.MODEL_FILE), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % ox.DATA_ALIGN == 0 for o in offsets)
    assert (ox.load(large)(ids) - em.logits(ids, shape)).abs().max().item() < 1e-2  # float16


class TrackedWeights(numpy_llama.LazyWeights):
    live: Live

    def __getitem__(self, name):
        arr = super().__getitem__(name)  # each name is looked up once per forward
        return self.live.track(arr, arr.nbytes)


@pytest.mark.parametrize("flow,quant", [("trtllm", None), ("mlc", "q0f32"), ("mlc", "q4f32_1")])
def test_numpy_check_reads_one_layer_at_a_time(deep, tmp_path, monkeypatch, flow, quant):
    """verify's artifact side for the flows without a runtime here: the arrays the lazy reader hands
    out, alive at once, stay within two layers (one, plus the fused q/k/v split kept for its parts)
    or the output projection, and the logits are those of the same forward over every array read
    up front (and, unquantised, the reference's)."""
    em, shape = deep
    dense = materialize(em, shape)
    exporter = {"trtllm": trtllm, "mlc": mlc}[flow]
    exporter.emit(dense, tmp_path, em.dir, quant=quant)
    live = Live()
    TrackedWeights.live = live
    monkeypatch.setattr(numpy_llama, "LazyWeights", TrackedWeights)
    captured = {}
    real_logits_fn = numpy_llama.logits_fn

    def capture(weights, cfg):
        captured.update(w=weights, cfg=cfg)
        return real_logits_fn(weights, cfg)

    monkeypatch.setattr(numpy_llama, "logits_fn", capture)  # both checks reach it through uniform_logits_fn
    logits = exporter.load(tmp_path)
    ids = tiny.ids(10, batch=2, seed=2)
    got = logits(ids)
    layer, largest, total = layer_bytes(dense)  # float32 here, as the check computes
    assert 0 < live.peak <= 2 * layer + largest, (live.peak, layer, largest, total)
    eager = numpy_llama.forward(dict(captured["w"].items()), captured["cfg"], ids.numpy())
    assert np.array_equal(got.numpy(), eager)
    if quant != "q4f32_1":
        assert (got - em.logits(ids, shape)).abs().max().item() < 1e-3


def test_onnx_load_runs_large_models_in_low_memory_mode(deep, tmp_path, monkeypatch):
    """verify's session for a graph with external data: no optimisations (no float32 copy of every
    float16 weight at load), priority order, no arena; a one-file graph keeps the optimised session."""
    em, _ = deep
    shape = Shape(SHALLOW, 1.0)
    opened = []
    real = ox.session
    monkeypatch.setattr(ox, "session", lambda path, threads=None, low_memory=False:
                        opened.append(low_memory) or real(path, threads, low_memory))
    ids = tiny.ids(8, batch=1, seed=5)
    small, large = tmp_path / "inline", tmp_path / "external"
    small.mkdir(), large.mkdir()
    ox.emit(materialize(em, shape), small, em.dir, genai=False)
    with monkeypatch.context() as m:
        m.setattr(ox, "LARGE_BYTES", 0)
        ox.emit(materialize(em, shape), large, em.dir, genai=False)
    a, b = ox.load(small)(ids), ox.load(large)(ids)
    assert opened == [False, True]
    assert (a - b).abs().max().item() < 1e-4
