"""SMOL adapter (router, gate, mixed-weight merge, storage), PEFT LoRA input and the upstream
AmoebaLLM checkpoint import: every exported shape reproduces the masked adapter forward."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import tiny
import torch
from safetensors.torch import save_file
from test_export_parity import export
from test_upstream import make_upstream, save_upstream

from amoeba_export.adapter import LoRA, load_adapter
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows import FLOWS
from amoeba_export.materialize import materialize
from amoeba_export.pipeline import compile_shape
from amoeba_export.shapes import Shape
from amoeba_export.smol import SMOL
from amoeba_export.upstream import import_checkpoint

TOL = 1e-4
HOST = {"name": "host", "flows": ["pytorch"]}


@pytest.fixture(scope="module")
def setup(tiny_gqa):
    """Tiny GQA model, a random strategy (uneven GQA groups, a layer with no head, one with no
    channel) and a random SMOL (3 experts, top-2) over the strategy's widths."""
    strategy = tiny.random_strategy(tiny_gqa, seed=3)
    em = ElasticModel(tiny_gqa, strategy)
    smol = SMOL.random(em.info, sorted(strategy.widths, reverse=True), n_experts=3, top_k=2, seed=1)
    em.adapter = smol
    return em, smol


def check_every_shape(em, tmp_path, what: str) -> float:
    ids, worst = tiny.ids(24), 0.0
    for shape in em.strategy.space:
        _, logits = export(em, shape, tmp_path / str(shape))
        diff = (em.logits(ids, shape) - logits(ids)).abs().max().item()
        assert diff < TOL, (shape, diff)
        worst = max(worst, diff)
    print(
        f"\n{what}: {len(em.strategy.space)} shapes, max |Δlogit| exported vs masked adapter forward = {worst:.2e} "
        "(fp32)"
    )
    return worst


# --------------------------------------------------------------------------- SMOL parity and merge


def test_smol_export_matches_masked_forward_for_every_shape(setup, tmp_path):
    em, smol = setup
    check_every_shape(em, tmp_path, "SMOL parity")
    chosen = {tuple(smol.gate(s)[1]) for s in em.strategy.space}
    assert len(chosen) > 1  # the router picks different experts for different shapes
    shape = em.strategy.space.smallest
    plain = ElasticModel(em.dir, em.strategy)
    assert (
        plain.logits(tiny.ids(24), shape) - em.logits(tiny.ids(24), shape)
    ).abs().max() > 1e-2  # the adapter matters
    assert materialize(em, shape).record["adapter"]["experts"] == smol.gate(shape)[1]


def test_merge_mixes_weights_not_outputs(setup):
    _, smol = setup
    shape = Shape(5, 0.75)
    g, chosen = smol.gate(shape)
    for layer, proj in [(0, "q_proj"), (3, "down_proj"), (5, "k_proj")]:
        A, B = smol.experts[(layer, proj)]
        merged = smol.delta(shape, layer, proj).weight()
        mixed = smol.scale * (sum(g[i] * B[i] for i in chosen) @ sum(g[i] * A[i] for i in chosen))
        per_expert = sum(g[i] * smol.scale * (B[i] @ A[i]) for i in chosen)
        torch.testing.assert_close(merged, mixed, atol=1e-5, rtol=1e-5)
        assert (merged - per_expert).abs().max() > 1e-3  # the cross-expert terms g_i g_j B_i A_j are there


def test_gate(setup):
    em, smol = setup
    gates = {}
    for shape in em.strategy.space:
        g, chosen = smol.gate(shape)
        assert int((g != 0).sum()) == smol.top_k == len(chosen)
        assert set(torch.nonzero(g).flatten().tolist()) == set(chosen)
        assert abs(float(g.sum()) - 1) < 1e-6
        assert torch.equal(g, smol.gate_for(em.strategy.layers(shape.depth), shape.width)[0])  # deterministic
        gates[shape] = g
    # depth alone and width alone change the gate (the router sees the kept-layer mask and the width)
    assert not torch.equal(gates[Shape(5, 0.75)], gates[Shape(4, 0.75)])
    assert not torch.equal(gates[Shape(5, 0.75)], gates[Shape(5, 0.5)])
    shape = Shape(5, 0.75)
    noisy = lambda seed: smol.gate(shape, generator=torch.Generator().manual_seed(seed))[0]  # noqa: E731
    assert torch.equal(noisy(5), noisy(5))  # reproducible per seed
    assert not torch.equal(noisy(5), noisy(6)) and not torch.equal(noisy(5), gates[shape])
    assert int((noisy(5) != 0).sum()) == 2 and abs(float(noisy(5).sum()) - 1) < 1e-6
    assert torch.equal(smol.gate(shape)[0], gates[shape])  # drawing noise leaves the export gate alone
    rec = smol.record(shape)
    assert rec["kind"] == "smol" and rec["deterministic"]
    assert rec["gate"] == gates[shape].tolist() and rec["experts"] == smol.gate(shape)[1]
    assert rec["top_k_margin"] >= 0 and len(rec["noise_scale"]) == smol.n_experts


def test_gate_needs_known_depth_and_width(setup):
    em, _ = setup
    smol = SMOL.random(em.info, [1.0, 0.75, 0.5], seed=2)  # not attached: knows only the full depth
    smol.gate(Shape(6, 0.5))
    with pytest.raises(UserError, match="which layers depth 4 keeps"):
        smol.gate(Shape(4, 0.5))
    with pytest.raises(UserError, match="not one the SMOL adapter was trained for"):
        smol.gate(Shape(6, 0.625))


# --------------------------------------------------------------------------- storage


def test_save_load_round_trip_is_byte_identical(setup, tmp_path):
    em, smol = setup
    smol.save(tmp_path / "a")
    smol.save(tmp_path / "a2")
    back = load_adapter(tmp_path / "a", em.info)
    assert isinstance(back, SMOL)
    back.save(tmp_path / "b")
    for name in ("adapter.json", "adapter.safetensors"):
        assert (
            (tmp_path / "a" / name).read_bytes()
            == (tmp_path / "b" / name).read_bytes()
            == (tmp_path / "a2" / name).read_bytes()
        )
    back.bind(em.strategy)
    for shape in em.strategy.space:
        assert back.gate(shape)[1] == smol.gate(shape)[1] and torch.equal(back.gate(shape)[0], smol.gate(shape)[0])
    shape = em.strategy.space.smallest
    assert torch.equal(back.delta(shape, 2, "up_proj").weight(), smol.delta(shape, 2, "up_proj").weight())


def test_corrupt_or_foreign_adapter_is_one_line_error(setup, tiny_qwen, tmp_path):
    from amoeba_export.base_model import model_info

    em, smol = setup
    smol.save(tmp_path / "a")
    with pytest.raises(UserError, match="lora_A"):  # another base model: named tensor
        load_adapter(tmp_path / "a", {**model_info(tiny_qwen), "n_layers": 6})
    with pytest.raises(UserError, match="6-layer model"):
        load_adapter(tmp_path / "a", {**em.info, "n_layers": 8})
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tmp_path / "missing", em.info)
    data = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    (tmp_path / "a" / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_adapter(tmp_path / "a", em.info)
    smol.save(tmp_path / "c")
    (tmp_path / "c" / "adapter.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        load_adapter(tmp_path / "c", em.info)
    smol.save(tmp_path / "d")
    doc = json.loads((tmp_path / "d" / "adapter.json").read_text())
    doc["experts"].append([0, "q_proj_x"])
    (tmp_path / "d" / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="corrupt adapter"):
        load_adapter(tmp_path / "d", em.info)


# --------------------------------------------------------------------------- PEFT LoRA


@pytest.fixture(scope="module")
def peft_dir(tiny_gqa, tmp_path_factory):
    """A real PEFT LoRA (r=4, alpha=8) on the tiny model, lora_B randomised so it is not a no-op."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("peft") / "lora"
    model.save_pretrained(out)
    return out


def peft_logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_peft_lora_every_shape_and_peft_itself(setup, peft_dir, tmp_path):
    em0, _ = setup
    lora = load_adapter(peft_dir, em0.info)
    assert isinstance(lora, LoRA) and {d.scale for d in lora.deltas.values()} == {2.0}
    assert {p for _, p in lora.deltas} == {"q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    em = ElasticModel(em0.dir, em0.strategy, lora)
    check_every_shape(em, tmp_path, "PEFT LoRA parity")
    ids, full = tiny.ids(24, seed=1), em.strategy.space.largest
    diff = (em.logits(ids, full) - peft_logits(em.dir, peft_dir, ids)).abs().max().item()
    print(f"PEFT LoRA: masked forward at {full} vs PeftModel forward: max |Δlogit| = {diff:.2e}")
    assert diff < TOL
    assert (ElasticModel(em.dir, em.strategy).logits(ids, full) - em.logits(ids, full)).abs().max() > 1e-2


def test_peft_rslora_and_unsupported_features(setup, peft_dir, tmp_path):
    import shutil

    em0, _ = setup
    rs = tmp_path / "rs"
    shutil.copytree(peft_dir, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    lora = load_adapter(rs, em0.info)
    assert {d.scale for d in lora.deltas.values()} == {8 / 2}  # alpha / sqrt(r)
    em, ids = ElasticModel(em0.dir, em0.strategy, lora), tiny.ids(24, seed=2)
    assert (em.logits(ids, em.strategy.space.largest) - peft_logits(em.dir, rs, ids)).abs().max() < TOL
    for change, needle in [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "LoRA biases"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "rewrote the base weights"),
        ({"target_modules": ["q_proj"]}, "does not target"),
    ]:
        (rs / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=needle):
            load_adapter(rs, em0.info)


# --------------------------------------------------------------------------- CLI


def test_cli_exports_with_adapter(setup, tmp_path, capsys):
    em, smol = setup
    em.strategy.save(tmp_path / "s")
    smol.save(tmp_path / "ad")
    code, out, err = tiny.run_cli(capsys, "--target", "host", "--flow", "pytorch", "--shape", "5x0.75", "--adapter",
                                  str(tmp_path / "ad"), "--model", str(em.dir), "--strategy", str(tmp_path / "s"),
                                  "--out", str(tmp_path / "o"), "--no-build")
    assert code == 0, err
    assert "adapter: SMOL, deterministic gate" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    rec = manifest["materialize"]["adapter"]
    assert rec["kind"] == "smol" and rec["deterministic"] and rec["experts"] == smol.gate(Shape(5, 0.75))[1]
    assert rec["gate"] == smol.gate(Shape(5, 0.75))[0].tolist()
    assert set(manifest["inputs"]["adapter"]["sha256"]) == {"adapter.json", "adapter.safetensors"}
    assert manifest["parity"]["max_abs_logit_diff"] < TOL
    code, _, err = tiny.run_cli(capsys, "--target", "host", "--flow", "pytorch", "--shape", "5x0.75", "--adapter",
                                str(tmp_path / "nope"), "--model", str(em.dir), "--strategy", str(tmp_path / "s"),
                                "--out", str(tmp_path / "o2"), "--no-build")
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], err


# --------------------------------------------------------------------------- upstream checkpoint

PREFIX = "base_model.model.model.layers"
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ROUTER = "base_model.lora_sparsemoe.router"


def write_upstream_checkpoint(root, info, width_choice="[1,7/8,3/4]", n_widths=3, E=3, r=4, alpha=16, seed=0):
    """`root/checkpoint-10/adapter_model/{adapter_config.json, adapter_model.safetensors}` in exactly
    the upstream layout (docs/amoeba-algorithm.md §8), plus Trainer files and an older checkpoint that must be
    ignored. Returns the tensors as written."""
    from amoeba_export.adapter import projection_shape

    g = torch.Generator().manual_seed(seed)
    L, n_in = info["n_layers"], info["n_layers"] + n_widths
    t = {}
    for layer in range(L):
        for proj, block in BLOCK.items():
            out_f, in_f = projection_shape(info, proj)
            for e in range(E):
                t[f"{PREFIX}.{layer}.{block}.{proj}.lora_A.{e}.weight"] = torch.randn(r, in_f, generator=g) * 0.2
                t[f"{PREFIX}.{layer}.{block}.{proj}.lora_B.{e}.weight"] = torch.randn(out_f, r, generator=g) * 0.2
    t[f"{ROUTER}.topkroute_linear.0.weight"] = torch.randn(16, n_in, generator=g)
    t[f"{ROUTER}.topkroute_linear.0.bias"] = torch.randn(16, generator=g)
    t[f"{ROUTER}.topkroute_linear.1.weight"] = torch.randn(E, 16, generator=g) * 0.5
    t[f"{ROUTER}.topkroute_linear.1.bias"] = torch.randn(E, generator=g)
    t[f"{ROUTER}.noise_linear.weight"] = torch.randn(E, n_in, generator=g) * 0.3
    t[f"{ROUTER}.noise_linear.bias"] = torch.randn(E, generator=g) * 0.3
    # PEFT saves the frozen embeddings when the vocabulary was resized (+1 [PAD] row, docs/amoeba-algorithm.md §8)
    embed = torch.randn(tiny.VOCAB + 1, info["hidden_size"], generator=g)
    adapter = root / "checkpoint-10" / "adapter_model"
    adapter.mkdir(parents=True)
    save_file({**t, "base_model.model.model.embed_tokens.weight": embed}, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "target_modules": list(BLOCK), "use_moe_lora": True, "num_experts": E, "top_k": 2,
              "moe_lora_v2": False, "width_choice": width_choice, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "inference_mode": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (root / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (root / "checkpoint-5" / "adapter_model").mkdir(parents=True)
    (root / "checkpoint-5" / "adapter_model" / "adapter_config.json").write_text("{broken")
    return t


def upstream_forward(t, doc, L, width_choice_text, shape, layer, proj, scale):
    """The upstream math, written out: set_active_layers' router input, NoisyTopkRouter without
    noise, and the bnb Linear forward's mixing of expert weights. Returns (gate, indices, ΔW)."""
    width_choice = eval(width_choice_text)  # the test wrote this string; upstream evals it the same way
    mask = torch.ones(L) if shape.depth == L else torch.tensor(doc["strategy"][L - shape.depth], dtype=torch.float32)
    feature = torch.zeros(len(width_choice))
    feature[width_choice.index(shape.width)] = 1
    x = torch.cat([mask, feature])
    router = torch.nn.Sequential(
        torch.nn.Linear(x.numel(), 16), torch.nn.Linear(16, t[f"{ROUTER}.topkroute_linear.1.bias"].numel())
    )
    router.load_state_dict(
        {
            "0.weight": t[f"{ROUTER}.topkroute_linear.0.weight"],
            "0.bias": t[f"{ROUTER}.topkroute_linear.0.bias"],
            "1.weight": t[f"{ROUTER}.topkroute_linear.1.weight"],
            "1.bias": t[f"{ROUTER}.topkroute_linear.1.bias"],
        }
    )
    with torch.no_grad():
        logits = router(x)
    top, indices = logits.topk(2, dim=-1)
    gate = torch.softmax(torch.full_like(logits, float("-inf")).scatter(-1, indices, top), dim=-1)
    name = f"{PREFIX}.{layer}.{BLOCK[proj]}.{proj}"
    A = sum(t[f"{name}.lora_A.{i}.weight"] * gate[i] for i in indices)
    B = sum(t[f"{name}.lora_B.{i}.weight"] * gate[i] for i in indices)
    return gate, indices.tolist(), (B @ A) * scale


def test_upstream_checkpoint_import_and_export(setup, tmp_path, capsys):
    em0, _ = setup
    info = em0.info
    L = info["n_layers"]
    doc, _, _ = make_upstream(info, ratios=(1.0, 0.875, 0.75, 0.5), seed=4)
    npy = save_upstream(tmp_path / "dp_selection_strategy.npy", doc)
    t = write_upstream_checkpoint(tmp_path / "amoeba_llama2", info)

    strategy, smol = import_checkpoint(tmp_path / "amoeba_llama2", npy, info)
    assert smol.n_experts == 3 and smol.r == 4 and smol.scale == 16 / 4 and smol.top_k == 2
    assert smol.width_choice == [1.0, 0.875, 0.75] and smol.meta["path"].endswith("checkpoint-10/adapter_model")
    assert smol.meta["ignored_tensors"] == ["base_model.model.model.embed_tokens.weight"]
    assert sorted(strategy.widths) == [0.75, 0.875, 1.0] and strategy.meta["dropped_widths"] == [
        "0.5"
    ]  # no router input
    for shape in strategy.space:
        for layer, proj in [(strategy.layers(shape.depth)[0], "q_proj"), (L - 1, "down_proj"), (2, "v_proj")]:
            gate, chosen, dW = upstream_forward(t, doc, L, "[1,7/8,3/4]", shape, layer, proj, 16 / 4)
            g, ours = smol.gate(shape)
            assert ours == chosen
            torch.testing.assert_close(g, gate, atol=1e-6, rtol=0)
            torch.testing.assert_close(smol.delta(shape, layer, proj).weight(), dW, atol=1e-5, rtol=1e-5)

    # the CLI writes our formats; an imported checkpoint exports with parity, gate recorded
    code, _, err = tiny.run_cli(
        capsys,
        "import-checkpoint",
        str(tmp_path / "amoeba_llama2"),
        "--strategy-npy",
        str(npy),
        "--model",
        str(em0.dir),
        "--out",
        str(tmp_path / "imported"),
    )
    assert code == 0, err
    assert "dropped strategy widths 0.5" in err
    em = ElasticModel(em0.dir, None)
    from amoeba_export.strategy import Strategy

    em.use_strategy(Strategy.load(tmp_path / "imported" / "strategy"))
    em.adapter = load_adapter(tmp_path / "imported" / "adapter", info)
    worst = 0.0
    for shape in (em.strategy.space.smallest, Shape(5, 0.875), em.strategy.space.largest):
        res = compile_shape(
            em,
            shape,
            FLOWS["pytorch"],
            HOST,
            tmp_path / f"out-{shape}",
            strategy_dir=tmp_path / "imported" / "strategy",
            adapter_dir=tmp_path / "imported" / "adapter",
            build=False,
        )
        rec = res.manifest["materialize"]["adapter"]
        gate, chosen, _ = upstream_forward(t, doc, L, "[1,7/8,3/4]", shape, 0, "q_proj", 4.0)
        assert rec["experts"] == chosen and rec["deterministic"]
        assert res.manifest["parity"]["max_abs_logit_diff"] < TOL
        worst = max(worst, res.manifest["parity"]["max_abs_logit_diff"])
    print(f"\nimported upstream checkpoint: compile_shape parity max |Δlogit| = {worst:.2e} (fp32)")
    # the checkpoint directory itself is also accepted by --adapter
    direct = load_adapter(tmp_path / "amoeba_llama2" / "checkpoint-10", info)
    direct.bind(em.strategy)
    assert direct.gate(Shape(4, 0.75))[1] == em.adapter.gate(Shape(4, 0.75))[1]


def test_upstream_router_width_pitfalls(setup, tmp_path):
    em0, _ = setup
    info = em0.info
    # the config's width_choice lists 4 widths, but the router was trained with 3 inputs for widths
    write_upstream_checkpoint(tmp_path / "a", info, width_choice="[1,7/8,3/4,5/8]", n_widths=3)
    with pytest.raises(UserError, match=r"6 layers \+ 3 widths.*--width-choice"):
        load_adapter(tmp_path / "a", info)
    from amoeba_export.upstream import import_adapter

    smol = import_adapter(tmp_path / "a", info, width_choice=[1.0, 0.875, 0.75])
    assert smol.width_choice == [1.0, 0.875, 0.75]
    # a router for another depth of model
    with pytest.raises(UserError, match="too few"):
        load_adapter(tmp_path / "a", {**info, "n_layers": 12})
    # float keys of the strategy snap onto the adapter's exact values
    assert [float(Fraction(s)) for s in ("1", "7/8", "3/4")] == smol.width_choice
    doc, _, _ = make_upstream(info, ratios=(1.0, 0.875000001, 0.75), seed=1)
    strategy, _ = import_checkpoint(tmp_path / "a", save_upstream(tmp_path / "s.npy", doc), info, [1.0, 0.875, 0.75])
    assert sorted(strategy.widths) == [0.75, 0.875, 1.0] and "dropped_widths" not in strategy.meta
    # upstream names are required exactly
    bad = tmp_path / "b"
    write_upstream_checkpoint(bad, info)
    f = bad / "checkpoint-10" / "adapter_model" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(f))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.0.weight"] = tensors.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.0.weight")
    save_file(tensors, str(f))
    with pytest.raises(UserError, match="unexpected tensor"):
        load_adapter(bad, info)


def test_accuracy_tables_are_kept_apart_per_adapter(setup, tmp_path, monkeypatch):
    """An adapter changes accuracy: the budget search reads the table scored with that adapter
    (its fingerprint is in the file name), never the strategy's plain table."""
    import shutil

    from amoeba_export import score
    from amoeba_export.adapter import adapter_fingerprint
    from amoeba_export.pipeline import accuracy_table

    em0, smol = setup
    sdir = tmp_path / "s"
    tiny.strategy_with_accuracy(em0.dir, sdir, seed=3)
    em = ElasticModel(em0.dir, None)
    from amoeba_export.strategy import Strategy

    em.use_strategy(Strategy.load(sdir))
    smol.save(tmp_path / "ad")
    plain = score.default_path(sdir)
    assert accuracy_table(em, sdir, print).entries  # the plain table, found beside the strategy

    def refuse(*a, **k):
        raise RuntimeError("would score")

    monkeypatch.setattr(score, "score_shapes", refuse)
    with pytest.raises(RuntimeError, match="would score"):  # the plain table is not the adapter's
        accuracy_table(em, sdir, print, tmp_path / "ad")
    fp = adapter_fingerprint(tmp_path / "ad")
    shutil.copy(plain, score.default_path(sdir, adapter=fp))
    assert score.default_path(sdir, adapter=fp).name.endswith(f"-adapter-{fp}.json")
    assert accuracy_table(em, sdir, print, tmp_path / "ad").entries
