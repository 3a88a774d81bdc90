"""The OpenVINO flow: OpenVINO's CPU plugin runs the stateful IR and matches the masked reference
forward (all positions, and prefill + decode through the state); int8 is stored as i8; the files are
deterministic; the timed runtime steps, rewinds and records what the plugin chose."""
import json
import re

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows.openvino import FLOW, runtime, writer
from amoeba_export.io import sha256_file
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape
from amoeba_export.shared_types import Workload
from profilers.timing import time_steps

SEED = 2  # the random strategy whose smallest shape has 2, 1 and 1 (gqa) KV heads per layer
TOL = 1e-4  # float32
# against the float32 reference, measured on these models at most 8.6e-4 (float16) and 1.4e-2 (int8)
LIMITS = {"float16": 5e-3, "int8": 5e-2}


def shape_of(em: ElasticModel, kind: str) -> Shape:
    """The shallowest depth at full width (uniform layers) or at the narrowest width (per-layer)."""
    space = em.strategy.space
    return Shape(min(space.depths), 1.0 if kind == "uniform" else min(space.widths))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Emit once per (model, kind, format) for the whole module: (elastic, shape, dense, out_dir)."""
    cache = {}

    def get(model_dir, kind: str, fmt: str = "float32"):
        key = (str(model_dir), kind, fmt)
        if key not in cache:
            em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=SEED))
            shape = shape_of(em, kind)
            dense = materialize(em, shape, "float16" if fmt == "float16" else "float32")
            out = tmp_path_factory.mktemp(f"ov-{kind}-{fmt}")
            emitted = FLOW.emit(dense, out, em.dir, quant="int8" if fmt == "int8" else None)
            assert sorted(emitted.files) == sorted(p.name for p in out.iterdir())
            cache[key] = (em, shape, dense, out)
        return cache[key]

    return get


def sha256s(d) -> dict:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir())}


def ids_for(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, tiny.VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def step_diffs(steps, ref: np.ndarray, ids: torch.Tensor, prompt: int) -> list[float]:
    """Max |Δ| of a prefill of `prompt` tokens from an empty cache, then one decode step per token."""
    steps.rewind(0)
    diffs = [float(np.abs(steps.forward(ids[:, :prompt].numpy()) - ref[:, :prompt]).max())]
    for t in range(prompt, ids.shape[1]):
        diffs.append(float(np.abs(steps.forward(ids[:, t:t + 1].numpy()) - ref[:, t:t + 1]).max()))
    assert steps.cached() == ids.shape[1]  # the state grew by one per step
    return diffs


def top5(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of positions where the artifact's greedy token is among the reference's top 5."""
    return float((ref.topk(5, -1).indices == got.argmax(-1, keepdim=True)).any(-1).float().mean())


# llama3's RoPE scaling is the same graph at either kind: one export of it is enough
@pytest.mark.parametrize("fixture, kind", [("tiny_gqa", "uniform"), ("tiny_qwen", "uniform"), ("tiny_gqa", "per-layer"),
                                           ("tiny_qwen", "per-layer"), ("tiny_llama3", "per-layer")])
def test_float32_matches_reference(fixture, kind, request, exported):
    """All positions (verify's `load`) and prefill + decode through the state, within 1e-4; the IR
    has one input, one output and one state per past tensor with its layer's KV-head count."""
    em, shape, dense, out = exported(request.getfixturevalue(fixture), kind)
    kv = [s.n_kv_heads for s in dense.layers]
    assert dense.uniform == (kind == "uniform")
    if kind == "per-layer":
        assert len(set(kv)) > 1, kv
    config = runtime.read_config(out)
    assert config["num_key_value_heads"] == kv and config["dtype"] == "float32" and config["inputs"] == ["input_ids"]
    compiled = runtime.compile_model(out)
    assert [p.get_any_name() for p in compiled.inputs] == ["input_ids"]
    assert [p.get_any_name() for p in compiled.outputs] == ["logits"]
    steps = runtime.OVSteps(compiled.create_infer_request())
    ids = ids_for(2, 22, 0)  # > 16 positions: llama3's scaling matters
    ref = em.logits(ids, shape)
    diffs = step_diffs(steps, ref.numpy(), ids, prompt=20)
    assert max(diffs) < TOL, diffs
    variables = config["states"]["variables"]
    got = {s.name: s.state.shape[1] for s in steps.request.query_state()}
    assert got == {variables[p]: kv[int(p.split(".")[1])] for p in config["states"]["past"]}
    # rewind to the prompt, decode again: the same logits as the first time
    steps.rewind(20)
    assert np.abs(steps.forward(ids[:, 20:21].numpy()) - ref[:, 20:21].numpy()).max() < TOL
    # verify's path: all positions from an empty cache, batch 1 as well
    logits = FLOW.load(out)
    assert (logits(ids) - ref).abs().max().item() < TOL
    assert (logits(ids[:1, :7]) - ref[:1, :7]).abs().max().item() < TOL


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_compressed_weights(fmt, tiny_qwen, exported):
    """float16 stores f16 constants, int8 stores i8 ones (one per linear plus the embedding and the
    untied LM head) at about a quarter of float32's bytes; both stay close to the reference."""
    em, shape, dense, out = exported(tiny_qwen, "per-layer", fmt)
    _, _, _, fp32 = exported(tiny_qwen, "per-layer")
    xml = (out / writer.MODEL_FILE).read_text()
    types = re.findall(r'element_type="(\w+)"', xml)
    ratio = (out / writer.WEIGHTS_FILE).stat().st_size / (fp32 / writer.WEIGHTS_FILE).stat().st_size
    if fmt == "int8":
        assert types.count("i8") == 7 * len(dense.layers) + 2 and "f16" not in types
        assert ratio < 0.3, ratio
    else:
        assert "f16" in types and "i8" not in types and 0.45 < ratio < 0.55, ratio
    assert runtime.read_config(out)["dtype"] == fmt
    ids = ids_for(2, 22, 1)
    ref = em.logits(ids, shape)
    steps = runtime.OVSteps(runtime.compile_model(out).create_infer_request())
    diffs = step_diffs(steps, ref.numpy(), ids, prompt=18)
    got = FLOW.load(out)(ids)
    assert max(diffs) < LIMITS[fmt] and (got - ref).abs().max().item() < LIMITS[fmt], diffs
    assert top5(got, ref) == 1.0
    print(f"{fmt}: max |dlogit| {max(diffs):.2e}, .bin {ratio:.2f} of float32")


def test_emit_is_deterministic(tiny_qwen, exported, tmp_path):
    em, shape, _, out = exported(tiny_qwen, "per-layer", "int8")
    FLOW.emit(materialize(em, shape, "float32"), tmp_path, em.dir, quant="int8")
    assert sha256s(out) == sha256s(tmp_path)
    assert set(sha256s(out)) == {writer.MODEL_FILE, writer.WEIGHTS_FILE, writer.CONFIG_FILE, "tokenizer.json",
                                 "tokenizer_config.json", "generation_config.json"}
    assert str(tmp_path).encode() not in (tmp_path / writer.MODEL_FILE).read_bytes()


def test_open_times_the_shipped_runtime(tiny_gqa, exported):
    """`open` compiles with the plugin's defaults and records them; time_steps runs its three metrics;
    the greedy tokens of its steps are those of a cache-free argmax loop over the reference."""
    em, shape, _, out = exported(tiny_gqa, "uniform")
    w = Workload(batch=2, prompt_len=6, gen_len=5, metric="e2e")
    opened = FLOW.open(out, w, threads=1, seed=3)
    rt = opened.runtime
    assert opened.threads == 1 and rt["threads"] == 1 and rt["hints"] == "plugin defaults"
    props = rt["properties"]
    assert props["INFERENCE_NUM_THREADS"] == 1 and props["NUM_STREAMS"] == 1 and props["PERFORMANCE_HINT"] == "LATENCY"
    assert props["KV_CACHE_PRECISION"] in ("u8", "f16", "bf16", "f32")
    json.dumps(rt)
    timings = time_steps(opened.steps, opened.ids, w, ("ttft", "tpot", "e2e"), warmup=1, min_repeats=3,
                         max_repeats=4, max_seconds=5)
    assert set(timings) == {"ttft", "tpot", "e2e"} and all(t.median > 0 for t in timings.values())
    steps = opened.steps
    steps.rewind(0)
    tokens = [steps.prefill(opened.ids)]
    for _ in range(w.gen_len - 1):
        tokens.append(steps.decode(tokens[-1]))
    seq = torch.from_numpy(opened.ids)
    for _ in range(w.gen_len):
        seq = torch.cat([seq, em.logits(seq, shape)[:, -1].argmax(-1, keepdim=True)], 1)
    assert np.array_equal(np.concatenate(tokens, 1), seq[:, w.prompt_len:].numpy())
    steps.rewind(w.prompt_len)
    assert steps.cached() == w.prompt_len
    with pytest.raises(UserError, match="max_position_embeddings"):
        FLOW.open(out, Workload(1, 300, 4), threads=1)


def test_bad_input_is_a_user_error(tiny_gqa, tmp_path):
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=SEED))
    with pytest.raises(UserError, match="openvino flow"):
        FLOW.emit(materialize(em, shape_of(em, "uniform"), "bfloat16"), tmp_path, em.dir)
    with pytest.raises(UserError, match="openvino flow"):
        FLOW.emit(materialize(em, shape_of(em, "uniform")), tmp_path, em.dir, quant="q4_0")
    with pytest.raises(UserError, match="openvino_config.json"):
        FLOW.load(tmp_path)


@pytest.mark.slow
def test_default_model_pruned_shape(tmp_path, default_elastic):
    """SmolLM2-135M at 24x0.75 (per-layer), float32 and int8: all positions and prefill + decode on
    the CPU plugin against the masked reference."""
    import time

    from amoeba_export.pipeline import VERIFY_TEXT

    em = default_elastic
    shape = Shape.parse("24x0.75")
    tok = em.tokenizer()
    texts = [VERIFY_TEXT, "Small language models run on phones, laptops and embedded boards when pruned well enough."]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    ref = em.logits(ids, shape)
    report = {}
    for fmt in ("float32", "int8"):
        out = tmp_path / fmt
        out.mkdir()
        t0 = time.perf_counter()
        FLOW.emit(materialize(em, shape, "float32"), out, em.dir, quant="int8" if fmt == "int8" else None)
        seconds = time.perf_counter() - t0
        steps = runtime.OVSteps(runtime.compile_model(out).create_infer_request())
        diffs = step_diffs(steps, ref.numpy(), ids, prompt=n - 2)
        got = FLOW.load(out)(ids)
        report[fmt] = (max(diffs), (got - ref).abs().max().item(), top5(got, ref), seconds,
                       (out / writer.WEIGHTS_FILE).stat().st_size)
    print(report)
    assert report["float32"][0] < 1e-3 and report["float32"][1] < 1e-3, report
    assert report["int8"][2] >= 0.9 and report["int8"][4] < 0.3 * report["float32"][4], report
