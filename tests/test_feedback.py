"""Budgets that hold on this machine: hardware fingerprints, spot checks, feedback rounds, load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from amoeba_export.errors import UserError
from amoeba_export.feedback import BUDGET_SLACK, Feedback, SpotCheck, rescaled, spot_shapes
from amoeba_export.flows import FLOWS
from amoeba_export.search import search
from amoeba_export.shapes import Shape
from profilers.tables import LatencyTable, hardware_differences, hardware_fingerprint, strategy_fingerprint
from profilers.timing import load_snapshot, other_load, quiet_enough
from targets import load_target

run = tiny.run_cli

HERE = {"name": "host", "cpu": "Xeon", "cpu_flags": "abc", "cores": 2, "arch": "x86_64", "memory_gib": 24,
        "bandwidth_gbs": 10.0}


def test_hardware_fingerprint_rounds_memory_and_tolerates_probe_noise():
    a = hardware_fingerprint({"name": "host", "cpu": "Xeon", "cores": 2, "memory_bytes": 24 * 2**30 + 116 * 1024,
                              "bandwidth_gbs": 10.0, "cpu_flags": "abc", "arch": "x86_64"})
    b = hardware_fingerprint({"name": "host", "cpu": "Xeon", "cores": 2, "memory_bytes": 24 * 2**30,
                              "bandwidth_gbs": 11.5, "cpu_flags": "abc", "arch": "x86_64"})
    assert a["memory_gib"] == b["memory_gib"] == 24
    assert hardware_differences(a, b) == []  # 116 KiB of memory and 15% of bandwidth are the same machine type
    assert hardware_differences(a, {**b, "bandwidth_gbs": 14.0}) == ["memory bandwidth 10 GB/s (here 14)"]
    assert hardware_differences(a, {**b, "cpu_flags": "def"}) == ["CPU flags differ"]
    assert hardware_differences({k: v for k, v in a.items() if k != "cpu_flags"}, b) == ["CPU flags not recorded"]
    assert hardware_differences(None, b) == ["the table records no hardware"]
    assert hardware_differences(a, {**b, "cpu": "EPYC"}) == ["cpu Xeon (here EPYC)"]


def table(entries: dict, hardware=None) -> LatencyTable:
    return LatencyTable(target="host", flow="pytorch", model={"name": "m", "fingerprint": "f"}, strategy="s",
                        workload={}, source="measured", entries={k: {"predicted": v} for k, v in entries.items()},
                        component={"coef": [1.0, 2.0]}, provenance={"hardware": hardware or {"cpu": "Other"}})


LAT = {"6x1.0": 0.010, "6x0.5": 0.007, "5x1.0": 0.009, "5x0.5": 0.006, "4x1.0": 0.008, "4x0.5": 0.005}


def test_spot_check_rescales_a_consistent_table():
    t = table(LAT)
    shapes = spot_shapes([Shape.parse(k) for k in LAT])
    assert [str(s) for s in shapes] == ["6x1.0", "4x0.5", "5x1.0"]  # largest, smallest, middle
    check = SpotCheck(
        [str(s) for s in shapes],
        [LAT[str(s)] for s in shapes],
        [LAT[str(s)] * r for s, r in zip(shapes, (1.30, 1.25, 1.35))],
        threads=2,
    )
    assert check.consistent and check.factor == pytest.approx(1.30)
    new = rescaled(t, check, HERE, "/shipped/t.json")
    assert new is not t and t.entries["5x0.5"] == {"predicted": 0.006}  # the input is untouched
    assert new.latency(Shape.parse("5x0.5")) == pytest.approx(0.006 * 1.30)
    assert new.latency(Shape.parse("4x0.5")) == pytest.approx(0.005 * 1.25)  # measured here
    assert new.provenance["hardware"] == HERE and new.provenance["rescaled"]["from_hardware"] == {"cpu": "Other"}
    assert new.component["coef"] == pytest.approx([1.3, 2.6])
    assert hardware_differences(new.provenance["hardware"], HERE) == []  # the next run trusts it


def test_spot_check_disagreeing_ratios_are_not_one_factor():
    check = SpotCheck(["6x1.0", "4x0.5", "5x0.5"], [0.01, 0.005, 0.006], [0.010, 0.0075, 0.006])
    assert not check.consistent  # x1.0 against x1.5: the machine differs in more than speed


def test_feedback_rescales_and_picks_a_faster_shape():
    score = {Shape.parse(k): Shape.parse(k).depth * Shape.parse(k).width for k in LAT}
    raw = {Shape.parse(k): v for k, v in LAT.items()}
    budget = 0.0085
    first = search(score, raw, budget)
    assert str(first.shape) == "4x1.0"  # 8.0 ms: the best score under 8.5 ms
    truth = {s: v * 1.25 for s, v in raw.items()}  # this machine is 25% slower than the table
    measured = []

    def measure(shape):
        measured.append(str(shape))
        return {"median": truth[shape]}

    loop = Feedback(budget, raw)
    notes = []
    result = loop.repick(lambda lat: search(score, lat, budget), measure, first, truth[first.shape], notes.append)
    assert truth[result.shape] <= budget * (1 + BUDGET_SLACK)
    assert loop.rounds[0].shape == str(first.shape) and loop.rounds[0].factor == pytest.approx(1.25)
    assert "feedback round 1" in notes[0] and "x1.25" in notes[0]
    assert len(loop.rounds) <= 3 and loop.to_json()["factor"] == pytest.approx(1.25)


def test_feedback_says_when_nothing_fits_after_correction():
    score = {Shape.parse(k): 1.0 for k in LAT}
    raw = {Shape.parse(k): v for k, v in LAT.items()}
    loop = Feedback(0.0055, raw)
    first = search(score, raw, 0.0055)
    with pytest.raises(UserError, match="after correcting the latency table by x2.00"):
        loop.repick(
            lambda lat: search(score, lat, 0.0055),
            lambda s: {"median": raw[s] * 2},
            first,
            raw[first.shape] * 2,
            lambda m: None,
        )


def test_a_spike_is_measured_again_before_feedback_acts():
    loop = Feedback(0.010, {Shape.parse("6x1.0"): 0.009})
    assert loop.confirm({"median": 0.020}, lambda: {"median": 0.0095})["median"] == 0.0095  # one spike
    assert loop.confirm({"median": 0.020}, lambda: {"median": 0.030})["median"] == 0.020  # really slower
    assert loop.confirm({"median": 0.009}, lambda: pytest.fail("within budget: not measured again"))["median"] == 0.009


def test_other_load_counts_other_processes_only():
    start = load_snapshot()
    sum(i * i for i in range(3_000_000))  # our own work is not "other load"
    own = other_load(start)
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        start = load_snapshot()
        hog.wait()
        theirs = other_load(start)
    finally:
        hog.kill()
    if own is None:
        pytest.skip("/proc/stat is not readable here")
    assert own < 0.6 and theirs > 0.6
    assert quiet_enough(1, 0.2) and not quiet_enough(os.cpu_count(), 1.0)


@pytest.fixture()
def budget_setup(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setenv("AMOEBA_EXPORT_TABLES", str(tmp_path / "tables"))
    sdir = tmp_path / "strategy"
    tiny.strategy_with_accuracy(tiny_gqa, sdir, seed=2)
    common = [
        "--target",
        "host",
        "--flow",
        "pytorch",
        "--model",
        str(tiny_gqa),
        "--strategy",
        str(sdir),
        "--threads",
        "1",
        "--prompt-len",
        "16",
        "--gen-len",
        "4",
        "--no-build",
        "--dtype",
        "float32",
    ]
    return tmp_path, common


COST = 1e-8  # seconds per byte of weights: the fake machine's speed


def fake_timing(seconds: float) -> dict:
    return {"median": seconds, "samples": [seconds], "noisy": False, "other_load": 0.0, "threads": 1,
            "environment": {"warnings": []}}


def scripted_setup(tmp_path, tiny_gqa, hardware: dict):
    """A table for the tiny model whose latencies are COST x weight bytes, recorded as measured on
    `hardware`: (its latency per shape, its path)."""
    from amoeba_export.elastic import load_elastic
    from amoeba_export.pipeline import legal_plans
    from profilers.workload import Workload

    elastic, sdir = load_elastic(tiny_gqa, tmp_path / "strategy")
    plans = legal_plans(elastic, FLOWS["pytorch"], load_target("host"), dtype="float32")
    table_s = {s: COST * 4 * d.parameters() for s, d in plans.shapes.items()}
    wl = Workload(1, 16, 4, "tpot")
    t = LatencyTable(
        target="host",
        flow="pytorch",
        model={"name": elastic.info["name"], "fingerprint": elastic.info["fingerprint"]},
        strategy=strategy_fingerprint(sdir),
        workload=wl.to_json(),
        source="measured",
        entries={str(s): {"predicted": v} for s, v in table_s.items()},
        provenance={"hardware": hardware},
    )
    path = LatencyTable.path("host", "pytorch", elastic.info["name"], wl)
    t.save(path)
    return table_s, path


def script_machine(monkeypatch, slowdown, artifact: float = 1.0):
    """This machine: a shape measured by the profiler takes COST x weight bytes x slowdown(shape);
    a compiled artifact, COST x its weight bytes x `artifact`."""
    import profilers.profile as prof
    from amoeba_export.io import safetensors_header

    def artifact_bytes(path):
        h = safetensors_header(Path(path) / "model.safetensors")
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")

    monkeypatch.setattr(
        prof, "time_artifact", lambda path, *a, **k: fake_timing(COST * artifact_bytes(path) * artifact)
    )
    monkeypatch.setattr(prof, "measure_shape", lambda dense, *a, **k: fake_timing(
        COST * 4 * dense.parameters() * slowdown(dense.record["shape"])))


@pytest.mark.parametrize("case", ["uniformly slower", "slower in one shape only"])
def test_a_table_from_other_hardware_is_spot_checked(budget_setup, capsys, monkeypatch, tiny_gqa, case):
    tmp_path, common = budget_setup
    table_s, path = scripted_setup(tmp_path, tiny_gqa, {"name": "host", "cpu": "Some Other CPU", "cores": 64})
    slowdown = (lambda s: 2.0) if case == "uniformly slower" else (lambda s: 2.0 if s == "6x1.0" else 1.0)
    script_machine(monkeypatch, slowdown)
    code, out, err = run(capsys, *common, "--budget", "10s", "--dry-run", "--json")
    assert code == 0, err
    assert "was measured on other hardware (cpu Some Other CPU" in err and "spot-checking 3 shapes here" in err
    after = json.loads(path.read_text())
    assert hardware_differences(after["provenance"]["hardware"], hardware_fingerprint(load_target("host"))) == []
    if case == "uniformly slower":
        assert "the table is rescaled by x2.00 for this machine" in err
        assert after["provenance"]["rescaled"]["spot_check"]["ratios"] == pytest.approx([2.0, 2.0, 2.0])
        assert all(e["predicted"] == pytest.approx(2 * table_s[Shape.parse(k)]) for k, e in after["entries"].items())
    else:
        assert "no single factor explains them, so this machine is re-profiled" in err
        assert after["entries"]["6x1.0"]["measured"]["median"] == pytest.approx(2 * table_s[Shape.parse("6x1.0")])
    code, _, err = run(capsys, *common, "--budget", "10s", "--dry-run")
    assert code == 0 and "spot-checking" not in err  # this machine's table from now on


def test_an_optimistic_table_is_corrected_by_feedback(budget_setup, capsys, monkeypatch, tiny_gqa):
    """Through the CLI, with the machine scripted so the rounds are exact: the table (this machine's)
    predicts a third of what it measures, the first pick is discarded over budget, and the corrected
    search picks a shape that fits."""
    tmp_path, common = budget_setup
    table_s, _ = scripted_setup(tmp_path, tiny_gqa, hardware_fingerprint(load_target("host")))
    script_machine(monkeypatch, lambda s: 3.0, artifact=3.0)
    true = {s: 3 * v for s, v in table_s.items()}
    budget = 0.75 * max(true.values())
    code, out, err = run(capsys, *common, "--budget", f"{budget * 1e3:.6f}ms", "--out", str(tmp_path / "art"), "--json")
    assert code == 0, err
    s = json.loads(out)
    rounds = s["feedback"]["rounds"]
    assert rounds[0]["shape"] == "6x1.0" and rounds[0]["factor"] == pytest.approx(3.0, rel=1e-6)
    assert "feedback round 1: 6x1.0 measured" in err
    assert s["measured_latency_s"] <= budget and s["shape"] == str(max((sh for sh in true if true[sh] <= budget),
                                                                        key=lambda sh: sh.depth * sh.width))
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["latency"]["feedback"]["rounds"] == rounds and m["shape"] == s["shape"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the discarded artifact left nothing
    code, out, err = run(capsys, *common, "--budget", f"{budget * 1e3:.6f}ms", "--out", str(tmp_path / "art2"),
                         "--json", "--no-feedback")
    s = json.loads(out)
    assert code == 0 and s["shape"] == "6x1.0" and s["feedback"]["rounds"] == []
    assert any("feedback is off" in w for w in s["measure_warnings"])


def test_profiling_under_load_writes_no_table(tiny_gqa, tmp_path, monkeypatch):
    from amoeba_export.elastic import ElasticModel
    from profilers.profile import profile_table
    from profilers.workload import Workload

    monkeypatch.setenv("AMOEBA_EXPORT_QUIET_WAIT", "0")
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa, seed=1))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        with pytest.raises(UserError, match="a table measured now would be wrong, so none was written"):
            profile_table(
                em,
                load_target("host"),
                FLOWS["pytorch"],
                Workload(1, 8, 4, "tpot"),
                n_validate=1,
                root=tmp_path,
                warmup=1,
                min_repeats=3,
                max_repeats=5,
            )
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert not [p for p in tmp_path.rglob("*.json") if not p.name.startswith(".")]
