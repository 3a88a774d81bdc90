"""The ExecuTorch flow: the ExecuTorch runtime runs the lowered program (KV cache inside it) and
matches the masked reference forward, through verify's all-positions path and through the timed
prefill / decode / rewind steps.

Lowering costs 20-30 s per tiny model on one thread, so the module lowers two: a per-layer
shape (uneven KV heads, a layer with no head, one with no channel, o_proj/down_proj biases, tied
embeddings) and a uniform one (stock LlamaForCausalLM, untied, llama3 RoPE scaling, batch 2)."""
import time

import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows.executorch import FLOW, runtime, writer
from amoeba_export.materialize import materialize
from amoeba_export.pipeline import VERIFY_TEXT
from amoeba_export.shapes import Shape
from amoeba_export.shared_types import Workload
from profilers.timing import time_steps

pytest.importorskip("executorch")

TOL = 1e-4  # measured: 4.8e-7 per-layer and uniform
SEED = 2  # the random strategy whose narrowest shape has 2, 1 and 1 KV heads per layer
WORKLOADS = {"per-layer": None, "uniform": Workload(batch=2, prompt_len=20, gen_len=4)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_gqa, tiny_llama3):
    """Lower once per kind for the whole module: kind -> (elastic, shape, dense, out_dir, seconds)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model_dir = tiny_gqa if kind == "per-layer" else tiny_llama3
            em = ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=SEED))
            space = em.strategy.space
            shape = Shape(min(space.depths), min(space.widths) if kind == "per-layer" else 1.0)
            dense = materialize(em, shape)
            out = tmp_path_factory.mktemp(f"executorch-{kind}")
            t0 = time.perf_counter()
            emitted = writer.emit(dense, out, em.dir, workload=WORKLOADS[kind])
            cache[kind] = (em, shape, dense, out, time.perf_counter() - t0)
            assert sorted(emitted.files) == sorted(p.name for p in out.iterdir())
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["per-layer", "uniform"])
def test_program_matches_reference(kind, exported):
    em, shape, dense, out, seconds = exported(kind)
    kv = [s.n_kv_heads for s in dense.layers]
    assert dense.uniform == (kind == "uniform")
    if kind == "per-layer":
        assert len(set(kv)) > 1 and all(s.attn_bias and s.mlp_bias for s in dense.layers), dense.layers
    config = runtime.read_config(out)
    workload = WORKLOADS[kind] or Workload()
    assert config["num_key_value_heads"] == kv and config["dtype"] == "float32"
    assert config["batch_size"] == workload.batch
    assert config["max_cache_len"] == workload.prompt_len + workload.gen_len  # under max_position_embeddings
    ids = torch.randint(3, tiny.VOCAB, (2, 22), generator=torch.Generator().manual_seed(0))  # > 16: llama3 scaling
    ref = em.logits(ids, shape)

    # verify's path: each group of rows prefilled from an empty cache, all positions out
    got = FLOW.load(out)(ids)
    assert got.shape == ref.shape and got.dtype == torch.float32
    full = (got - ref).abs().max().item()
    assert full < TOL

    # the timed path: prefill 20, then one-token decodes through the cache inside the program
    rows = ids[:workload.batch]
    opened = FLOW.open(out, Workload(batch=workload.batch, prompt_len=20, gen_len=2), None, threads=1, seed=0)
    steps = opened.steps
    logits = [steps.run(rows[:, :20])]
    logits += [steps.run(rows[:, t:t + 1]) for t in range(20, 22)]
    stepped = (torch.cat(logits, 1) - ref[:workload.batch]).abs().max().item()
    print(f"{kind}: lowering {seconds:.1f} s, max |dlogit| all positions {full:.2e}, prefill + decode {stepped:.2e}")
    tiny.record_parity("executorch", "tiny_llama3" if kind == "uniform" else "tiny_gqa", dense.uniform, "float32",
                       max(full, stepped))
    assert stepped < TOL
    # rewind: slot 21 still holds token 21, but the mask hides it from position 20
    steps.rewind(20)
    assert (steps.run(rows[:, 20:21]) - ref[:workload.batch, 20:21]).abs().max().item() < TOL
    steps.rewind(0)
    assert torch.equal(steps.prefill(rows[:, :20]), ref[:workload.batch, 19].argmax(-1)[:, None])


def test_steps_time_and_refuse_what_the_program_cannot_do(exported):
    """time_steps runs over the opened program; a batch or length it was not made for is a UserError."""
    _, _, _, out, _ = exported("uniform")
    workload = Workload(batch=2, prompt_len=16, gen_len=4, metric="e2e")
    opened = FLOW.open(out, workload, ("ttft", "tpot", "e2e"), threads=1, seed=0)
    assert opened.ids.shape == (2, 16) and opened.runtime["max_cache_len"] == 24 and opened.threads == 1
    timings = time_steps(opened.steps, opened.ids, workload, opened.metrics,
                         warmup=1, min_repeats=2, max_repeats=3, max_seconds=5.0)
    assert set(timings) == {"ttft", "tpot", "e2e"} and all(t.median > 0 for t in timings.values())
    with pytest.raises(UserError, match="runs batch 2"):
        FLOW.open(out, Workload(batch=1, prompt_len=4, gen_len=1), threads=1)
    with pytest.raises(UserError, match="needs 25 positions but the model's KV cache length"):
        FLOW.open(out, Workload(batch=2, prompt_len=24, gen_len=1), threads=1)
    steps = opened.steps
    steps.rewind(0)
    steps.prefill(opened.ids[:, :16].repeat(1, 2)[:, :24])  # fills the cache
    with pytest.raises(UserError, match="KV cache holds 24 positions"):
        steps.decode(torch.zeros(2, 1, dtype=torch.long))


def test_caps_and_bad_input(tiny_gqa, tmp_path):
    assert FLOW.name == "executorch" and FLOW.caps.per_layer and FLOW.caps.o_down_bias
    assert FLOW.caps.quants == ("float32",) and FLOW.unavailable() is None
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=SEED))
    dense = materialize(em, Shape(min(em.strategy.space.depths), 1.0), "float16")
    with pytest.raises(UserError, match="writes float32 weights, not float16"):
        writer.emit(dense, tmp_path, em.dir)
    with pytest.raises(UserError, match="not an exported ExecuTorch-flow directory"):
        FLOW.load(tmp_path)
    # the cache covers the workload, capped by the model's positions (256 for the tiny models)
    assert writer.cache_length(dense, Workload(prompt_len=200, gen_len=100)) == 256


@pytest.mark.slow
def test_default_model_pruned_shape(tmp_path, default_elastic):
    """SmolLM2-135M at 24x0.75 (per-layer): lower, then verify's path and prefill + decode against the reference.
    Slow: lowering alone took 192 s on the shared 2-core machine (docs/flow-executorch.md §5)."""
    em = default_elastic
    shape = Shape.parse("24x0.75")
    dense = materialize(em, shape, "float32")
    t0 = time.perf_counter()
    writer.emit(dense, tmp_path, em.dir, workload=Workload(prompt_len=64, gen_len=8))
    seconds = time.perf_counter() - t0
    tok = em.tokenizer()
    ids = torch.tensor([tok(VERIFY_TEXT, add_special_tokens=False)["input_ids"]])
    ref = em.logits(ids, shape)
    full = (FLOW.load(tmp_path)(ids) - ref).abs().max().item()
    steps = runtime.CacheSteps(runtime.method(tmp_path, 1), runtime.read_config(tmp_path)["max_cache_len"])
    n = ids.shape[1]
    logits = [steps.run(ids[:, :n - 2])] + [steps.run(ids[:, t:t + 1]) for t in range(n - 2, n)]
    stepped = (torch.cat(logits, 1) - ref).abs().max().item()
    print(f"lowering {seconds:.1f} s, max |dlogit| all-positions {full:.2e}, prefill+decode {stepped:.2e}")
    tiny.record_parity("executorch", "SmolLM2-135M 24x0.75", dense.uniform, "float32", max(full, stepped))
    assert max(full, stepped) < FLOW.tolerance["float32"]
