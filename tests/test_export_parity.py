"""Exported HF directories reproduce the masked reference forward, for every shape."""
import json

import pytest
import tiny
import torch

from amoeba_export.adapter import PROJECTIONS, LoRA, LoRADelta, weight_name
from amoeba_export.elastic import ElasticModel
from amoeba_export.flows import FLOWS
from amoeba_export.flows.pytorch import writer as pytorch
from amoeba_export.io import safetensors_header
from amoeba_export.materialize import materialize
from amoeba_export.pipeline import compile_shape

TOL = 1e-4


def export(em, shape, out):
    dense = materialize(em, shape)
    out.mkdir(parents=True)
    pytorch.emit(dense, out, em.dir)
    return dense, pytorch.load(out)


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen", "tiny_qwen2", "tiny_mistral", "tiny_llama3"])
def test_every_shape_matches_reference(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))
    ids = torch.randint(
        3, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(0)
    )  # > 16: RoPE scaling matters
    kinds = set()
    for shape in em.strategy.space:
        dense, logits = export(em, shape, tmp_path / str(shape))
        diff = (em.logits(ids, shape) - logits(ids)).abs().max().item()
        assert diff < TOL, (shape, diff)
        cfg = json.loads((tmp_path / str(shape) / "config.json").read_text())
        kinds.add(cfg["model_type"])
        assert cfg["model_type"] == ("llama" if pytorch.stock_class(dense) else "amoeba_llama")
        # headers written up front match what was streamed
        hdr = safetensors_header(tmp_path / str(shape) / "model.safetensors")
        assert {k: tuple(v["shape"]) for k, v in hdr.items() if k != "__metadata__"} == dict(dense.tensor_specs())
    assert kinds == {"llama", "amoeba_llama"}  # both layouts exercised
    if fixture == "tiny_llama3":
        cfg = json.loads((tmp_path / str(em.strategy.space.largest) / "config.json").read_text())
        assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    # the pruned shapes really differ from the full model (the masks are not a no-op)
    small = em.strategy.space.smallest
    assert (em.logits(ids, small) - em.logits(ids)).abs().max() > 1e-2


def test_lora_adapter_merge_matches_unmerged_reference(tiny_qwen, tmp_path):
    g = torch.Generator().manual_seed(7)
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=4))
    w = em.weights
    deltas = {}
    for layer in range(em.n_layers):
        for proj in PROJECTIONS:
            out_f, in_f = w.shape(weight_name(layer, proj))
            deltas[(layer, proj)] = LoRADelta(
                torch.randn(4, in_f, generator=g) * 0.3, torch.randn(out_f, 4, generator=g) * 0.3, 0.25
            )
    em.adapter = LoRA(deltas)
    ids = torch.randint(3, tiny.VOCAB, (1, 9), generator=g)
    for shape in em.strategy.space:
        _, logits = export(em, shape, tmp_path / str(shape))
        ref = em.logits(ids, shape)
        assert (ref - logits(ids)).abs().max().item() < TOL, shape
    em_plain = ElasticModel(tiny_qwen, em.strategy)
    assert (em_plain.logits(ids, shape) - ref).abs().max() > 1e-2  # the adapter changed the model


def test_uniform_export_uses_stock_class_and_generates(tiny_gqa, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    shape = em.strategy.space.largest
    export(em, shape, tmp_path / "u")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    assert type(model) is LlamaForCausalLM
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_per_layer_model_generates_with_kv_cache(tiny_qwen, tmp_path):
    """generate (KV cache, per-layer KV head counts) equals a greedy loop without cache."""
    from transformers import AutoModelForCausalLM

    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=5))
    shape = em.strategy.space.smallest
    dense, _ = export(em, shape, tmp_path / "p")
    assert not dense.uniform
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ids = torch.tensor([[4, 9, 11, 20]])
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_export_is_deterministic_and_complete(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    shape = sorted(em.strategy.space)[0]
    target = {"name": "host", "flows": ["pytorch"]}
    a = compile_shape(em, shape, FLOWS["pytorch"], target, tmp_path / "a").manifest
    b = compile_shape(em, shape, FLOWS["pytorch"], target, tmp_path / "b").manifest
    assert a["files"] == b["files"]  # byte-identical artifacts (sha256 of every file)
    assert a["parity"]["max_abs_logit_diff"] < TOL and a["parity"]["greedy_token_agreement"] == 1.0
    assert a["shape"] == str(shape) and len(a["layers"]) == shape.depth
    assert set(a["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_export_leaves_nothing(tiny_gqa, tmp_path, monkeypatch):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    shape = em.strategy.space.smallest

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("amoeba_export.flows.pytorch.writer.copy_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        compile_shape(em, shape, FLOWS["pytorch"], {"name": "host", "flows": ["pytorch"]}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_materialize_pads_uneven_gqa_groups_exactly(tiny_qwen):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    shape = em.strategy.space.smallest
    dense = materialize(em, shape)
    for spec, plan in zip(dense.layers, dense.source.plans):
        assert spec.n_heads % spec.n_kv_heads == 0  # every runtime's GQA mapping holds
        assert spec.n_heads >= 1 and spec.n_ff >= 1
    assert dense.record["padding"]["zero_query_heads"] > 0
    # layer 1 of the random strategy has no head left; it must still be a 1-head (zero) block
    if 1 in dense.record["source_layers"]:
        j = dense.record["source_layers"].index(1)
        assert dense.layers[j].n_heads == 1 and dense.record["kept_query_heads"][j] == []


def test_per_layer_export_loads_with_remote_code_alone(tiny_gqa, tmp_path):
    """A per-layer artifact is self-contained: a clean interpreter that never imports amoeba_export
    loads it with trust_remote_code=True and computes the same logits."""
    import subprocess
    import sys
    import textwrap

    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=6))
    shape = em.strategy.space.smallest
    dense, logits = export(em, shape, tmp_path / "p")
    assert not dense.uniform and (tmp_path / "p" / "modeling_amoeba_llama.py").is_file()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    torch.save(logits(ids), tmp_path / "want.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "p")!r}, trust_remote_code=True).eval()
        assert "amoeba_export" not in sys.modules and type(m).__name__ == "AmoebaLlamaForCausalLM"
        got = m(input_ids=torch.tensor([[3, 14, 15, 92, 65, 35]]), use_cache=False).logits
        want = torch.load({str(tmp_path / "want.pt")!r}, weights_only=True)
        print(float((got - want).abs().max()))
    """)
    p = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert float(p.stdout.strip().splitlines()[-1]) < 1e-6


def test_aot_package_decodes_like_the_reference(tiny_gqa, tmp_path):
    """The PyTorch flow's engine build: torch.export + AOTInductor `.pt2`, loaded and run."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    shape = em.strategy.space.largest  # uniform: packaged
    m = compile_shape(em, shape, FLOWS["pytorch"], {"name": "host", "flows": ["pytorch"]}, tmp_path / "u").manifest
    assert m["engine"]["built"] == ["model.pt2", "model.pt2.json"] and "model.pt2" in m["files"]
    assert m["engine"]["max_abs_logit_diff_vs_directory"] < TOL
    ids = torch.randint(3, tiny.VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    got = pytorch.load_package(tmp_path / "u")(ids)
    assert (got - em.logits(ids, shape)).abs().max().item() < TOL
    per_layer = next(s for s in em.strategy.space if not materialize(em, s).uniform)
    built = pytorch.build(export(em, per_layer, tmp_path / "p")[0] and tmp_path / "p", {"name": "host"})
    assert built["built"] == [] and "--layout pad" in built["skipped"]
