"""Legalize: shapes a flow cannot express become ones it can, exactly where it says so, and it says what it did."""
import json
from dataclasses import replace

import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows.pytorch import writer as pytorch
from amoeba_export.legalize import legalize
from amoeba_export.materialize import materialize
from amoeba_export.metrics import perplexity
from amoeba_export.shapes import Shape
from amoeba_export.shared_types import FlowCaps

TOL = 1e-4
UNIFORM_ONLY = FlowCaps(per_layer=False, o_down_bias=True, quants=("float32", "q8_0"), align={"q8_0": 32})
IDS = torch.randint(3, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def diff(em, shape, dense):
    with torch.inference_mode():
        return (pytorch.in_memory(dense)(IDS).logits - em.logits(IDS, shape)).abs().max().item()


def per_layer_shapes(em):
    return [s for s in em.strategy.space if not materialize(em, s).uniform]


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen"])
def test_pad_is_exact_and_uniform(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))
    shapes = per_layer_shapes(em)
    assert shapes
    for shape in shapes:
        before = materialize(em, shape)
        dense, report = legalize(before, UNIFORM_ONLY, flow="test", layout="auto")
        assert report.layout == "pad" and dense.uniform
        assert report.padded_parameters == dense.parameters() - before.parameters() > 0
        assert report.padded["zero_query_heads"] + report.padded["zero_channels"] > 0
        assert diff(em, shape, dense) < TOL
        assert "legalize" in dense.record


def test_pad_for_the_stock_class(tiny_qwen, tmp_path):
    """PyTorch: padding makes a per-layer shape loadable by stock LlamaForCausalLM (heads divide hidden)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    shape = per_layer_shapes(em)[0]
    dense, report = legalize(materialize(em, shape), pytorch.CAPS, flow="pytorch", layout="pad")
    assert dense.uniform and pytorch.stock_class(dense) and dense.hidden_size % dense.layers[0].n_heads == 0
    pytorch.emit(dense, tmp_path, em.dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is LlamaForCausalLM
    with torch.inference_mode():
        assert (model(IDS).logits - em.logits(IDS, shape)).abs().max().item() < TOL
    # the default for pytorch keeps per-layer sizes (no padding cost)
    native, rep = legalize(materialize(em, shape), pytorch.CAPS, flow="pytorch")
    assert rep.layout == "native" and not native.uniform and rep.padded_parameters == 0


def test_native_rounds_channels_to_the_quant_block(tiny_gqa):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    caps = FlowCaps(per_layer=True, o_down_bias=True, quants=("float32", "q8_0"), align={"q8_0": 32})
    shape = per_layer_shapes(em)[0]
    dense, report = legalize(materialize(em, shape), caps, flow="test", quant="q8_0")
    assert report.layout == "native" and all(s.n_ff % 32 == 0 for s in dense.layers)
    assert report.padded["zero_channels"] > 0 and diff(em, shape, dense) < TOL
    plain, r = legalize(materialize(em, shape), caps, flow="test", quant="float32")
    assert r.padded_parameters == 0 and r.changes == ["none: the flow takes the shape as it is"]


def test_refusals_are_one_clear_line(tiny_gqa):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    shape = per_layer_shapes(em)[0]
    dense = materialize(em, shape)
    with pytest.raises(UserError, match="needs the same sizes in every layer.*--layout pad"):
        legalize(dense, UNIFORM_ONLY, flow="mlc", layout="native")
    with pytest.raises(UserError, match="head_dim 16 is not in flow 'trt'"):
        legalize(dense, replace(UNIFORM_ONLY, head_dims=(32, 64, 128)), flow="trt")
    with pytest.raises(UserError, match="cannot write 'q4_k_m'"):
        legalize(dense, UNIFORM_ONLY, flow="x", quant="q4_k_m")
    with pytest.raises(UserError, match="unknown layout"):
        legalize(dense, UNIFORM_ONLY, flow="x", layout="squeeze")


def _ppl(dense):
    with torch.inference_mode():
        model = pytorch.in_memory(dense)
        return perplexity(lambda x: model(input_ids=x, use_cache=False).logits, IDS)


def test_biases_dropped_only_measured_or_refused(tiny_gqa, tiny_qwen):
    no_bias = FlowCaps(per_layer=False, o_down_bias=False)
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    shape = Shape(em.strategy.space.depths[-1], 0.5)
    with pytest.raises(UserError, match="--strict refuses"):
        legalize(materialize(em, shape), no_bias, flow="mlc", strict=True)
    dense, report = legalize(materialize(em, shape), no_bias, flow="mlc", perplexity=_ppl)
    assert not any(s.attn_bias or s.mlp_bias for s in dense.layers)
    d = report.dropped_bias
    assert d["perplexity_before"] == pytest.approx(_ppl(legalize(materialize(em, shape), UNIFORM_ONLY, flow="x")[0]))
    assert d["delta"] == pytest.approx(d["perplexity_after"] - d["perplexity_before"]) and d["delta"] != 0
    assert any("dropped o_proj/down_proj biases (held-out perplexity" in c for c in report.changes)
    assert diff(em, shape, dense) > 1e-3  # really dropped: no longer the reference
    # q/k/v biases of the base model cannot be dropped at all
    emq = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    with pytest.raises(UserError, match="base model has q_proj biases"):
        legalize(materialize(emq, Shape(emq.strategy.space.depths[-1], 0.5)), no_bias, flow="mlc", perplexity=_ppl)


def test_uniform_reselects_and_matches_its_own_reference(tiny_qwen):
    from trainer.width import collect_stats

    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    em.strategy.stats = collect_stats(em.stack(), torch.randint(3, tiny.VOCAB, (4, 32)), batch_size=2)
    shape = per_layer_shapes(em)[0]
    before = materialize(em, shape)
    dense, report = legalize(before, UNIFORM_ONLY, flow="test", layout="uniform", perplexity=_ppl)
    assert dense.uniform and report.layout == "uniform"
    r = report.reselected
    assert r["perplexity_before"] == pytest.approx(_ppl(before)) and r["perplexity_after"] == pytest.approx(_ppl(dense))
    real = [sum(c is not None for c in p.channels) for p in dense.source.plans]
    assert len(set(real)) == 1 and real[0] == r["channels"]
    # the artifact is checked against the re-selected model's own masked forward
    with torch.inference_mode():
        got = pytorch.in_memory(dense)(IDS).logits
    assert (got - dense.source.elastic.logits(IDS, shape)).abs().max().item() < TOL
    assert (got - em.logits(IDS, shape)).abs().max().item() > 1e-3
    assert (
        em.strategy.widths[shape.width] is not dense.source.elastic.strategy.widths[shape.width]
    )  # original untouched
    em.strategy.stats = {}
    with pytest.raises(UserError, match="no calibration statistics"):
        legalize(before, UNIFORM_ONLY, flow="test", layout="uniform")


def test_cli_pad_layout_writes_the_report(tiny_qwen, tmp_path, capsys):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    sdir = tmp_path / "strategy"
    em.strategy.save(sdir)
    shape = per_layer_shapes(em)[0]
    out = tmp_path / "out"
    code, stdout, err = tiny.run_cli(capsys, "--target", "host", "--flow", "pytorch", "--shape", str(shape),
                                     "--model", str(tiny_qwen), "--strategy", str(sdir), "--layout", "pad",
                                     "--out", str(out), "--no-build")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["legalize"]["layout"] == "pad" and m["legalize"]["padded_parameters"] > 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert m["parity"]["max_abs_logit_diff"] < TOL
    assert "legalize: padded" in stdout
    code, _, err = tiny.run_cli(capsys, "--target", "host", "--flow", "pytorch", "--shape", str(shape),
                                "--model", str(tiny_qwen), "--strategy", str(sdir), "--dtype", "q8_0",
                                "--out", str(tmp_path / "bad"))
    assert code == 2 and "cannot write dtype 'q8_0'" in err and not (tmp_path / "bad").exists()
