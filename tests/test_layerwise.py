"""The layer-wise masked reference forward (amoeba_export/layerwise.py) and the compute setting
(amoeba_export/compute.py): parity with the whole-model forward, one layer in memory at a time,
the DP row schedule, and device/dtype resolution (the CUDA rules are checked here on the CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

from amoeba_export import layerwise as lw
from amoeba_export.compute import Compute, resolve
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.metrics import perplexity
from amoeba_export.smol import SMOL
from trainer.depth import LayerRunner, ppl_evaluator
from trainer.width import collect_stats

TOL = 1e-5  # fp32, layer-wise against the whole model


def whole_model_logits(em: ElasticModel, ids, shape):
    """Today's reference: the whole HF model with hooks (ElasticModel.masked)."""
    layers, width = em.shape_plan(shape)
    with em.masked(layers, width, em.strategy.resolve(shape)) as m, torch.inference_mode():
        return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen", "tiny_qwen2", "tiny_mistral", "tiny_llama3"])
def test_layer_wise_matches_whole_model_on_every_shape(fixture, request):
    model = request.getfixturevalue(fixture)
    strategy = tiny.random_strategy(model, seed=5)
    streamed = ElasticModel(model, strategy, resident=False)
    ids, worst = tiny.ids(24), 0.0
    for shape in strategy.space:
        diff = (streamed.logits(ids, shape) - whole_model_logits(streamed, ids, shape)).abs().max().item()
        assert diff < TOL, (shape, diff)
        worst = max(worst, diff)
    assert not streamed.stack().resident
    print(f"\n{fixture}: {len(strategy.space)} shapes, layer-wise vs whole model max |Δlogit| {worst:.1e}")


def test_layer_wise_with_an_adapter(tiny_gqa):
    strategy = tiny.random_strategy(tiny_gqa, seed=3)
    em = ElasticModel(tiny_gqa, strategy, resident=False)
    em.adapter = SMOL.random(em.info, sorted(strategy.widths, reverse=True), n_experts=3, top_k=2, seed=1)
    ids = tiny.ids(24)
    for shape in strategy.space:
        assert (em.logits(ids, shape) - whole_model_logits(em, ids, shape)).abs().max().item() < TOL


def test_streamed_stack_holds_one_layer(tiny_gqa):
    """Streamed: while layer i runs, no other decoder layer has real weights; resident: each layer
    is read once and stays."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa), resident=False)
    stack = em.stack()
    live = []

    def count(mod, args):
        live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in stack.model.model.layers))

    handles = [b.register_forward_pre_hook(count) for b in stack.model.model.layers]
    shape = em.strategy.space.largest
    em.logits(tiny.ids(16), shape)
    assert live and set(live) == {1}
    assert all(p.device.type == "meta" for b in stack.model.model.layers for p in b.parameters())
    for h in handles:
        h.remove()

    reads = []
    resident = ElasticModel(tiny_gqa, em.strategy, resident=True)
    real_get = resident.weights.get
    resident.weights.get = lambda name: reads.append(name) or real_get(name)
    first = resident.logits(tiny.ids(16), shape)
    n = len(reads)
    assert (resident.logits(tiny.ids(16), shape) - first).abs().max() == 0
    assert len(reads) == n  # nothing read again


def test_batches_go_through_a_layer_together(tiny_gqa):
    """Metrics hand the reference every batch at once: each layer is read once per pass, and the
    numbers equal batch-by-batch calls exactly."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa), resident=False)
    shape = em.strategy.space.smallest
    windows = torch.randint(3, tiny.VOCAB, (6, 20), generator=torch.Generator().manual_seed(1))
    reads = []
    real_get = em.weights.get
    em.weights.get = lambda name: reads.append(name) or real_get(name)
    em.stack()
    reads.clear()
    together = perplexity(em.logits_fn(shape), windows, batch_size=2)
    q_reads = [r for r in reads if r.endswith("q_proj.weight")]
    assert len(q_reads) == len(set(q_reads)) == shape.depth  # one read per kept layer for 3 batches
    one_by_one = perplexity(lambda x: em.logits(x, shape), windows, batch_size=2)
    assert together == one_by_one


def test_dp_row_equals_candidates_one_by_one(tiny_gqa):
    em = ElasticModel(tiny_gqa, resident=False)
    evaluate = ppl_evaluator(LayerRunner(em.stack(), tiny.ids(20, batch=3)))
    kept = [[0, 1, 3, 5], [0, 1, 4, 5], [0, 1, 5]]
    assert evaluate.row(2, kept) == [evaluate(2, k) for k in kept]


def test_flap_statistics_layer_wise_equal_whole_model(tiny_gqa):
    """Statistics collected layer by layer equal those of hooks on the whole model, bit for bit."""
    em = ElasticModel(tiny_gqa, resident=False)
    windows = torch.randint(3, tiny.VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    got = collect_stats(em.stack(), windows, batch_size=2)
    model, acc, hooks = em.hf_model(), {}, []
    for i, block in enumerate(model.model.layers):
        for kind, mod in (("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=(kind, i): acc.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.inference_mode():
        for b in range(0, 4, 2):
            model(input_ids=windows[b:b + 2], use_cache=False)
    for h in hooks:
        h.remove()
    for (kind, i), xs in acc.items():
        x = torch.cat(xs)
        np.testing.assert_allclose(got[f"{kind}_mean"][i], x.mean(0).numpy().astype(np.float32), rtol=1e-6, atol=1e-7)


def test_half_precision_reference_is_close_and_labelled(tiny_gqa):
    """bf16 compute runs the same code as a GPU run would (only the device differs)."""
    strategy = tiny.random_strategy(tiny_gqa)
    fp32 = ElasticModel(tiny_gqa, strategy)
    bf16 = ElasticModel(tiny_gqa, strategy, compute=Compute("cpu", "bfloat16"), resident=False)
    ids, shape = tiny.ids(24), strategy.space.largest
    a, b = fp32.logits(ids, shape), bf16.logits(ids, shape)
    assert b.dtype == torch.bfloat16 and next(bf16.stack().model.lm_head.parameters()).dtype == torch.bfloat16
    diff = (a - b.float()).abs().max().item()
    assert 0 < diff < Compute("cpu", "bfloat16").reference_error


def test_resolve_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve() == Compute("cpu", "float32")
    assert resolve("cpu", "bfloat16") == Compute("cpu", "bfloat16")
    for bad, msg in ((("gpu", "auto"), "use auto, cpu, cuda or cuda:N"), (("cuda:x", "auto"), "use auto, cpu"),
                     (("cpu", "fp8"), "--compute-dtype 'fp8'")):
        with pytest.raises(UserError, match=msg):
            resolve(*bad)
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        resolve("cuda", "auto")
    # A machine with two GPUs: auto picks CUDA in bf16, an index past the last is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve() == Compute("cuda:0", "bfloat16")
    assert resolve("cuda:1", "float32") == Compute("cuda:1", "float32")
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        resolve("cuda:2")


def test_resident_follows_free_memory(tiny_gqa, monkeypatch):
    monkeypatch.setattr(lw, "available_bytes", lambda c: 10**12)
    assert ElasticModel(tiny_gqa).stack().resident
    monkeypatch.setattr(lw, "available_bytes", lambda c: 1000)
    assert not ElasticModel(tiny_gqa).stack().resident


def test_verify_frees_a_streamed_reference_before_the_artifact_loads(tiny_gqa):
    """The reference and the artifact's runtime never hold memory together."""
    from amoeba_export.pipeline import verify

    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa), resident=False)
    shape = em.strategy.space.smallest
    seen = {}

    def load():
        seen["real"] = [n for n, p in em.stack().model.named_parameters() if p.device.type != "meta"]
        return lambda ids: em.logits(ids, shape)

    parity = verify(em, shape, load)
    assert seen["real"] == [] and parity["max_abs_logit_diff"] == 0.0
    assert parity["reference_forward"] == "layer by layer"


def test_pytorch_artifact_is_verified_layer_by_layer_when_large(tiny_gqa, tmp_path, monkeypatch):
    """The pytorch flow's verify reads the exported directory as a layer stack: streamed when it
    does not fit, with the same logits as when it stays loaded."""
    from test_export_parity import export

    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    shape, ids = em.strategy.space.smallest, tiny.ids(24)
    _, resident = export(em, shape, tmp_path / "a")
    want = resident(ids)
    monkeypatch.setattr(lw, "available_bytes", lambda c: 1000)
    from amoeba_export.flows.pytorch import writer as pytorch

    streamed = pytorch.load(tmp_path / "a")
    assert (streamed(ids) - want).abs().max().item() == 0.0
    assert (want - em.logits(ids, shape)).abs().max().item() < 1e-4
