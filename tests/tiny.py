"""Tiny random LLaMA-family models and strategies built in code, for exact behavioural tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from amoeba_export.base_model import model_info
from amoeba_export.strategy import LayerWidth, Strategy, full_width

VOCAB = 96


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(VOCAB - 3):
        vocab[f"w{i}"] = i + 3
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_model(path: Path, *, layers=6, hidden=64, heads=4, kv_heads=2, head_dim=16, ff=96,
                    tied=True, qkv_bias=False, model_type="llama", seed=0, **extra) -> Path:
    """Save a random model in HF format (safetensors) with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=500000.0 if not tied else 10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra,
    )
    if model_type == "llama":
        cfg.attention_bias = qkv_bias
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init so pruning visibly matters
            p.normal_(0, 0.2)
        if model_type == "llama" and qkv_bias and hasattr(model.model.layers[0].self_attn.o_proj, "bias"):
            for layer in model.model.layers:  # o_proj bias stays zero: Qwen2-style q/k/v biases
                layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)


def random_strategy(model_dir: Path, widths=(1.0, 0.75, 0.5), seed=0, min_depth=None) -> Strategy:
    """Random (not calibrated) layer sets and masks that exercise every edge: uneven GQA groups,
    a layer with no head, a layer with no channel, non-zero compensation biases."""
    info = model_info(model_dir)
    rng = np.random.default_rng(seed)
    L, H = info["n_layers"], info["hidden_size"]
    min_depth = min_depth or max(1, L - 3)
    depths = {d: sorted(rng.choice(L, d, replace=False).tolist()) for d in range(min_depth, L + 1)}
    plans = {}
    for w in widths:
        if w == 1.0:
            plans[w] = full_width(info)
            continue
        per = []
        for i in range(L):
            q = rng.random(info["n_heads"]) < w
            c = rng.random(info["n_ff"]) < w
            if i == 1:
                q[:] = False  # attention fully pruned
            if i == 2:
                c[:] = False  # MLP fully pruned
            per.append(
                LayerWidth(q, c, rng.normal(0, 0.1, H).astype(np.float32), rng.normal(0, 0.1, H).astype(np.float32))
            )
        plans[w] = per
    return Strategy(model=info, depths=depths, widths=plans, meta={"source": "random (tests)"})


def ids(n_tokens: int = 40, batch: int = 2, seed: int = 0):
    """Seeded token ids [batch, n_tokens] above the special tokens (3..VOCAB-1)."""
    return torch.randint(3, VOCAB, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def strategy_with_accuracy(model_dir: Path, sdir: Path, seed: int = 0) -> Strategy:
    """Save a random strategy into `sdir` with a monotone accuracy table beside it (more layers and
    width score better), so a budgeted compile searches without scoring."""
    from amoeba_export.score import AccuracyTable, EvalConfig, default_path, strategy_fingerprint

    strategy = random_strategy(model_dir, seed=seed)
    strategy.save(sdir)
    entries = {s: {"ppl": 100.0 / (s.depth * s.width), "mc": {}, "mc_mean_acc": None} for s in strategy.space}
    AccuracyTable(model={"name": strategy.model["name"], "fingerprint": strategy.model["fingerprint"]},
                  strategy_fingerprint=strategy_fingerprint(sdir), eval=EvalConfig().to_json(), entries=entries
                  ).save(default_path(sdir))
    return strategy


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    import pytest

    from amoeba_export.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
