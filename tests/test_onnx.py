"""The ONNX flow: ONNX Runtime runs the exported graph, KV cache in and out, and matches the masked
reference forward; the files are deterministic; the ORT-GenAI folder generates what transformers does."""
import json
import shutil

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows import FLOWS
from amoeba_export.flows.onnx import runtime as onnx_profiler
from amoeba_export.flows.onnx import writer as ox
from amoeba_export.flows.pytorch import writer as pytorch
from amoeba_export.io import sha256_file
from amoeba_export.materialize import materialize
from amoeba_export.pipeline import VERIFY_TEXT
from amoeba_export.shapes import Shape
from profilers.profile import profile_artifact
from profilers.workload import Workload

TOL = 1e-4
SEED = 2  # the random strategy whose smallest shape has 2, 1 and 1 (gqa) KV heads per layer


def shape_of(em: ElasticModel, kind: str) -> Shape:
    """The shallowest depth at full width (uniform layers) or at the narrowest width (per-layer)."""
    space = em.strategy.space
    return Shape(min(space.depths), 1.0 if kind == "uniform" else min(space.widths))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export once per (model, kind) for the whole module: (elastic, shape, dense, out_dir)."""
    cache = {}

    def get(model_dir, kind: str):
        key = (str(model_dir), kind)
        if key not in cache:
            em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=SEED))
            shape = shape_of(em, kind)
            dense = materialize(em, shape)
            out = tmp_path_factory.mktemp(f"onnx-{kind}")
            ox.emit(dense, out, em.dir)
            cache[key] = (em, shape, dense, out)
        return cache[key]

    return get


def genai_greedy(og, folder, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from ORT-GenAI's own generation loop."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


def sha256s(d) -> dict:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def prefill_decode_diff(sess, config, em, shape, ids: torch.Tensor, prompt: int) -> list[float]:
    """Max |ORT - reference| for a prefill of `prompt` tokens from an empty past, then one-token
    decode steps fed with the presents, up to the end of `ids`."""
    ref = em.logits(ids, shape).numpy()
    logits, past = ox.step(sess, ids[:, :prompt].numpy(), ox.empty_past(config, ids.shape[0]))
    diffs = [float(np.abs(logits - ref[:, :prompt]).max())]
    for t in range(prompt, ids.shape[1]):
        logits, past = ox.step(sess, ids[:, t:t + 1].numpy(), past)
        diffs.append(float(np.abs(logits - ref[:, t:t + 1]).max()))
    assert next(iter(past.values())).shape()[2] == ids.shape[1]  # the cache grew by one per step
    return diffs


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen", "tiny_llama3"])
@pytest.mark.parametrize("kind", ["uniform", "per-layer"])
def test_prefill_and_decode_match_reference(fixture, kind, request, exported):
    em, shape, dense, out = exported(request.getfixturevalue(fixture), kind)
    kv = [s.n_kv_heads for s in dense.layers]
    assert dense.uniform == (kind == "uniform")
    if kind == "per-layer":
        assert len(set(kv)) > 1, kv  # the graph really carries per-layer KV shapes
    config = ox.read_config(out)
    assert config["num_key_value_heads"] == kv and config["dtype"] == "float32"
    sess = ox.session(out / ox.MODEL_FILE)
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    assert [i.shape[1] for i in past_inputs] == [k for k in kv for _ in (0, 1)]
    ids = torch.randint(3, tiny.VOCAB, (2, 22), generator=torch.Generator().manual_seed(0))  # > 16: llama3 scaling
    diffs = prefill_decode_diff(sess, config, em, shape, ids, prompt=20)
    assert max(diffs) < TOL, diffs
    # verify's path: the empty-past logits function
    assert (ox.load(out)(ids) - em.logits(ids, shape)).abs().max().item() < TOL


def test_export_is_deterministic(tiny_gqa, exported, tmp_path):
    em, shape, dense, out = exported(tiny_gqa, "per-layer")
    ox.emit(materialize(em, shape), tmp_path, em.dir)
    first, again = sha256s(out), sha256s(tmp_path)
    assert first == again
    assert set(first) == {"model.onnx", "onnx_config.json", "tokenizer.json", "tokenizer_config.json",
                          "generation_config.json"}
    text = (out / ox.MODEL_FILE).read_bytes()
    assert b"stack_trace" not in text and str(tmp_path).encode() not in text  # no local paths inside
    config = json.loads((out / ox.CONFIG_FILE).read_text())
    assert config["genai"]["built"] is False and "per-layer" in config["genai"]["reason"]


def test_graph_io_follows_the_genai_convention(tiny_gqa, exported):
    import onnx

    _, _, dense, out = exported(tiny_gqa, "per-layer")
    model = onnx.load(out / ox.MODEL_FILE)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert list(dims)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    D, kv0 = dense.layers[0].head_dim, dense.layers[0].n_kv_heads
    assert dims["past_key_values.0.key"] == ["batch_size", kv0, "past_sequence_length", D]
    assert dims["present.0.value"] == ["batch_size", kv0, "total_sequence_length", D]
    assert dims["logits"] == ["batch_size", "sequence_length", dense.vocab_size]
    assert ox.DATA_FILE not in [p.name for p in out.iterdir()]  # small models stay one file


def test_large_models_use_external_data(tiny_gqa, exported, tmp_path, monkeypatch):
    """Past the size limit the weights go to model.onnx.data (and model.opt.onnx.data after build)."""
    em, shape, _, _ = exported(tiny_gqa, "per-layer")
    monkeypatch.setattr(ox, "LARGE_BYTES", 0)
    files = ox.emit(materialize(em, shape), tmp_path, em.dir).files
    assert ox.DATA_FILE in files and ox.read_config(tmp_path)["external_data"] == ox.DATA_FILE
    assert ox.build(tmp_path, {"name": "host"})["built"] == [ox.OPT_FILE, ox.OPT_DATA_FILE]
    assert (tmp_path / ox.OPT_DATA_FILE).stat().st_size > (tmp_path / ox.OPT_FILE).stat().st_size
    ids = torch.randint(3, tiny.VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    assert (ox.load(tmp_path)(ids) - em.logits(ids, shape)).abs().max().item() < TOL


def test_float16_export_runs_in_ort(tiny_gqa, exported, tmp_path):
    em, shape, _, _ = exported(tiny_gqa, "per-layer")
    ox.emit(materialize(em, shape, "float16"), tmp_path, em.dir, quant="float16")
    config = ox.read_config(tmp_path)
    assert config["dtype"] == "float16"
    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    diffs = prefill_decode_diff(ox.session(tmp_path / ox.MODEL_FILE), config, em, shape, ids, prompt=10)
    assert max(diffs) < 1e-2, diffs


def test_unsupported_quant_is_a_user_error(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=SEED))
    with pytest.raises(UserError, match="onnx flow"):
        ox.emit(materialize(em, shape_of(em, "uniform")), tmp_path, em.dir, quant="q4_0")


def test_build_writes_an_optimised_graph_with_the_same_logits(tiny_qwen, exported, tmp_path):
    em, shape, _, out = exported(tiny_qwen, "per-layer")
    art = tmp_path / "a"
    shutil.copytree(out, art)
    record = ox.build(art, {"name": "host", "kind": "cpu"})
    assert record["built"] == [ox.OPT_FILE] and (art / ox.OPT_FILE).is_file()
    assert record["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert set(record["toolchain"]) >= {"onnxruntime"}
    json.dumps(record)
    assert ox.artifact_model(art) == art / ox.OPT_FILE  # verify and the profiler run what build made
    ids = torch.randint(3, tiny.VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    diffs = prefill_decode_diff(ox.session(art / ox.OPT_FILE), ox.read_config(art), em, shape, ids, prompt=12)
    assert max(diffs) < TOL, diffs
    assert (ox.load(art)(ids) - em.logits(ids, shape)).abs().max().item() < TOL
    first = sha256_file(art / ox.OPT_FILE)
    ox.build(art, {"name": "host", "kind": "cpu"})
    assert sha256_file(art / ox.OPT_FILE) == first
    # a device target gets the provider-independent level only
    assert ox.build(art, {"name": "jetson-orin", "kind": "gpu"})["graph_optimization_level"] == "ORT_ENABLE_BASIC"


def test_profiler_record_structure(tiny_gqa, exported):
    _, _, _, out = exported(tiny_gqa, "per-layer")
    w = Workload(batch=2, prompt_len=8, gen_len=4, metric="e2e")
    r = profile_artifact(FLOWS["onnx"], out, w, threads=1, min_repeats=5, max_repeats=8, max_seconds=5, warmup=1)
    assert set(r) == {"workload", "timings", "environment", "artifact", "runtime", "measure"}
    assert r["workload"] == w.to_json() and set(r["timings"]) == {"ttft", "tpot", "e2e"}
    for t in r["timings"].values():
        assert 5 <= t["n"] <= 8 and len(t["samples"]) == t["n"] and t["warmup"] == 1
        assert 0 < t["p10"] <= t["median"] <= t["p90"]
    rt = r["runtime"]
    assert rt["flow"] == "onnx" and rt["threads"] == 1 and rt["inter_op_threads"] == 1
    assert rt["provider"] == "CPUExecutionProvider" and rt["model_file"] in (ox.MODEL_FILE, ox.OPT_FILE)
    assert r["runtime"]["ort_intra_op_threads"] == 1
    json.dumps(r)
    with pytest.raises(UserError, match="max_position_embeddings"):
        profile_artifact(FLOWS["onnx"], out, Workload(1, 300, 4), threads=1)


def test_profiler_steps_are_the_greedy_decode(tiny_gqa, exported):
    """E2E's greedy loop (prefill + decode with the cache) gives the tokens of a cache-free argmax loop."""
    em, shape, _, out = exported(tiny_gqa, "uniform")
    sess, config, _ = onnx_profiler.load_artifact(out, threads=1)
    ids = Workload(2, 6, 5).prompt_ids(config["vocab_size"], seed=3)
    steps = onnx_profiler.Steps(sess, config, batch=2)
    got = [steps.prefill(ids)]
    while len(got) < 5:
        got.append(steps.decode(got[-1]))
    got = np.concatenate(got, axis=1)
    seq = torch.from_numpy(ids)
    for _ in range(5):
        seq = torch.cat([seq, em.logits(seq, shape)[:, -1].argmax(-1, keepdim=True)], 1)
    assert np.array_equal(got, seq[:, 6:].numpy())


def test_genai_blockers(tiny_gqa):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=SEED))
    assert "per-layer" in ox.genai_blocker(materialize(em, shape_of(em, "per-layer")))
    # tiny_gqa's MLP has 96 channels, its vocabulary 96 words: the builder would wire the LM head wrong
    assert "vocabulary" in ox.genai_blocker(materialize(em, shape_of(em, "uniform")))


def test_genai_builder_failure_is_recorded(tmp_path):
    (tmp_path / "hf").mkdir()
    record = ox.build_genai(tmp_path / "hf", tmp_path / "out", "fp32", timeout=300)
    assert record["built"] is False and record["reason"] and str(tmp_path) not in record["reason"]
    assert not (tmp_path / "out").exists()


def test_genai_folder_generates_like_transformers(tmp_path_factory):
    """Uniform, head_dim 16, no projection as wide as the vocabulary: the ORT-GenAI build greedy-
    generates the tokens transformers generates from the PyTorch-flow export of the same model."""
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    model_dir = tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_genai"), layers=4, ff=128, seed=5)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=SEED, min_depth=3))
    dense = materialize(em, shape_of(em, "uniform"))
    assert dense.uniform and ox.genai_blocker(dense) is None
    out = tmp_path_factory.mktemp("onnx-genai")
    files = ox.emit(dense, out, em.dir).files
    config = json.loads((out / ox.CONFIG_FILE).read_text())
    assert config["genai"]["built"] is True, config["genai"]
    assert "genai/genai_config.json" in files and "genai/model.onnx" in files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the builder's HF input is gone
    genai = json.loads((out / "genai" / "genai_config.json").read_text())["model"]
    assert genai["eos_token_id"] < genai["vocab_size"] == tiny.VOCAB
    assert genai["decoder"]["head_size"] == 16 and genai["decoder"]["num_hidden_layers"] == len(dense.layers)

    hf_dir = tmp_path_factory.mktemp("hf")
    pytorch.emit(dense, hf_dir, em.dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt, n = [5, 17, 42, 8, 60], 12
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):]

    assert genai_greedy(og, out / "genai", prompt, n) == want.tolist()

    again = tmp_path_factory.mktemp("onnx-genai-again")
    ox.emit(dense, again, em.dir)
    assert sha256s(again) == sha256s(out)  # the builder's files are deterministic too


def test_genai_float16_cpu_build_is_refused_and_caught(tmp_path):
    """fp16 is a known blocker, and the post-build check catches a build that does not run."""
    model_dir = tiny.make_tiny_model(tmp_path / "m", layers=4, ff=128, seed=5)
    em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=SEED, min_depth=3))
    dense = materialize(em, shape_of(em, "uniform"), "float16")
    assert "float16" in ox.genai_blocker(dense)
    (tmp_path / "hf").mkdir()
    pytorch.emit(dense, tmp_path / "hf", em.dir)
    record = ox.build_genai(tmp_path / "hf", tmp_path / "genai", "fp16", timeout=300)
    assert record["built"] is False and record["reason"].startswith("onnxruntime-genai check"), record
    assert not (tmp_path / "genai").exists()


@pytest.mark.slow
def test_default_model_pruned_shape(tmp_path, default_elastic):
    """SmolLM2-135M at 24x0.75 (per-layer): export, build, prefill + decode in ORT against the reference."""
    import time

    em = default_elastic
    shape = Shape.parse("24x0.75")
    dense = materialize(em, shape, "float32")
    t0 = time.perf_counter()
    ox.emit(dense, tmp_path, em.dir)
    seconds = time.perf_counter() - t0
    ox.build(tmp_path, {"name": "host", "kind": "cpu"})
    config = ox.read_config(tmp_path)
    assert config["num_hidden_layers"] == 24 and config["external_data"] is None
    # text, not random ids: a random-id prompt can hit an ill-conditioned position where even two
    # PyTorch summation orders differ by 7e-4 (measured), which says nothing about the export
    tok = em.tokenizer()
    texts = [VERIFY_TEXT, "Small language models run on phones, laptops and embedded boards when pruned well enough."]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    for name in (ox.MODEL_FILE, ox.OPT_FILE):
        diffs = prefill_decode_diff(ox.session(tmp_path / name), config, em, shape, ids, prompt=n - 2)
        assert max(diffs) < 1e-3, (name, diffs)
    print(f"export {seconds:.1f} s, parity {max(diffs):.2e}")


@pytest.mark.slow
def test_default_model_genai_generates_like_transformers(tmp_path, default_elastic):
    """SmolLM2-135M at 19x1.0 (uniform, head_dim 64): the genai/ folder greedy-generates what
    transformers generates from the PyTorch-flow export."""
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    em = default_elastic
    dense = materialize(em, Shape.parse("19x1.0"), "float32")
    out, hf_dir = tmp_path / "onnx", tmp_path / "hf"
    out.mkdir(), hf_dir.mkdir()
    ox.emit(dense, out, em.dir)
    assert ox.read_config(out)["genai"]["built"] is True
    pytorch.emit(dense, hf_dir, em.dir)
    prompt, n = em.tokenizer()(VERIFY_TEXT, add_special_tokens=False)["input_ids"], 16
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):]
    assert genai_greedy(og, out / "genai", prompt, n) == want.tolist()
