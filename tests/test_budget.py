"""`amoeba-export --target host --flow FLOW --budget …` end to end on a tiny model."""
import json

import pytest
import tiny


@pytest.fixture()
def setup(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setenv("AMOEBA_EXPORT_TABLES", str(tmp_path / "tables"))
    sdir = tmp_path / "strategy"
    tiny.strategy_with_accuracy(tiny_gqa, sdir, seed=2)
    return tiny_gqa, sdir, tmp_path


run = tiny.run_cli


@pytest.mark.parametrize("flow", ["pytorch", "gguf", pytest.param("onnx", marks=pytest.mark.slow)])
def test_budget_profiles_searches_exports_and_measures(setup, capsys, flow):
    model, sdir, tmp = setup
    common = ["--target", "host", "--flow", flow, "--model", str(model), "--strategy", str(sdir),
              "--threads", "1", "--prompt-len", "16", "--gen-len", "4", "--no-build", "--dtype", "float32"]
    code, out, err = run(capsys, *common, "--budget", "10s", "--dry-run", "--json")
    assert code == 0, err
    dry = json.loads(out)
    assert "profiling this machine now" in err and dry["out"] is None and dry["table_source"] == "measured"
    assert dry["shape"] == "6x1.0"  # a generous budget takes the best-scoring shape
    table = json.loads((tmp / "tables" / "host" / flow).rglob("*.json").__next__().read_text())
    assert table["validation"]["n"] >= 1
    # a budget between the fastest and the slowest predicted latencies
    lat = sorted(e["predicted"] for e in table["entries"].values())
    budget_ms = (lat[0] + lat[-1]) / 2 * 1000
    # --no-feedback: the table was measured moments ago on this very machine; how feedback corrects a
    # table that is wrong is tests/test_feedback.py's, with the machine scripted
    code, out, err = run(capsys, *common, "--budget", f"{budget_ms:.4f}ms", "--out", str(tmp / "art"), "--json",
                         "--no-feedback")
    assert code == 0, err
    s = json.loads(out)
    assert s["predicted_latency_s"] <= budget_ms / 1000 and s["measured_latency_s"] > 0
    m = json.loads((tmp / "art" / "manifest.json").read_text())
    assert m["shape"] == s["shape"] and m["latency"]["predicted_s"] == s["predicted_latency_s"]
    assert m["latency"]["measured"]["samples"] and m["latency"]["table_source"] == "measured"
    assert "pareto.png" in m["files"] and (tmp / "art" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert m["parity"]["max_abs_logit_diff"] < m["parity"]["tolerance"] <= 1e-3
    assert m["legalize"]["flow"] == flow and m["flow"] == flow


def test_infeasible_budget_names_the_fastest_shape(setup, capsys):
    model, sdir, tmp = setup
    code, _, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(model), "--strategy", str(sdir),
                       "--threads", "1", "--prompt-len", "16", "--budget", "1us", "--out", str(tmp / "none"))
    assert code == 2 and "no shape fits 1" in err and "the fastest is" in err and "Traceback" not in err
    assert not (tmp / "none").exists()


@pytest.mark.parametrize("budget,needle", [("40", "needs a unit"), ("-5ms", "positive")])
def test_malformed_budget(setup, capsys, budget, needle):
    model, sdir, _ = setup
    code, _, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(model), "--strategy", str(sdir),
                       "--budget", budget)
    assert code == 2 and needle in err
