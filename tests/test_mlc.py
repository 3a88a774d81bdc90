"""The MLC-LLM flow: the weight directory MLC reads, checked without MLC (it needs a GPU build).

- apache-tvm's own reader (`tvm.contrib.tvmjs.load_tensor_cache`) reads what `emit` writes, and
  tvm's own writer, given the same tensors, writes byte-identical shards (the sharding rule);
- q4f16_1 is checked bit for bit against an independent NumPy reading of docs/flow-internals.md §7.2 (and the
  quantiser's arithmetic against a TVM CPU kernel of the same formula);
- `load` (NumPy forward over the cache, un-fused to HF names) is compared with a PyTorch forward of
  the same legalised model with the same stored weights: q0f32 the model itself, q0f16 its weights
  rounded to fp16, q4f16_1 its weights replaced by the reference dequantisation. So naming, fusion and
  layout are checked to float32 round-off, and the quantisation error is only reported (greedy
  agreement with the unquantised model), never bounded on tiny random models (flat logits).
Run with `-s` to see the figures.
"""
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows.mlc import writer as mlc
from amoeba_export.flows.pytorch import writer as pytorch
from amoeba_export.legalize import legalize
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape
from profilers.workload import Workload
from targets import load_target

F32_TOL = 1e-4  # q0f32: the same weights, NumPy vs PyTorch float32 forward
F16_TOL = 1e-3  # q0f16: NumPy on the fp16 cache vs PyTorch on the fp16-rounded weights
Q4_TOL = 1e-3  # q4f16_1: NumPy on the cache vs PyTorch on the reference-dequantised weights


def legal(em, shape, quant=None, dtype=None):
    """materialize → legalize for MLC (pads per-layer shapes, drops biases unmeasured)."""
    return legalize(materialize(em, shape, dtype), mlc.CAPS, flow="mlc", quant=quant)[0]


def emit(dense, out, tokenizer_dir, quant, workload=None):
    out.mkdir(parents=True, exist_ok=True)
    return mlc.emit(dense, out, tokenizer_dir, quant=quant, workload=workload).files


# ---------------------------------------------------------------- the reference q4 (docs/flow-internals.md §7.2)

def ref_quantize(w, dtype=np.float16):
    """§7.2 read independently: pad K to groups of 32, fp16 scale = max|w| / 7, q = round-half-even(w /
    scale + 7) clipped to 0..14 (0/0 of an all-zero group counts as 0, ±inf as 14 / 0), eight nibbles
    per uint32 from the lowest up."""
    w = np.asarray(w).astype(dtype)
    N, K = w.shape
    G = -(-K // 32)
    groups = np.pad(w, ((0, 0), (0, 32 * G - K))).reshape(N, G, 32)
    scale = (np.max(np.abs(groups), axis=2) / dtype(7)).astype(dtype)
    with np.errstate(all="ignore"):
        t = (groups / scale[:, :, None]).astype(dtype) + dtype(7)
    q = np.clip(np.nan_to_num(np.round(t), nan=0.0, posinf=14.0, neginf=0.0), 0, 14).astype(np.uint32).reshape(N, -1)
    q[:, K:] = 0
    words = np.zeros((N, 4 * G), np.uint32)
    for i in range(8):
        words |= q[:, i::8] << np.uint32(4 * i)
    return words, scale


def ref_dequantize(words, scale, K):
    q = np.stack([(words >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1).reshape(len(words), -1)
    return (q[:, :K].astype(scale.dtype) - scale.dtype.type(7)) * np.repeat(scale, 32, axis=1)[:, :K]


def tie_matrix():
    """A [6, 72] matrix (K not a multiple of 32) with an all-zero group, a group whose scale is exactly
    1 and whose values land on .5 ties, a group whose scale underflows to 0, and random rows."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (6, 72)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = [7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -6.5] + [0.0] * 21  # scale 1: x.5 ties
    w[2, 32:64] = 2.0 ** -24  # max/7 rounds to 0 in fp16
    w[3, 64:] = 0.0  # an all-zero partial (padded) group
    return w


def test_q4_is_bit_exact_with_the_reference():
    w = tie_matrix()
    q_weight, q_scale = mlc.quantize_q4(w, np.float16)
    ref_w, ref_s = ref_quantize(w)
    assert q_weight.shape == (6, 12) and q_weight.dtype == np.uint32  # 3 groups (72 -> 96) x 4 words
    assert q_scale.shape == (6, 3) and q_scale.dtype == np.float16
    np.testing.assert_array_equal(q_weight, ref_w)
    np.testing.assert_array_equal(q_scale.view(np.uint16), ref_s.view(np.uint16))
    # round half to even on the ties: 7.5 -> 8, 8.5 -> 8, 9.5 -> 10, 6.5 -> 6, 5.5 -> 6, 4.5 -> 4, 10.5 -> 10, 3.5 -> 4
    nibbles = [(int(q_weight[1, i // 8]) >> (4 * (i % 8))) & 15 for i in range(11)]
    assert nibbles == [14, 8, 8, 10, 6, 6, 4, 10, 4, 14, 0]
    assert int(q_weight[0, :4].max()) == 0 and q_scale[0, 0] == 0  # all-zero group: q 0, scale 0
    # dequantisation: the module and the reference agree bit for bit, and are within scale / 2
    deq = mlc.dequantize_q4(q_weight, q_scale, 72)
    np.testing.assert_array_equal(deq.view(np.uint16), ref_dequantize(ref_w, ref_s, 72).view(np.uint16))
    w16 = w.astype(np.float16).astype(np.float32)
    bound = np.repeat(q_scale.astype(np.float32), 32, axis=1)[:, :72] * (0.5 + 2 ** -6)  # + fp16 steps
    err = np.abs(w16 - deq.astype(np.float32))
    normal = np.repeat(q_scale > 0, 32, axis=1)[:, :72]
    assert (err[normal] <= bound[normal]).all()
    assert np.abs(deq[~normal]).max() == 0 and err[~normal].max() <= 2.0 ** -24  # only the underflowed group
    # a larger random matrix, and q4f32_1's float32 scales
    big = np.random.default_rng(1).normal(0, 0.05, (257, 160)).astype(np.float32)
    for dtype in (np.float16, np.float32):
        a, b = mlc.quantize_q4(big, dtype)
        ra, rb = ref_quantize(big, dtype)
        np.testing.assert_array_equal(a, ra)
        np.testing.assert_array_equal(b, rb)
        assert b.dtype == dtype


def test_q4_arithmetic_matches_a_tvm_cpu_kernel():
    """The same formula written as a TVM tensor expression and run on the CPU (what convert_weight does
    with --device cpu): NaN of an all-zero group, underflowed scales and ties come out the same."""
    tvm = pytest.importorskip("tvm")
    from tvm import te, tirx

    w = tie_matrix()[:, :64].astype(np.float16)
    N, K = w.shape
    W = te.placeholder((N, K), "float16", name="W")
    r = te.reduce_axis((0, 32), name="r")
    mx = te.compute((N, K // 32), lambda i, g: te.max(te.abs(W[i, g * 32 + r]), axis=r), name="mx")
    sc = te.compute((N, K // 32), lambda i, g: mx[i, g] / tirx.const(7, "float16"), name="sc")
    q = te.compute(
        (N, K),
        lambda i, k: tirx.min(
            tirx.max(tirx.round(W[i, k] / sc[i, k // 32] + tirx.const(7, "float16")), tirx.const(0, "float16")),
            tirx.const(14, "float16"),
        ).astype("uint32"),
    )
    f = tvm.compile(te.create_prim_func([W, sc, q]), target="llvm")
    dev = tvm.cpu()
    s, o = tvm.runtime.empty((N, K // 32), "float16", dev), tvm.runtime.empty((N, K), "uint32", dev)
    f(tvm.runtime.tensor(w, dev), s, o)
    q_weight, q_scale = mlc.quantize_q4(w, np.float16)
    np.testing.assert_array_equal(q_scale.view(np.uint16), s.numpy().view(np.uint16))
    packed = (o.numpy().reshape(N, -1, 8).astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64))).sum(-1)
    np.testing.assert_array_equal(q_weight, packed.astype(np.uint32))


# ---------------------------------------------------------------- the tensor cache

def test_cache_reads_back_with_tvm_and_matches_tvms_own_writer(tiny_llama3, tmp_path, monkeypatch):
    tvm = pytest.importorskip("tvm")
    from tvm.contrib import tvmjs

    em = ElasticModel(tiny_llama3, tiny.random_strategy(tiny_llama3, seed=3))
    cap = 16 << 10  # 16 KiB: several shards, and the embedding (>= cap / 2) alone in its own
    monkeypatch.setattr(mlc, "SHARD_CAP", cap)
    for quant in ("q0f16", "q4f16_1"):
        dense = legal(em, em.strategy.space.largest, quant)
        out = tmp_path / quant
        files = emit(dense, out, tiny_llama3, quant)
        assert set(files) >= {"tensor-cache.json", "ndarray-cache.json", "mlc-chat-config.json", "tokenizer.json"}
        assert (out / "ndarray-cache.json").read_bytes() == (out / "tensor-cache.json").read_bytes()
        cache = json.loads((out / "tensor-cache.json").read_text())
        assert len(cache["records"]) >= 3
        for shard in cache["records"]:
            raw = (out / shard["dataPath"]).read_bytes()
            assert shard["format"] == "raw-shard" and shard["nbytes"] == len(raw) <= max(
                cap, shard["records"][0]["nbytes"]
            )
            assert shard["md5sum"] == hashlib.md5(raw).hexdigest()
            assert sum(r["nbytes"] for r in shard["records"]) == len(raw)
            assert all(r["format"] == "raw" for r in shard["records"])
            if shard["nbytes"] >= cap:  # only a tensor of at least half the cap exceeds it, alone
                assert len(shard["records"]) == 1 and 2 * shard["nbytes"] >= cap
        ours = mlc.read_cache(out)
        theirs, meta = tvmjs.load_tensor_cache(str(out), tvm.cpu())
        assert meta["ParamSize"] == len(ours) and meta["ParamBytes"] == sum(a.nbytes for a in ours.values())
        assert meta["BitsPerParam"] == pytest.approx(meta["ParamBytes"] * 8 / dense.parameters())
        assert set(theirs) == set(ours)
        for name, arr in ours.items():
            t = theirs[name].numpy()
            assert t.dtype == arr.dtype and t.shape == arr.shape, name
            np.testing.assert_array_equal(t, arr)
        # tvm's writer, fed the same stream with the same cap, writes the same shards
        ref = tmp_path / f"tvm-{quant}"
        tvmjs.dump_tensor_cache(((n, a) for n, a, _ in mlc.mlc_tensors(dense, quant)), str(ref), encode_format="raw",
                                shard_cap_mb=cap / (1 << 20), show_progress=False)
        assert json.loads((ref / "tensor-cache.json").read_text())["records"] == cache["records"]
        for shard in cache["records"]:
            assert (ref / shard["dataPath"]).read_bytes() == (out / shard["dataPath"]).read_bytes()
    # MLC's names: fused qkv / gate_up, untied lm_head, every linear and the embedding quantised
    H, D, L = dense.hidden_size, dense.layers[0].head_dim, len(dense.layers)
    s = dense.layers[0]
    q4 = {n: a.shape for n, a in mlc.read_cache(tmp_path / "q4f16_1").items()}
    assert q4["model.layers.0.self_attn.qkv_proj.q_weight"] == ((s.n_heads + 2 * s.n_kv_heads) * D, H // 8)
    assert q4["model.layers.0.self_attn.qkv_proj.q_scale"] == ((s.n_heads + 2 * s.n_kv_heads) * D, H // 32)
    assert q4["model.layers.0.mlp.gate_up_proj.q_weight"] == (2 * s.n_ff, H // 8)
    assert q4["model.layers.0.mlp.down_proj.q_weight"] == (H, s.n_ff // 8)
    assert q4["lm_head.q_weight"] == (dense.vocab_size, H // 8) and q4["model.norm.weight"] == (H,)
    assert len(q4) == 2 + L * 10 + 1 + 2  # embed, per layer 2 norms + 4 linears x 2, norm, lm_head
    f16 = mlc.read_cache(tmp_path / "q0f16")
    assert f16["model.layers.0.self_attn.qkv_proj.weight"].dtype == np.float16 and "lm_head.weight" in f16


def test_float32_and_bfloat16_records(tiny_gqa, tmp_path):
    """q0f32 keeps real float32 ("raw"), q0bf16 stores bf16 bits; both read back exactly, tvm agrees."""
    tvm = pytest.importorskip("tvm")
    from tvm.contrib import tvmjs

    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    dense = legal(em, em.strategy.space.largest)
    ref = dict(dense.tensors())["model.layers.0.input_layernorm.weight"]
    for quant, expect in (("q0f32", ref), ("q0bf16", ref.to(torch.bfloat16).float())):
        emit(dense, tmp_path / quant, tiny_gqa, quant)
        ours = mlc.read_cache(tmp_path / quant)
        assert "lm_head.weight" not in ours  # tied
        np.testing.assert_array_equal(ours["model.layers.0.input_layernorm.weight"], expect.numpy())
        theirs, _ = tvmjs.load_tensor_cache(str(tmp_path / quant), tvm.cpu())
        got = theirs["model.layers.0.input_layernorm.weight"].numpy().astype(np.float32)
        np.testing.assert_array_equal(got, expect.numpy())


# ---------------------------------------------------------------- parity

def reference_models(dense, quant):
    """A PyTorch model of the legalised dense model holding the weights the cache stores, as float32."""
    model = pytorch.in_memory(dense)
    if quant == "q0f32":
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().numpy()
            if quant == "q4f16_1" and w.ndim == 2:
                words, scale = ref_quantize(w)
                p.copy_(torch.from_numpy(ref_dequantize(words, scale, w.shape[1]).astype(np.float32)))
            else:
                p.copy_(p.half().float())
    return model


def agreement(a, b):
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


SHAPES = {"uniform": lambda em: em.strategy.space.largest,
          "padded": lambda em: Shape(em.strategy.space.depths[-1], 0.75),
          "padded-small": lambda em: em.strategy.space.smallest}


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_llama3"])
def test_load_matches_pytorch_on_the_same_weights(fixture, kind, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))
    shape = SHAPES[kind](em)
    ids = tiny.ids(40)  # > 16 positions: tiny_llama3's RoPE scaling (original context 16) matters
    tol = {"q0f32": F32_TOL, "q0f16": F16_TOL, "q4f16_1": Q4_TOL}
    for quant in tol:
        dense = legal(em, shape, quant)
        assert dense.uniform and not any(s.attn_bias or s.mlp_bias for s in dense.layers)
        emit(dense, tmp_path / quant, model_dir, quant)
        got = mlc.load(tmp_path / quant)(ids)
        with torch.inference_mode():
            ref = reference_models(dense, quant)(input_ids=ids, use_cache=False).logits
            plain = pytorch.in_memory(dense)(input_ids=ids, use_cache=False).logits
        diff = (got - ref).abs().max().item()
        tiny.record_parity("mlc", fixture, kind == "uniform", quant, diff, "same weights in PyTorch")
        s = dense.layers[0]
        print(
            f"\n{fixture} {shape} ({kind}: {s.n_heads}/{s.n_kv_heads} heads, n_ff {s.n_ff}) {quant}: max |logit "
            "diff| vs PyTorch on the "
            f"same weights {diff:.2e} (|logits| <= {ref.abs().max().item():.2f}); vs the unquantised model "
            f"{(got - plain).abs().max().item():.2e}, greedy agreement {agreement(got, plain):.3f}"
        )
        assert got.shape == ref.shape and diff < tol[quant], (quant, diff)
        if quant != "q4f16_1":
            assert agreement(got, ref) == 1.0


def test_q4f32_1_and_the_default_quant(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    dense = legal(em, em.strategy.space.largest)
    emit(dense, tmp_path / "default", tiny_gqa, None)
    cfg = json.loads((tmp_path / "default" / "mlc-chat-config.json").read_text())
    assert cfg["quantization"] == "q0f32"  # float32 dense model, no quant given
    emit(dense, tmp_path / "q4f32", tiny_gqa, "q4f32_1")
    cache = mlc.read_cache(tmp_path / "q4f32")
    assert cache["model.embed_tokens.q_scale"].dtype == np.float32
    assert cache["model.norm.weight"].dtype == np.float32
    ids = tiny.ids(24)
    plain = pytorch.in_memory(dense)(input_ids=ids, use_cache=False).logits.detach()
    got = mlc.load(tmp_path / "q4f32")(ids)
    print(
        f"\ntiny_gqa q4f32_1: vs unquantised {(got - plain).abs().max().item():.2e}, greedy {agreement(got, plain):.3f}"
    )
    with pytest.raises(UserError, match="cannot write 'q3f16_1'"):
        mlc.emit(dense, tmp_path / "bad", tiny_gqa, quant="q3f16_1")


# ---------------------------------------------------------------- mlc-chat-config.json

def tokenizer_dir(src: Path, dst: Path, chat_template=None, jinja=None, decoder=None, normalizer=None) -> Path:
    dst.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    if chat_template is not None:
        tc = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": chat_template}))
    if jinja is not None:
        (dst / "chat_template.jinja").write_text(jinja)
    if decoder is not None or normalizer is not None:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tj.update({k: v for k, v in (("decoder", decoder), ("normalizer", normalizer)) if v is not None})
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_chat_config_fields(tiny_gqa, tiny_llama3, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    dense = legal(em, Shape(em.strategy.space.depths[-1], 0.75), "q4f16_1")
    s = dense.layers[0]
    w = Workload(batch=4, prompt_len=100, gen_len=50)
    (tmp_path / "a").mkdir()
    record = mlc.emit(dense, tmp_path / "a", tiny_gqa, quant="q4f16_1", workload=w).record
    cfg = json.loads((tmp_path / "a" / "mlc-chat-config.json").read_text())
    mc = cfg["model_config"]
    assert cfg["version"] == "0.1.0" and cfg["model_type"] == "llama" and cfg["quantization"] == "q4f16_1"
    assert (mc["context_window_size"], mc["prefill_chunk_size"], mc["max_batch_size"]) == (160, 100, 4)  # 150 -> 16s
    assert cfg["context_window_size"] == 160 and cfg["prefill_chunk_size"] == 100 and "max_batch_size" not in cfg
    assert (mc["hidden_size"], mc["intermediate_size"], mc["num_attention_heads"], mc["num_key_value_heads"],
            mc["head_dim"], mc["num_hidden_layers"]) == (64, s.n_ff, s.n_heads, s.n_kv_heads, 16, len(dense.layers))
    assert mc["tie_word_embeddings"] is True and mc["rope_scaling"] is None and mc["position_embedding_base"] == 10000.0
    assert mc["tensor_parallel_shards"] == 1 and mc["pipeline_parallel_stages"] == 1
    assert cfg["vocab_size"] == cfg["active_vocab_size"] == tiny.VOCAB
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["temperature"]) == (1, 2, 2, 1.0)
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert cfg["conv_template"]["name"] == "LM" and cfg["conv_template"]["system_prefix_token_ids"] == [1]
    assert cfg["tokenizer_info"]["token_postproc_method"] == "byte_fallback"  # no decoder: MLC's default
    assert record["context_window_size"] == 160
    # without a workload; a workload longer than the model's positions is refused
    emit(dense, tmp_path / "b", tiny_gqa, "q4f16_1")
    mc = json.loads((tmp_path / "b" / "mlc-chat-config.json").read_text())["model_config"]
    assert (mc["context_window_size"], mc["prefill_chunk_size"], mc["max_batch_size"]) == (256, 256, 1)
    with pytest.raises(UserError, match="needs 300 positions.*max_position_embeddings is 256"):
        emit(dense, tmp_path / "c", tiny_gqa, "q4f16_1", workload=Workload(prompt_len=200, gen_len=100))
    # Llama-3 RoPE scaling is carried as MLC's rope_scaling
    em3 = ElasticModel(tiny_llama3, tiny.random_strategy(tiny_llama3, seed=3))
    emit(legal(em3, em3.strategy.space.largest), tmp_path / "d", tiny_llama3, "q0f16")
    mc = json.loads((tmp_path / "d" / "mlc-chat-config.json").read_text())["model_config"]
    assert mc["rope_scaling"]["rope_type"] == "llama3" and mc["rope_scaling"]["factor"] == 8.0
    assert mc["position_embedding_base"] == 500000.0 and mc["tie_word_embeddings"] is False


def test_conv_template_and_tokenizer_info_follow_the_tokenizer(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    dense = legal(em, em.strategy.space.largest)
    chatml = tokenizer_dir(
        tiny_gqa,
        tmp_path / "t-chatml",
        chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    )
    llama3 = tokenizer_dir(
        tiny_gqa,
        tmp_path / "t-llama3",
        jinja="<|start_header_id|>{{ role }}<|end_header_id|>\n\n",
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    )
    spm = tokenizer_dir(tiny_gqa, tmp_path / "t-spm",
                        decoder={"type": "Sequence", "decoders": [
                            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                            {"type": "ByteFallback"}, {"type": "Fuse"},
                            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                        normalizer={"type": "Sequence", "normalizers": [
                            {"type": "Prepend", "prepend": "\u2581"},
                            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]})
    expect = {chatml: ("chatml", ("byte_level", False, False)), llama3: ("llama-3", ("byte_level", False, False)),
              spm: ("LM", ("byte_fallback", True, True))}
    for d, (name, info) in expect.items():
        emit(dense, tmp_path / f"out-{d.name}", d, "q0f32")
        cfg = json.loads((tmp_path / f"out-{d.name}" / "mlc-chat-config.json").read_text())
        conv, ti = cfg["conv_template"], cfg["tokenizer_info"]
        assert conv["name"] == name
        assert (ti["token_postproc_method"], ti["prepend_space_in_encode"], ti["strip_space_in_decode"]) == info
    chat = json.loads((tmp_path / "out-t-chatml" / "mlc-chat-config.json").read_text())["conv_template"]
    assert chat["roles"] == {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    assert chat["seps"] == ["<|im_end|>\n"] and chat["stop_str"] == ["<|im_end|>"] and chat["stop_token_ids"] == [2]
    assert "system_prefix_token_ids" not in chat and chat["role_content_sep"] == "\n"
    l3 = json.loads((tmp_path / "out-t-llama3" / "mlc-chat-config.json").read_text())["conv_template"]
    assert l3["stop_token_ids"] == [128001, 128009] and l3["system_prefix_token_ids"] == [128000]
    assert l3["role_content_sep"] == "<|end_header_id|>\n\n" and l3["seps"] == ["<|eot_id|>"]
    assert (tmp_path / "out-t-llama3" / "chat_template.jinja").is_file()  # copied with the tokenizer


# ---------------------------------------------------------------- build.sh and build

@pytest.fixture(scope="module")
def emitted(tiny_gqa, tmp_path_factory):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    out = tmp_path_factory.mktemp("mlc-emitted")
    mlc.emit(legal(em, em.strategy.space.largest, "q4f16_1"), out, tiny_gqa, quant="q4f16_1", workload=Workload())
    return out


def fake_bin(tmp_path: Path, arch: str = "8.6") -> Path:
    """A PATH folder with a fake `mlc_llm` (logs its arguments, writes the -o file), a fake nvidia-smi
    reporting `arch`, and a python3 that fails (so the arch comes from nvidia-smi)."""
    d = tmp_path / "bin"
    d.mkdir()
    scripts = {
        "mlc_llm": '#!/usr/bin/env bash\necho "$@" > mlc_llm.args\nwhile [ $# -gt 0 ]; do if [ "$1" = -o ]; then '
                   'mkdir -p "$(dirname "$2")"; echo lib > "$2"; fi; shift; done\n',
        "nvidia-smi": f"#!/usr/bin/env bash\necho {arch}\n",
        "python3": "#!/usr/bin/env bash\nexit 1\n",
    }
    for name, text in scripts.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def test_build_script_for_jetson_orin(emitted, tmp_path, monkeypatch):
    target = load_target("jetson-orin")
    out = tmp_path / "a"
    shutil.copytree(emitted, out)
    assert mlc.script(out, target, quant="q4f16_1", workload=Workload()) == ["build.sh"]
    text = (out / "build.sh").read_text()
    assert os.access(out / "build.sh", os.X_OK) and "set -euo pipefail" in text and 'cd "$(dirname "$0")"' in text
    assert ("mlc_llm compile ./mlc-chat-config.json --device cuda --overrides "
            "'context_window_size=192;prefill_chunk_size=128;max_batch_size=1' -o lib/model-q4f16_1-cuda.so") in text
    assert "EXPECTED_ARCH=sm_87" in text and "nvidia/jetson-agx-orin-64gb" in text
    assert "mlc_llm chat . --model-lib lib/model-q4f16_1-cuda.so" in text and "MLCEngine(" in text
    assert subprocess.run(["bash", "-n", str(out / "build.sh")], check=False).returncode == 0
    # without mlc_llm: one clear line
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("dirname", "bash"):
        (bare / tool).symlink_to(shutil.which(tool))
    run = subprocess.run(["bash", "build.sh"], cwd=out, capture_output=True, text=True,
                         env={"PATH": str(bare)}, check=False)
    assert run.returncode == 127 and run.stderr.strip().count("\n") == 0 and "mlc_llm is not on PATH" in run.stderr
    # build() runs it where mlc_llm is on PATH (a fake one here, on a GPU reporting sm_86)
    bin_dir = fake_bin(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    record = mlc.build(out, target, quant="q4f16_1")
    assert record["returncode"] == 0 and record["built"] == ["lib/model-q4f16_1-cuda.so"], record
    assert (out / "lib/model-q4f16_1-cuda.so").is_file()
    assert "--device cuda" in (out / "mlc_llm.args").read_text()
    assert any("this GPU is sm_86, not sm_87" in line for line in record["output_tail"])
    assert record["toolchain"]["mlc_llm_path"] == str(bin_dir / "mlc_llm")
    # a failing compile is recorded, not raised
    (bin_dir / "mlc_llm").write_text("#!/usr/bin/env bash\necho 'error: no CUDA' >&2\nexit 3\n")
    record = mlc.build(out, target)
    assert record["built"] == [] and record["returncode"] == 3 and "error: no CUDA" in record["failed"]


def test_build_script_for_an_android_device_and_skip_without_mlc(emitted, tmp_path, monkeypatch):
    target = {
        "name": "pixel-8",
        "kind": "gpu",
        "arch": "adreno-740",
        "flows": {"mlc": {"dtype": "q4f16_1", "device": "android", "efficiency": 0.5, "efficiency_source": "assumed"}},
    }
    out = tmp_path / "a"
    shutil.copytree(emitted, out)
    mlc.script(out, target)  # quant and sizes from the emitted config
    text = (out / "build.sh").read_text()
    assert "--device android --overrides 'context_window_size=192;prefill_chunk_size=128;max_batch_size=1' " \
           "-o lib/model-q4f16_1-android.tar" in text
    assert "EXPECTED_ARCH" not in text
    assert mlc.library_suffix("webgpu") == ".wasm" and mlc.library_suffix("metal") == ".dylib"
    assert mlc.library_suffix("iphone") == ".tar" and mlc.library_suffix('{"kind": "cuda", "arch": "sm_86"}') == ".so"
    assert mlc.device_of({"kind": "gpu", "arch": "sm_86"}) == "cuda"
    monkeypatch.setattr(mlc.shutil, "which", lambda name: None)
    record = mlc.build(out, load_target("jetson-orin"))
    assert record["built"] == [] and record["script"] == "build.sh"
    assert record["skipped"] == "mlc_llm is not on PATH here: run `bash build.sh` on the jetson-orin"
    assert record["toolchain"]["device"] == "cuda" and record["toolchain"]["arch"] == "sm_87"


# ---------------------------------------------------------------- determinism and errors

def test_emit_is_deterministic(tiny_llama3, tmp_path):
    em = ElasticModel(tiny_llama3, tiny.random_strategy(tiny_llama3, seed=3))
    shape = Shape(em.strategy.space.depths[-1], 0.75)
    for run in ("one", "two"):
        emit(legal(em, shape, "q4f16_1"), tmp_path / run, tiny_llama3, "q4f16_1", workload=Workload())
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one.keys() == two.keys() and one == two


def test_corrupt_and_missing_files_are_user_errors(emitted, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(emitted, out)
    shard = out / "params_shard_0.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="md5"):
        mlc.load(out)
    shard.write_bytes(bytes(raw[:-8]))
    with pytest.raises(UserError, match="truncated"):
        mlc.read_cache(out)
    shard.unlink()
    with pytest.raises(UserError, match="missing MLC weight shard"):
        mlc.read_cache(out)
    text = (out / "tensor-cache.json").read_text()
    (out / "tensor-cache.json").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="corrupt JSON"):
        mlc.read_cache(out)


def test_unlegalised_models_are_refused(tiny_qwen, tmp_path):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    with pytest.raises(ValueError, match="one config for every layer"):
        mlc.emit(materialize(em, em.strategy.space.smallest), tmp_path, tiny_qwen, "q0f32")
    with pytest.raises(ValueError, match="no linear biases"):  # tiny_qwen has q/k/v biases
        mlc.emit(materialize(em, em.strategy.space.largest), tmp_path, tiny_qwen, "q0f32")


# ---------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_default_model_q4f16_1_and_q0f16(default_elastic, tmp_path):
    """SmolLM2-135M-Instruct, all 30 layers at width 1.0: both caches read by tvm, and the NumPy forward
    on them matches PyTorch on the same stored weights; the figures against the unquantised model."""
    tvm = pytest.importorskip("tvm")
    from tvm.contrib import tvmjs

    em = default_elastic
    shape = em.strategy.resolve(Shape.parse("30x1.0"))
    tok = em.tokenizer()
    ids = torch.tensor([tok("The capital of France is Paris. Deployment engineers compile one elastic model for "
                            "many devices.", add_special_tokens=False)["input_ids"][:24]])
    for quant, tol in (("q4f16_1", Q4_TOL), ("q0f16", F16_TOL)):
        dense = legal(em, shape, quant)
        out = tmp_path / quant
        files = emit(dense, out, em.dir, quant, workload=Workload())
        ours = mlc.read_cache(out)
        theirs, meta = tvmjs.load_tensor_cache(str(out), tvm.cpu())
        assert set(theirs) == set(ours)
        for name in ("model.embed_tokens." + ("q_weight" if quant == "q4f16_1" else "weight"), "model.norm.weight"):
            np.testing.assert_array_equal(theirs[name].numpy(), ours[name])
        cfg = json.loads((out / "mlc-chat-config.json").read_text())
        assert (
            cfg["conv_template"]["name"] == "chatml" and cfg["tokenizer_info"]["token_postproc_method"] == "byte_level"
        )
        got = mlc.load(out)(ids)
        with torch.inference_mode():
            ref = reference_models(dense, quant)(input_ids=ids, use_cache=False).logits
            plain = pytorch.in_memory(dense)(input_ids=ids, use_cache=False).logits
        diff = (got - ref).abs().max().item()
        print(f"\nSmolLM2-135M 30x1.0 {quant}: {sum(f.startswith('params_shard') for f in files)} shards, "
              f"{meta['BitsPerParam']:.2f} bits/param; {ids.shape[1]} tokens: max |logit diff| vs PyTorch on the same "
              f"weights {diff:.2e} (|logits| <= {ref.abs().max().item():.1f}); vs unquantised "
              f"{(got - plain).abs().max().item():.3f}, greedy agreement {agreement(got, plain):.3f}")
        assert diff < tol


def test_stop_token_ids_come_from_the_tokenizer(tmp_path):
    """MLC's chatml template fixes stop id 2 (SmolLM2's <|im_end|>); another tokenizer's id is used instead."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{ m }}<|im_end|>"}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 7, "content": "<|im_end|>"}]}))
    assert mlc.conv_template(tmp_path)["stop_token_ids"] == [7]
    assert mlc.CONV_TEMPLATES["chatml"]["stop_token_ids"] == [2]  # the registry's own value is left alone
