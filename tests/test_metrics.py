"""Perplexity and multiple-choice scoring against hand-computed values on tiny in-code models."""
from __future__ import annotations

import math

import pytest
import torch

from amoeba_export.errors import UserError
from amoeba_export.metrics import choice_logprobs, mc_accuracy, nll_per_window, perplexity
from trainer.data import MCItem

VOCAB = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "a": 3, "b": 4, "c": 5, "d": 6}
V = len(VOCAB)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Word-level tokenizer built in code: one token per whitespace-separated word."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, V, generator=g, dtype=torch.float64) * 2.0


def bigram(table):
    return lambda ids: table[ids]


def causal_mean(table):
    """Logits at t depend on every token <= t (running mean of rows), so a misaligned position
    or padding that leaked backwards would change the scores."""
    def fn(ids):
        rows = table[ids]
        steps = torch.arange(1, ids.shape[1] + 1, dtype=rows.dtype)[None, :, None]
        return rows.cumsum(1) / steps
    return fn


def log_softmax_row(row, j):
    return row[j] - math.log(sum(math.exp(x) for x in row))


def hand_perplexity(table, windows):
    t = table.tolist()
    total, count = 0.0, 0
    for w in windows.tolist():
        for a, b in zip(w[:-1], w[1:]):
            total -= log_softmax_row(t[a], b)
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_hand_computation_and_ignores_batch_size(table):
    windows = torch.randint(0, V, (7, 9), generator=torch.Generator().manual_seed(1))
    expected = hand_perplexity(table, windows)
    for bs in (1, 3, 4, 100):
        got = perplexity(bigram(table), windows, batch_size=bs)
        assert got == pytest.approx(expected, rel=1e-9), bs


def test_perplexity_uniform_logits_equals_vocab_size():
    windows = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    assert perplexity(lambda ids: torch.zeros(*ids.shape, V), windows) == pytest.approx(V, rel=1e-6)


def test_perplexity_half_precision_logits_are_upcast(table):
    windows = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(3))
    exact = perplexity(bigram(table), windows)
    got = perplexity(bigram(table.to(torch.bfloat16)), windows)
    assert got == pytest.approx(exact, rel=5e-2)


def test_nll_per_window_sums_and_counts(table):
    windows = torch.randint(0, V, (5, 4), generator=torch.Generator().manual_seed(4))
    sums, counts = nll_per_window(bigram(table), windows, batch_size=2)
    assert sums.dtype == torch.float64 and counts.tolist() == [3] * 5
    t = table.tolist()
    for w, s in zip(windows.tolist(), sums.tolist()):
        assert s == pytest.approx(-sum(log_softmax_row(t[a], b) for a, b in zip(w, w[1:])), rel=1e-12)


def test_perplexity_rejects_bad_windows(table):
    with pytest.raises(UserError):
        perplexity(bigram(table), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(UserError):
        perplexity(bigram(table), torch.zeros(0, 8, dtype=torch.long))


def probs_table(rows: dict[str, dict[str, float]]) -> torch.Tensor:
    """Logits whose softmax gives the listed probabilities; the rest is spread evenly."""
    tab = torch.zeros(V, V, dtype=torch.float64)
    for src, dist in rows.items():
        p = torch.full((V,), (1.0 - sum(dist.values())) / (V - len(dist)), dtype=torch.float64)
        for dst, q in dist.items():
            p[VOCAB[dst]] = q
        tab[VOCAB[src]] = p.log()
    return tab


# a -> b has log-prob -1.0; a -> c and c -> c have log-prob -0.6 each.
MC_TABLE = probs_table({"a": {"b": math.exp(-1.0), "c": math.exp(-0.6)},
                        "c": {"c": math.exp(-0.6)}})


def test_choice_logprobs_exact(tiny_tokenizer):
    items = [MCItem("a", [" b", " c c c"], 0)]
    (sc,) = choice_logprobs(bigram(MC_TABLE), tiny_tokenizer, items)
    assert sc.tolist() == pytest.approx([-1.0, -1.8], rel=1e-12)


def test_mc_accuracy_right_and_wrong_answers(tiny_tokenizer):
    fn = bigram(MC_TABLE)
    # acc: " b" (-1.0) beats " c c c" (-1.8). Per character: -1.0/2 = -0.5 loses to -1.8/6 = -0.3.
    right = [MCItem("a", [" b", " c c c"], 0)]
    assert mc_accuracy(fn, tiny_tokenizer, right) == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    wrong = [MCItem("a", [" b", " c c c"], 1)]
    assert mc_accuracy(fn, tiny_tokenizer, wrong) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    # Equal lengths: a -> c (-0.6) beats a -> b (-1.0) both raw and normalised.
    mixed = [MCItem("a", [" c", " b"], 0), MCItem("a", [" c", " b"], 1),
             MCItem("a", [" b", " c"], 1), MCItem("a", [" b", " c"], 1)]
    assert mc_accuracy(fn, tiny_tokenizer, mixed) == {"acc": 0.75, "acc_norm": 0.75, "n": 4}


def test_choice_logprobs_hand_computed_with_context_dependent_model(tiny_tokenizer, table):
    items = [MCItem("a b", [" c", " d d a", " b c"], 2),
             MCItem("d", [" a b c d", " c"], 0),
             MCItem("c c a", [" a", " b", " d"], 1)]
    fn = causal_mean(table)

    def hand(context, choice):
        ctx = tiny_tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tiny_tokenizer(choice, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([ctx + cont])
        logits = fn(seq)[0].tolist()
        return sum(log_softmax_row(logits[p - 1], seq[0, p].item())
                   for p in range(len(ctx), seq.shape[1]))

    expected = [[hand(it.context, c) for c in it.choices] for it in items]
    for bs in (1, 3, 8):  # mixed lengths in one batch exercise the right padding
        got = choice_logprobs(fn, tiny_tokenizer, items, batch_size=bs)
        for e, g in zip(expected, got):
            assert g.tolist() == pytest.approx(e, rel=1e-12), bs


def test_mc_accuracy_rejects_empty_context(tiny_tokenizer, table):
    with pytest.raises(UserError):
        mc_accuracy(bigram(table), tiny_tokenizer, [MCItem("", [" a", " b"], 0)])
    with pytest.raises(UserError):
        mc_accuracy(bigram(table), tiny_tokenizer, [])
