"""Latency tables: the per-component fit, validation figures, resume, storage, estimated tables."""
import json

import numpy as np
import pytest
import tiny

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows import FLOWS
from amoeba_export.materialize import materialize
from profilers.profile import profile_table
from profilers.tables import REPEAT_ERROR, LatencyTable, build_estimated, build_measured, features
from profilers.workload import Workload
from targets import load_target

TRUE = np.array([2e-3, 1e-4, 3e-5, 1e-5, 2e-7])  # fixed, per layer, per head, per kv head, per channel


@pytest.fixture(scope="module")
def plans(tiny_qwen):
    em = ElasticModel(tiny_qwen, tiny.random_strategy(tiny_qwen, seed=3))
    return em, {s: materialize(em, s) for s in em.strategy.space}


def fake_measure(plans, noise=0.0, calls=None):
    rng = np.random.default_rng(0)

    def measure(shape):
        if calls is not None:
            calls.append(shape)
        t = float(np.dot(TRUE, features(plans[shape])) * (1 + noise * rng.standard_normal()))
        return {"median": t, "p10": t, "p90": t, "samples": [t]}
    return measure


def kwargs():
    return dict(target={"name": "host", "cpu": "test"}, flow="pytorch", model={"name": "m", "fingerprint": "f"},
                strategy="s", workload=Workload(), progress=False)


def test_exact_component_model_predicts_every_shape(plans):
    _, p = plans
    table = build_measured(p, fake_measure(p), n_validate=4, **kwargs())
    for shape, dense in p.items():
        assert table.entries[str(shape)]["predicted"] == pytest.approx(np.dot(TRUE, features(dense)), rel=1e-6)
    v = table.validation
    assert v["n"] == 4 and v["median_abs_rel_error"] < 1e-6 and v["within_10pct"] == 1.0
    assert len(table.component["fit_shapes"]) <= 8  # 8 of 60 shapes for the default model


def test_validation_reports_noise(plans):
    _, p = plans
    table = build_measured(p, fake_measure(p, noise=0.02), n_validate=4, **kwargs())
    assert 0.001 < table.validation["median_abs_rel_error"] < REPEAT_ERROR and table.validation["passes"] == 1


def test_a_drifting_machine_is_measured_again_and_pooled(plans):
    """Timings that drift from shape to shape (35% noise) miss the fit's validation by far more than
    REPEAT_ERROR: one pass says so; with passes=3 every shape is measured three times, samples pooled."""
    _, p = plans
    notes = []
    table = build_measured(p, fake_measure(p, noise=0.35), n_validate=4, notice=notes.append, **kwargs())
    assert table.validation["passes"] == 1 and "`amoeba-export profile --passes 3`" in notes[-1]
    calls, notes = [], []
    table = build_measured(p, fake_measure(p, noise=0.35, calls=calls), n_validate=4, notice=notes.append, passes=3,
                           **kwargs())
    measured = [e["measured"] for e in table.entries.values() if "measured" in e]
    assert table.validation["passes"] == 3 and len(calls) == 3 * len(measured)
    assert all(len(m["samples"]) == 3 and m["passes"] == 3 for m in measured)
    assert "measured again and the samples pooled (pass 2 of 3)" in notes[0]


def test_resume_measures_only_what_is_missing(plans, tmp_path):
    _, p = plans
    ck = tmp_path / "t.partial"
    calls = []
    boom = fake_measure(p, calls=calls)

    def interrupted(shape):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return boom(shape)

    with pytest.raises(KeyboardInterrupt):
        build_measured(p, interrupted, n_validate=4, checkpoint=ck, **kwargs())
    assert len(json.loads(ck.read_text())["measured"]) == 3
    again = []
    full = build_measured(p, fake_measure(p, calls=again), n_validate=4, checkpoint=ck, **kwargs())
    first = build_measured(p, fake_measure(p), n_validate=4, **kwargs())
    assert len(again) == len(first.component["fit_shapes"]) + 4 - 3
    assert full.entries == first.entries


def test_a_damaged_checkpoint_is_reported_and_measured_again(plans, tmp_path):
    _, p = plans
    ck = tmp_path / ".t.checkpoint"
    ck.write_text('{"settings": {"target": "host"}, "measu')  # cut short
    calls, notes = [], []
    build_measured(p, fake_measure(p, calls=calls), n_validate=4, checkpoint=ck, notice=notes.append, **kwargs())
    assert "unreadable profiling checkpoint" in notes[0] and len(calls) == 8 + 4


def test_save_load_and_stale_check(plans, tmp_path):
    _, p = plans
    table = build_measured(p, fake_measure(p), n_validate=2, **kwargs())
    path = LatencyTable.path("host", "pytorch", "m", Workload(), root=tmp_path)
    table.save(path)
    back = LatencyTable.load(path)
    assert back.entries == table.entries and back.as_mapping()[next(iter(p))] == table.latency(next(iter(p)))
    with pytest.raises(UserError, match="stale"):
        back.check({"fingerprint": "other"}, "s")
    path.write_text("{}")
    with pytest.raises(UserError, match="schema"):
        LatencyTable.load(path)


def test_estimated_table_says_so(plans):
    em, p = plans
    table = build_estimated(p, target=load_target("jetson-orin"), flow="mlc", model={"name": "m", "fingerprint": "f"},
                            strategy=None, workload=Workload())
    assert table.source == "estimated" and "amoeba-export profile" in table.validation["note"]
    lat = table.as_mapping()
    assert lat[em.strategy.space.largest] > lat[em.strategy.space.smallest] > 0


def test_profile_host_pytorch_end_to_end(tiny_gqa, tmp_path):
    """Real exports timed by the PyTorch profiler (tiny model, few repeats): a complete table."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=1))
    table, path = profile_table(em, load_target("host"), FLOWS["pytorch"], Workload(1, 8, 4, "tpot"), n_validate=2,
                                threads=1, root=tmp_path, warmup=1, min_repeats=3, max_repeats=5)
    assert path.is_file() and not (path.parent / f".{path.name}.checkpoint").exists()
    measured = [e for e in table.entries.values() if "measured" in e]
    assert len(measured) == len(table.component["fit_shapes"]) + 2
    assert all(e["measured"]["median"] > 0 and e["measured"]["samples"] for e in measured)
    assert all(e["measured"]["other_load"] is not None for e in measured)  # what competed with each timing
    hw = table.provenance["hardware"]
    assert hw["cores"] >= 1 and hw["memory_gib"] >= 1 and hw["bandwidth_gbs"] > 0 and table.source == "measured"
    with pytest.raises(UserError, match="measures the machine it runs on"):
        profile_table(em, load_target("a5000"), FLOWS["pytorch"], Workload(), root=tmp_path)
