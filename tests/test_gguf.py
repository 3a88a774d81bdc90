"""The llama.cpp flow: GGUF files run by llama.cpp (llama-cpp-python) reproduce the masked reference.

Fast tests use the tiny random models; the `slow` ones the real default model and its shipped
strategy. Measured max |logit diff| on the tiny models (2 x 40 tokens), which the tolerances bound:
F32 <= 1e-6 (llama and deci, biases, tied/untied, llama3 RoPE; F32 KV cache), F16 <= 1.5e-3,
BF16 ~8e-3, Q8_0 ~5e-2, Q4_0 ~0.5, on logits of magnitude ~1.5. Tiny random models have flat
logits (top-2 margins of a few 1e-2), so quantised files are checked for greedy agreement only
where the reference's margin exceeds twice the error bound. On the real model (logits in about
[-26, 41]) F32 matches to 7e-5 with every greedy token equal; quantised files flip near-ties only
(see the comment above the slow quantised tests).
"""
import json

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.io import sha256_file
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from amoeba_export.flows import FLOWS  # noqa: E402
from amoeba_export.flows.gguf import runtime as prof  # noqa: E402
from amoeba_export.flows.gguf import writer as gx  # noqa: E402
from profilers.profile import profile_artifact  # noqa: E402
from profilers.workload import Workload  # noqa: E402

F32_TOL = 1e-3
F16_TOL = 5e-3
Q8_TOL = 0.1
FAST = dict(warmup=1, min_repeats=3, max_repeats=5, max_seconds=5.0)


def export(em, shape, out, quant=None, dtype=None):
    dense = materialize(em, shape, dtype)
    out.mkdir(parents=True)
    emitted = gx.emit(dense, out, em.dir, quant=quant)
    assert emitted.files == ["model.gguf"]
    dense.record = {**dense.record, "gguf": emitted.record}  # what the manifest records
    return dense


def reader(out):
    return gguf.GGUFReader(out / "model.gguf")


def field(r, key):
    return r.fields[key].contents()


def confident_agreement(ref, got, margin):
    """Greedy agreement over the positions whose reference top-2 margin exceeds `margin` (there a
    logit error below margin/2 cannot flip the argmax), and how many such positions there were."""
    top2 = ref.topk(2, dim=-1).values
    sure = (top2[..., 0] - top2[..., 1]) > margin
    agree = (ref.argmax(-1) == got.argmax(-1))[sure]
    return agree.float().mean().item(), int(sure.sum())


# ---------------------------------------------------------------- F32 parity: llama and deci arch

@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen", "tiny_llama3"])
def test_f32_matches_reference_uniform_and_per_layer(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))
    ids = tiny.ids(40)  # > 16 positions: llama3 scaling (original context 16) matters
    archs = set()
    for shape in (em.strategy.space.largest, em.strategy.space.smallest):
        dense = export(em, shape, tmp_path / str(shape))
        got = gx.load(tmp_path / str(shape))(ids)
        ref = em.logits(ids, shape)
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        tiny.record_parity("gguf", fixture, dense.uniform, "float32", diff)
        assert diff < F32_TOL, (shape, diff)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        arch = field(reader(tmp_path / str(shape)), "general.architecture")
        assert arch == ("llama" if dense.uniform else "deci")
        archs.add(arch)
    assert archs == {"llama", "deci"}


def test_biases_untied_and_padded_heads_are_exercised(tiny_qwen, tmp_path):
    """The per-layer tiny_qwen shape really has q/k/v + o + down biases, an output.weight, zero
    padded heads and uneven GQA: the parity above covers them."""
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    dense = export(em, em.strategy.space.smallest, tmp_path / "p")
    names = {t.name for t in reader(tmp_path / "p").tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "blk.0.attn_output.bias",
            "blk.0.ffn_gate.bias", "blk.0.ffn_up.bias", "blk.0.ffn_down.bias", "output.weight"} <= names
    assert len({s.n_heads for s in dense.layers}) > 1 and dense.record["padding"]["zero_query_heads"] > 0


def test_llama3_rope_freqs(tiny_llama3, tmp_path, monkeypatch):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    em = ElasticModel(tiny_llama3, tiny.random_strategy(tiny_llama3, seed=3))
    shape = em.strategy.space.smallest
    export(em, shape, tmp_path / "with")
    r = reader(tmp_path / "with")
    freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    # independent of our formula: transformers' own llama3 frequencies against the plain ones
    cfg = AutoConfig.from_pretrained(tiny_llama3)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    np.testing.assert_allclose(np.asarray(freqs.data), (plain / scaled.double()).numpy(), rtol=1e-5)
    f = np.asarray(freqs.data)
    assert (f == 8.0).any() and ((f > 1) & (f < 8)).any()  # low and blended bands (theta 5e5, D=16: no high one)
    # without the tensor llama.cpp runs plain RoPE and drifts past the original context
    monkeypatch.setattr(gx, "llama3_rope_factors", lambda config, head_dim: None)
    export(em, shape, tmp_path / "without")
    ids = tiny.ids(40)
    drift = (gx.load(tmp_path / "without")(ids) - em.logits(ids, shape)).abs().max().item()
    assert drift > 1e-2


def test_llama3_factors_match_transformers_on_a_llama31_config():
    """Llama-3.1-8B's settings (head_dim 128, original context 8192) have all three bands."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ours = gx.llama3_rope_factors(cfg.to_dict(), 128)
    np.testing.assert_allclose(ours, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert ours[0] == 1.0 and ours[-1] == 8.0 and ((ours > 1) & (ours < 8)).any()


def test_unsupported_rope_scaling_is_a_user_error():
    cfg = {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UserError, match="yarn"):
        gx.llama3_rope_factors(cfg, 16)


# ---------------------------------------------------------------- F16 / Q8_0 / Q4_0

def test_f16_within_looser_tolerance(tiny_qwen, tmp_path):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    ids = tiny.ids(40)
    for shape in (em.strategy.space.largest, em.strategy.space.smallest):
        ref = em.logits(ids, shape)
        export(em, shape, tmp_path / f"{shape}-q", quant="float16")  # float32 weights written as F16
        export(em, shape, tmp_path / f"{shape}-d", dtype="float16")  # a float16 DenseModel, quant None
        for out in (tmp_path / f"{shape}-q", tmp_path / f"{shape}-d"):
            r = reader(out)
            assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
            types = {t.name: t.tensor_type for t in r.tensors}
            assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
            assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32
            diff = (gx.load(out)(ids) - ref).abs().max().item()
            assert diff < F16_TOL, (out.name, diff)
    # a bfloat16 DenseModel gives a BF16 file (measured 8e-3: bf16 rounding of the weights themselves)
    shape = em.strategy.space.smallest
    export(em, shape, tmp_path / "bf16", dtype="bfloat16")
    assert field(reader(tmp_path / "bf16"), "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert (gx.load(tmp_path / "bf16")(ids) - em.logits(ids, shape)).abs().max().item() < 3e-2


def test_q8_0_and_q4_0(tiny_gqa, tmp_path):
    """The full-width tiny shape has every in-feature a multiple of 32 (64, 96)."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    shape = em.strategy.space.largest
    ids = tiny.ids(40)
    ref = em.logits(ids, shape)
    errors = {}
    for quant, ftype, qtype in (("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
                                ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0)):
        export(em, shape, tmp_path / quant, quant=quant)
        r = reader(tmp_path / quant)
        assert field(r, "general.file_type") == ftype and field(r, "general.quantization_version") == 2
        types = {t.name: t.tensor_type for t in r.tensors}
        assert types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == qtype
        assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
        got = gx.load(tmp_path / quant)(ids)
        assert torch.isfinite(got).all()
        errors[quant] = (got - ref).abs().max().item()
    assert errors["q8_0"] < Q8_TOL, errors
    assert errors["q8_0"] < errors["q4_0"] < 1.0, errors  # 4 bits lose more than 8, and still run sensibly
    export(em, shape, tmp_path / "q8again", quant="q8_0")
    agree, n = confident_agreement(ref, gx.load(tmp_path / "q8again")(ids), 2 * Q8_TOL)
    assert n >= 10 and agree == 1.0, (agree, n)


def test_q8_0_bytes_equal_llama_cpp_quantiser(tiny_gqa, tmp_path):
    """gguf-py's Q8_0 blocks are the ones llama.cpp's own quantiser writes from our F32 file."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    shape = em.strategy.space.largest
    export(em, shape, tmp_path / "f32")
    export(em, shape, tmp_path / "ours", quant="q8_0")
    (tmp_path / "theirs").mkdir()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32" / "model.gguf").encode(),
                                          str(tmp_path / "theirs" / "model.gguf").encode(), params) == 0
    ours = {t.name: t for t in reader(tmp_path / "ours").tensors}
    theirs = {t.name: t for t in reader(tmp_path / "theirs").tensors}
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name


def test_quant_sizes_are_checked(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    dense = materialize(em, em.strategy.space.smallest)  # random channel counts: not multiples of 32
    assert any(s.n_ff % 32 for s in dense.layers)
    for quant, align in (("q8_0", 32), ("q4_0", 32), ("q4_k_m", 256)):
        assert gx.CAPS.alignment(quant) == align
        with pytest.raises(UserError, match=f"multiple of {align}"):
            gx.emit(dense, tmp_path, em.dir, quant=quant)
    with pytest.raises(UserError, match="unknown quantisation"):
        gx.emit(dense, tmp_path, em.dir, quant="q3_xs")
    assert not (tmp_path / "model.gguf").exists()  # refused before anything was written


def test_build_kquant_mechanics_on_tiny(tiny_gqa, tmp_path):
    """build() runs llama.cpp's quantiser in place. The tiny rows (64, 96) are not multiples of
    256, so llama.cpp falls back to other types (docs/flow-internals.md §6.2); the record says which."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=3))
    shape = em.strategy.space.largest
    export(em, shape, tmp_path / "k")
    rec = gx.build(tmp_path / "k", {"name": "host"}, quant="q4_k_m")
    assert rec["built"] == ["model.gguf"] and rec["quant"] == "q4_k_m"
    assert rec["toolchain"]["llama_cpp_python"] == llama_cpp.__version__ and rec["toolchain"]["gguf"]
    r = reader(tmp_path / "k")
    assert field(r, "general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "F32" in rec["tensor_types"] and set(rec["tensor_types"]) - {"F32"}  # quantised (fallback) types
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["model.gguf"]  # no partial file left
    ids = tiny.ids(20)
    assert (gx.load(tmp_path / "k")(ids) - em.logits(ids, shape)).abs().max() < 1.0
    export(em, shape, tmp_path / "k2")
    gx.build(tmp_path / "k2", {"name": "host"}, quant="q4_k_m")
    assert sha256_file(tmp_path / "k" / "model.gguf") == sha256_file(tmp_path / "k2" / "model.gguf")  # deterministic
    nothing = gx.build(tmp_path / "k", {"name": "host"}, quant="q8_0")
    assert nothing["built"] == [] and "nothing to build" in nothing["note"]


def test_missing_llama_cpp_is_a_user_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(UserError, match="make setup"):
        gx.build(tmp_path, {"name": "host"}, quant="q4_k_m")
    with pytest.raises(UserError, match="make setup"):
        gx.load(tmp_path)


# ---------------------------------------------------------------- the file, read back

def test_read_back_structure(tiny_qwen, tiny_gqa, tmp_path):
    for model_dir, tied in ((tiny_qwen, False), (tiny_gqa, True)):
        em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))
        for shape in (em.strategy.space.largest, em.strategy.space.smallest):
            out = tmp_path / f"{model_dir.name}-{shape}"
            dense = export(em, shape, out)
            r = reader(out)
            arch = field(r, "general.architecture")
            layers = dense.layers
            assert field(r, f"{arch}.block_count") == len(layers)
            assert field(r, f"{arch}.embedding_length") == dense.hidden_size
            assert field(r, f"{arch}.attention.key_length") == field(r, f"{arch}.attention.value_length") == 16
            assert field(r, f"{arch}.rope.dimension_count") == 16
            assert field(r, f"{arch}.vocab_size") == tiny.VOCAB
            if arch == "deci":
                assert field(r, "deci.feed_forward_length") == [s.n_ff for s in layers]
                assert field(r, "deci.attention.head_count") == [s.n_heads for s in layers]
                assert field(r, "deci.attention.head_count_kv") == [s.n_kv_heads for s in layers]
            else:
                assert field(r, "llama.feed_forward_length") == layers[0].n_ff
                assert field(r, "llama.attention.head_count") == layers[0].n_heads
            want = {gx.gguf_name(n): tuple(reversed(s)) for n, s in dense.tensor_specs()}  # GGUF dims: ne0 = in
            got = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
            assert got == want and len(r.tensors) == len(dense.tensor_specs())
            assert ("output.weight" in got) == (not tied)
            for t in r.tensors:
                if len(t.shape) == 1:
                    assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert field(r, "tokenizer.ggml.model") == "none"  # WordLevel test tokenizer
    assert (
        dense.record["gguf"]["tokenizer"]["model"] == "none"
        and "WordLevel" in dense.record["gguf"]["tokenizer"]["reason"]
    )


def test_q_k_permutation_is_rotate_half_to_adjacent_pairs():
    D, heads = 8, 2
    rows = torch.arange(heads * D).numpy()
    got = gx.permute_rope(rows, heads)
    # per head: HF rows (i, i + D/2) become adjacent
    assert got.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    w = np.arange(heads * D * 3).reshape(heads * D, 3)
    assert (gx.permute_rope(w, heads)[:, 0] // 3).tolist() == got.tolist()


def test_emit_is_deterministic(tiny_qwen, tmp_path):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    shape = em.strategy.space.smallest
    for name in ("a", "b"):
        export(em, shape, tmp_path / name)
    assert sha256_file(tmp_path / "a" / "model.gguf") == sha256_file(tmp_path / "b" / "model.gguf")


# ---------------------------------------------------------------- tokenizer

CORPUS = [
    "Hello world, it's 2024 and we've got 12345 apples.", "The year  1999 was  22 years ago!",
    "Numbers: 1 22 333 4444 55555, 3.14159 and 100%.", "  leading spaces\tand tabs\n\nnew lines  ",
    "naïve café — déjà vu, 東京 and 🙂 emoji.", "I'll say you'd they're we'll don't can't",
] * 20
PROBES = ["Hello world", "a  1", "x   22 apples 333", "it's 2024!\n\n  3 apples", "naïve café 🙂",
          "<|im_start|>user\nWhat is 12+30?<|im_end|>\n", "tabs\t\tand   spaces 4444"]
LLAMA3_REGEX = next(k for k, v in gx.SPLIT_PRE.items() if v == "llama-bpe")


def bpe_tokenizer(path, kind):
    """A small trained byte-level BPE tokenizer with the pre-tokenizer of `kind`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    if kind == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}
    if kind == "llama-bpe":  # Llama-3 style: the post-processor puts BOS in front
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def vocab_only_gguf(tokenizer_dir, path, vocab_size):
    """A GGUF with hyper-parameters and tokenizer only: llama.cpp loads it with vocab_only=True."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 64), ("head_count", 1),
                       ("head_count_kv", 1), ("context_length", 64), ("layer_norm_rms_eps", 1e-5)):
        getattr(w, f"add_{key}")(value)
    record = gx.add_tokenizer(w, tokenizer_dir, vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return record


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe"])
def test_bpe_tokenizer_parity_with_llama_cpp(kind, tmp_path):
    tok = bpe_tokenizer(tmp_path / "tok", kind)
    V = tok.get_vocab_size() + 5  # embedding rows beyond the tokenizer: padded as UNUSED tokens
    record = vocab_only_gguf(tmp_path / "tok", tmp_path / "v.gguf", V)
    assert record["model"] == "gpt2" and record["pre"] == kind and record["tokens"] == V
    assert record["add_bos"] == (kind == "llama-bpe") and record["chat_template"]
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    assert field(r, "tokenizer.ggml.pre") == kind and field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.token_type")[:3] == [gguf.TokenType.CONTROL] * 3
    assert field(r, "tokenizer.ggml.token_type")[-1] == gguf.TokenType.UNUSED
    llm = llama_cpp.Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text).ids, text


def test_wrong_pre_tokenizer_would_be_caught(tmp_path, monkeypatch):
    """The parity probes discriminate: SmolLM-style digits written as plain GPT-2 tokenize differently."""
    tok = bpe_tokenizer(tmp_path / "tok", "smollm")
    monkeypatch.setattr(gx, "bpe_pre", lambda tj: "gpt-2")
    vocab_only_gguf(tmp_path / "tok", tmp_path / "v.gguf", tok.get_vocab_size())
    llm = llama_cpp.Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    assert any(llm.tokenize(t.encode(), add_bos=True, special=True) != tok.encode(t).ids for t in PROBES)


def test_unknown_tokenizers_fall_back_to_none(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    (tmp_path / "t").mkdir()
    tok.save(str(tmp_path / "t" / "tokenizer.json"))
    record = vocab_only_gguf(tmp_path / "t", tmp_path / "v.gguf", 50)
    assert record["model"] == "none" and "BPE" in record["reason"]
    assert field(gguf.GGUFReader(tmp_path / "v.gguf"), "tokenizer.ggml.model") == "none"
    assert vocab_only_gguf(tmp_path / "missing", tmp_path / "w.gguf", 50)["model"] == "none"


# ---------------------------------------------------------------- profiler

@pytest.fixture(scope="module")
def profiled(tiny_qwen, tmp_path_factory):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    out = tmp_path_factory.mktemp("gguf-prof") / "p"
    export(em, em.strategy.space.smallest, out)
    return out


def test_profile_artifact_record(profiled):
    rec = profile_artifact(FLOWS["gguf"], profiled, Workload(prompt_len=12, gen_len=4, metric="e2e"), threads=1, **FAST)
    rec = json.loads(json.dumps(rec))  # JSON-serialisable
    assert rec["workload"] == {"batch": 1, "prompt_len": 12, "gen_len": 4, "metric": "e2e"}
    assert set(rec["timings"]) == {"ttft", "tpot", "e2e"}
    for t in rec["timings"].values():
        assert {"median", "p10", "p90", "n", "samples", "stable", "stop_reason"} <= set(t)
        assert len(t["samples"]) == t["n"] and t["median"] > 0
    rt = rec["runtime"]
    assert rt["flow"] == "gguf" and rt["threads"] == rt["n_threads"] == rt["n_threads_batch"] == 1
    assert rt["arch"] == "deci" and rt["n_ctx"] >= 16 and rec["artifact"] == str(profiled)
    assert rec["environment"]["versions"]["llama_cpp_python"] == llama_cpp.__version__


def last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def test_profiler_steps(profiled):
    """TPOT's rewind gives every sample the same state: one token over exactly prompt_len cells,
    computing what a fresh prefill of the prompt plus that token computes at its last position."""
    llm = prof.load_artifact(prof.artifact_file(profiled), 32, 1)
    ids = Workload(prompt_len=10).prompt_ids(tiny.VOCAB, seed=0)[0].tolist()
    assert len(ids) == 10 and max(ids) < tiny.VOCAB
    prof.rewind(llm, 0)
    first = prof.prefill(llm, ids)
    assert llm.n_tokens == 10
    nxt = prof.decode_step(llm, first)
    step = last_logits(llm)
    for _ in range(3):
        prof.decode_step(llm, nxt)
    assert llm.n_tokens == 14
    prof.rewind(llm, 10)
    assert llm.n_tokens == 10 and prof.decode_step(llm, first) == nxt
    np.testing.assert_array_equal(last_logits(llm), step)  # the same work, bit for bit
    prof.rewind(llm, 0)
    prof.prefill(llm, ids + [first])
    np.testing.assert_allclose(last_logits(llm), step, atol=1e-3)
    with pytest.raises(ValueError):
        prof.rewind(llm, 20)
    steps = prof.Steps(llm)

    def generate(n):
        steps.rewind(0)
        tokens = [steps.prefill(ids)]
        while len(tokens) < n:
            tokens.append(steps.decode(tokens[-1]))
        return tokens

    tokens = generate(5)
    assert len(tokens) == 5 and tokens[:2] == [first, nxt] and llm.n_tokens == 14
    assert generate(5) == tokens


def test_profiler_user_errors(profiled, tmp_path):
    with pytest.raises(UserError, match="batch"):
        profile_artifact(FLOWS["gguf"], profiled, Workload(batch=2, prompt_len=4), threads=1, **FAST)
    with pytest.raises(UserError, match="model.gguf"):
        profile_artifact(FLOWS["gguf"], tmp_path, Workload(prompt_len=4), threads=1, **FAST)
    with pytest.raises(UserError, match="context length"):
        profile_artifact(FLOWS["gguf"], profiled, Workload(prompt_len=300), threads=1, **FAST)
    with pytest.raises(UserError, match="threads"):
        profile_artifact(FLOWS["gguf"], profiled, Workload(prompt_len=4), threads=0, **FAST)


# ---------------------------------------------------------------- the real default model (slow)

PROMPTS = [
    "The capital of France is Paris. Deployment engineers compile one elastic model for many devices.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
]


@pytest.fixture()
def real(default_elastic):
    return default_elastic


def real_ids(em):
    tok = em.tokenizer()
    return [torch.tensor([tok(p, add_special_tokens=False)["input_ids"]]) for p in PROMPTS]


def compare(em, shape, out, ids_list, margin=0.5):
    """max |diff| over the prompts, greedy agreement over every position, and agreement over the
    positions where the reference's top-2 margin exceeds `margin` (with their count)."""
    logits = gx.load(out)
    ref = torch.cat([em.logits(ids, shape)[0] for ids in ids_list])
    got = torch.cat([logits(ids)[0] for ids in ids_list])
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    sure, n = confident_agreement(ref, got, margin)
    return {"max_diff": (ref - got).abs().max().item(), "agree": agree, "agree_confident": sure, "n_confident": n}


@pytest.mark.slow
@pytest.mark.parametrize("shape, arch", [("30x1.0", "llama"), ("24x0.75", "deci")])
def test_real_f32_parity(real, tmp_path, shape, arch):
    """Measured: 7.3e-5 (30x1.0), 6.9e-5 (24x0.75) on logits spanning about [-26, 41]."""
    shape = Shape.parse(shape)
    export(real, shape, tmp_path / "f32")
    assert field(reader(tmp_path / "f32"), "general.architecture") == arch
    p = compare(real, shape, tmp_path / "f32", real_ids(real))
    tiny.record_parity("gguf", f"SmolLM2-135M {shape}", arch == "llama", "float32", p["max_diff"])
    assert p["max_diff"] < F32_TOL and p["agree"] == 1.0, p


# Quantised files: llama.cpp also rounds activations (F16 for F16 weights, Q8 blocks for Q8_0/K
# weights), so near-tied positions flip. Measured on the 52 prompt positions, every flip had a
# reference top-2 margin below 0.5 logit; so agreement is required to be exact where the margin
# exceeds 0.5, and high (not perfect) overall.

@pytest.mark.slow
def test_real_f16_per_layer(real, tmp_path):
    """Measured (24x0.75, deci, biases): max diff 0.057, agreement 51/52 (the flip: margin 0.012)."""
    shape = Shape.parse("24x0.75")
    export(real, shape, tmp_path / "f16", quant="float16")
    p = compare(real, shape, tmp_path / "f16", real_ids(real))
    assert p["max_diff"] < 0.2 and p["agree"] >= 0.95 and p["agree_confident"] == 1.0 and p["n_confident"] >= 20, p


@pytest.mark.slow
def test_real_q8_0_greedy(real, tmp_path):
    """Measured (30x1.0): max diff 1.48, agreement 51/52, identical to llama.cpp's own Q8_0
    quantiser's file (the same bytes per block; the error is Q8_0's, weights and activations)."""
    shape = Shape.parse("30x1.0")
    export(real, shape, tmp_path / "q8", quant="q8_0")
    p = compare(real, shape, tmp_path / "q8", real_ids(real))
    assert p["agree"] >= 0.95 and p["agree_confident"] == 1.0 and p["n_confident"] >= 20, p


@pytest.mark.slow
def test_real_q4_k_m_builds_loads_and_agrees(real, tmp_path):
    """30x1.0 has n_ff = 1536 = 6 x 256. Hidden 576 is not a multiple of 256, so llama.cpp keeps
    the tensors whose rows are 576 long in a fallback type (Q5_0/Q8_0); the record lists the types.
    Measured: agreement 48/52, all four flips at margins below 0.45."""
    shape = Shape.parse("30x1.0")
    out = tmp_path / "k"
    export(real, shape, out, quant="q4_k_m")
    f32_bytes = (out / "model.gguf").stat().st_size
    rec = gx.build(out, {"name": "host"}, quant="q4_k_m")
    assert rec["built"] == ["model.gguf"] and {"Q4_K", "Q6_K"} <= set(rec["tensor_types"]), rec
    assert field(reader(out), "general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert (out / "model.gguf").stat().st_size < f32_bytes / 4
    p = compare(real, shape, out, real_ids(real))
    assert p["agree"] >= 0.85 and p["agree_confident"] == 1.0 and p["n_confident"] >= 20, (p, rec["tensor_types"])


@pytest.mark.slow
def test_real_tokenizer_and_chat_template(real, tmp_path):
    export(real, Shape.parse("19x0.5"), tmp_path / "t")
    path = tmp_path / "t" / "model.gguf"
    r = gguf.GGUFReader(path)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    # The model directory's tokenizer.json (converted from the shipped GGUF by transformers) has a
    # plain ByteLevel pre-tokenizer, so "gpt-2" is what reproduces it (see bpe_pre).
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    template = (real.dir / "chat_template.jinja").read_text()
    assert field(r, "tokenizer.chat_template") == template
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.eos_token_id") == 2
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = real.tokenizer()
    for text in PROMPTS + PROBES:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text
