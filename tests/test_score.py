"""score: the AccuracyTable on a tiny random model, checked exactly against the metrics."""
from __future__ import annotations

import json
import math
import random

import pytest
import tiny

import trainer.data as data
from amoeba_export import score
from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.metrics import mc_accuracy, perplexity
from amoeba_export.strategy import Strategy
from trainer.data import MCItem

ITEMS = {
    "arc_easy": [MCItem("w1 w2 w3", [" w4", " w5 w6", " w7"], 1), MCItem("w8 w9", [" w10", " w11"], 0),
                 MCItem("w12", [" w13 w14", " w15"], 1)],
    "piqa": [MCItem("w20 w21", [" w22", " w23"], 1), MCItem("w30 w31 w32", [" w33 w34", " w35"], 0)],
}


@pytest.fixture(scope="module")
def setup(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tiny.random_strategy(tiny_gqa).save(root / "strategy")
    rng = random.Random(0)
    text = root / "heldout.txt"
    text.write_text("\n\n".join(" ".join(f"w{rng.randrange(93)}" for _ in range(40)) for _ in range(5)))
    elastic = ElasticModel(tiny_gqa, Strategy.load(root / "strategy"))
    cfg = score.EvalConfig(heldout=str(text), ppl_windows=4, seq_len=16, mc_limit=3, ppl_batch=3, mc_batch=2)
    return elastic, root / "strategy", cfg


@pytest.fixture(autouse=True)
def fake_mc(monkeypatch):
    monkeypatch.setattr(data, "mc_items", lambda task, limit=None, seed=0: ITEMS[task][:limit])


def body(table) -> str:
    return json.dumps(table.to_json(provenance=False), sort_keys=True)


def test_table_covers_every_shape_and_matches_the_metrics(setup, tmp_path):
    elastic, sdir, cfg = setup
    shapes = list(elastic.strategy.space)
    table = score.score_shapes(elastic, shapes, cfg, tmp_path / "acc.json", progress=False, strategy_dir=sdir)
    assert set(table.entries) == set(shapes) and len(shapes) == 12

    tok = elastic.tokenizer()
    windows, items = score.eval_set(tok, cfg)
    assert windows.shape == (4, 16)
    largest = elastic.strategy.space.largest
    full = table.entries[largest]
    assert full["ppl"] == perplexity(elastic.logits_fn(largest), windows, cfg.ppl_batch)
    assert full["ppl_tokens"] == 4 * 15
    for task in cfg.mc_tasks:
        assert full["mc"][task] == mc_accuracy(elastic.logits_fn(largest), tok, items[task], cfg.mc_batch)
    assert full["mc_mean_acc"] == pytest.approx(sum(full["mc"][t]["acc_norm"] for t in cfg.mc_tasks) / 2)
    assert table.score(largest) == -math.log(full["ppl"])
    assert table.scores() == {s: -math.log(e["ppl"]) for s, e in table.entries.items()}
    # every smaller shape is a different model, so every perplexity differs from the full one
    assert all(e["ppl"] != full["ppl"] for s, e in table.entries.items() if s != largest)
    assert len({e["ppl"] for e in table.entries.values()}) == len(shapes)
    # the file on disk is the returned table
    assert body(score.AccuracyTable.load(tmp_path / "acc.json")) == body(table)


def test_resume_after_interrupt_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    elastic, sdir, cfg = setup
    shapes = list(elastic.strategy.space)
    whole = score.score_shapes(elastic, shapes, cfg, tmp_path / "whole.json", progress=False, strategy_dir=sdir)

    calls = []
    real = score.perplexity

    def interrupting(fn, windows, batch_size=4, progress=False):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(fn, windows, batch_size, progress)

    out = tmp_path / "acc.json"
    monkeypatch.setattr(score, "perplexity", interrupting)
    with pytest.raises(KeyboardInterrupt):
        score.score_shapes(elastic, shapes, cfg, out, progress=False, strategy_dir=sdir)
    partial = score.AccuracyTable.load(out)
    assert set(partial.entries) == set(shapes[:2])  # checkpointed after every shape
    assert not list(tmp_path.glob(".*partial*"))  # no temporary file left behind

    evaluated = []
    monkeypatch.setattr(
        score, "score_shape", lambda fn, *a, _real=score.score_shape: evaluated.append(1) or _real(fn, *a)
    )
    monkeypatch.setattr(
        elastic, "logits_fn", lambda shape, _real=elastic.logits_fn: evaluated.append(shape) or _real(shape)
    )
    monkeypatch.setattr(score, "perplexity", real)
    table = score.score_shapes(elastic, shapes, cfg, out, progress=False, strategy_dir=sdir)
    assert [s for s in evaluated if s != 1] == shapes[2:]
    assert body(table) == body(whole)
    assert body(score.AccuracyTable.load(out)) == body(whole)

    # complete: a rerun evaluates nothing
    evaluated.clear()
    score.score_shapes(elastic, shapes, cfg, out, progress=False, strategy_dir=sdir)
    assert evaluated == []


def test_other_eval_set_or_stale_table_is_rescored(setup, tmp_path):
    elastic, sdir, cfg = setup
    shapes = list(elastic.strategy.space)[:2]
    out = tmp_path / "acc.json"
    first = score.score_shapes(elastic, shapes, cfg, out, progress=False, strategy_dir=sdir)
    doc = json.loads(out.read_text())
    doc["strategy"]["fingerprint"] = "0" * 16
    doc["entries"][str(shapes[0])]["ppl"] = 1.0
    out.write_text(json.dumps(doc))
    again = score.score_shapes(elastic, shapes, cfg, out, progress=False, strategy_dir=sdir)
    assert body(again) == body(first)

    other = score.EvalConfig(heldout=cfg.heldout, ppl_windows=2, seq_len=16, mc_limit=2)
    assert other.key() != cfg.key()
    t2 = score.score_shapes(elastic, shapes, other, out, progress=False, strategy_dir=sdir)
    assert t2.eval == other.to_json() and t2.entries[shapes[0]]["ppl_tokens"] == 2 * 15


def test_stale_corrupt_and_wrong_schema_tables_are_user_errors(setup, tmp_path):
    elastic, sdir, cfg = setup
    out = tmp_path / "acc.json"
    table = score.score_shapes(elastic, list(elastic.strategy.space)[:1], cfg, out, progress=False, strategy_dir=sdir)
    mfp, sfp = elastic.info["fingerprint"], score.strategy_fingerprint(sdir)
    assert table.model["fingerprint"] == mfp and table.strategy_fingerprint == sfp and len(sfp) == 16
    score.AccuracyTable.load(out, mfp, sfp)
    with pytest.raises(UserError, match="stale accuracy table for another model/strategy: rerun amoeba-export score"):
        score.AccuracyTable.load(out, "f" * 16, sfp)
    with pytest.raises(UserError, match="stale accuracy table"):
        score.AccuracyTable.load(out, mfp, "f" * 16)

    doc = json.loads(out.read_text())
    for bad, match in [
        (out.read_text()[:-40], "corrupt JSON"),
        (json.dumps({**doc, "version": 99}), "version 99"),
        (json.dumps({**doc, "format": "something else"}), "not an amoeba-export accuracy table"),
        (json.dumps({**doc, "entries": {"thirty": {"ppl": 3.0}}}), "corrupt accuracy table"),
        (json.dumps({**doc, "entries": {"6x1.0": {"ppl": -1}}}), "corrupt accuracy table"),
        (json.dumps({k: v for k, v in doc.items() if k != "model"}), "corrupt accuracy table"),
    ]:
        out.write_text(bad)
        with pytest.raises(UserError, match=match):
            score.AccuracyTable.load(out)


def test_save_is_byte_deterministic_and_round_trips(setup, tmp_path):
    elastic, sdir, cfg = setup
    table = score.score_shapes(elastic, list(elastic.strategy.space)[:3], cfg, tmp_path / "acc.json",
                               progress=False, strategy_dir=sdir)
    table.save(tmp_path / "a.json")
    table.save(tmp_path / "b.json")
    a = (tmp_path / "a.json").read_bytes()
    assert a == (tmp_path / "b.json").read_bytes()
    score.AccuracyTable.load(tmp_path / "a.json").save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == a
    doc = json.loads(a)
    assert list(doc) == sorted(doc) and doc["score"] == "-log(ppl)"
    # wall-clock facts only under provenance
    assert set(doc["provenance"]["seconds"]) == {str(s) for s in table.entries}
    assert all("seconds" not in e for e in doc["entries"].values())


def test_default_path_and_key(setup):
    _, sdir, cfg = setup
    d = score.EvalConfig()
    assert d.key() == "boolq-8x512-arc_easy+piqa-50-s0"
    assert score.default_path(sdir) == sdir / f"accuracy-{d.key()}.json"
    assert score.default_path(sdir, cfg).parent == sdir
    assert cfg.key().startswith("heldout-") and "/" not in cfg.key()
    # batch sizes are how, not what: they change neither the key nor the eval set
    fast = score.EvalConfig(heldout=cfg.heldout, ppl_windows=4, seq_len=16, mc_limit=3, ppl_batch=1, mc_batch=7)
    assert fast.key() == cfg.key() and fast.to_json() == cfg.to_json()
    with pytest.raises(UserError):
        score.EvalConfig(ppl_windows=0)
