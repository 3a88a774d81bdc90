"""`amoeba-export matrix FILE.toml` and the export-only targets, end to end on a tiny model."""
import json

import pytest
import tiny

run = tiny.run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model TensorRT-LLM can take (head_dim 32), a random strategy and a monotone accuracy table."""
    tmp = tmp_path_factory.mktemp("matrix")
    model = tiny.make_tiny_model(tmp / "model", hidden=64, heads=2, kv_heads=1, head_dim=32, ff=96, seed=5)
    sdir = tmp / "strategy"
    tiny.strategy_with_accuracy(model, sdir, seed=3)
    return model, sdir, tmp


@pytest.fixture()
def tables(tmp_path, monkeypatch):
    monkeypatch.setenv("AMOEBA_EXPORT_TABLES", str(tmp_path / "tables"))
    return tmp_path / "tables"


MATRIX = """
dist = "{dist}"
[defaults]
prompt_len = 16
gen_len = 4
[[artifact]]
target = "jetson-orin"
flow = "mlc"
budget = "40ms"
[[artifact]]
target = "a5000"
flow = "trtllm"
budget = "40ms"
[[artifact]]
name = "orin-trtllm-fixed"
target = "jetson-orin"
flow = "trtllm"
shape = "5x0.75"
runner = "jetson-orin"
"""


def test_export_only_targets_write_artifact_script_and_manifest(setup, tables, capsys, tmp_path):
    model, sdir, _ = setup
    out = tmp_path / "orin-mlc"
    code, stdout, err = run(
        capsys,
        "--target",
        "jetson-orin",
        "--flow",
        "mlc",
        "--budget",
        "40ms",
        "--model",
        str(model),
        "--strategy",
        str(sdir),
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "ESTIMATED" in err and "amoeba-export profile --target jetson-orin --flow mlc" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["latency"]["table_source"] == "estimated" and m["latency"]["measured"] is None
    assert m["engine"]["built"] == [] and "build.sh" in m["engine"]["skipped"]
    assert "build.sh" in m["files"] and "mlc-chat-config.json" in m["files"]
    assert m["legalize"]["flow"] == "mlc" and m["uniform"]
    table = json.loads(next((tables / "jetson-orin" / "mlc").rglob("*.json")).read_text())
    assert table["source"] == "estimated" and "estimated" in table["validation"]["note"]


def test_matrix_builds_rows_and_summary(setup, tables, capsys, tmp_path):
    model, sdir, _ = setup
    dist = tmp_path / "dist"
    f = tmp_path / "m.toml"
    f.write_text(MATRIX.format(dist=dist))
    code, stdout, err = run(
        capsys, "matrix", str(f), "--model", str(model), "--strategy", str(sdir), "--runner", "hosted"
    )
    assert code == 0, err
    summary = json.loads((dist / "summary.json").read_text())
    assert [r["name"] for r in summary] == ["jetson-orin-mlc-40ms", "a5000-trtllm-40ms"]  # the device row is skipped
    for r in summary:
        assert r["table_source"] == "estimated" and r["measure_command"].startswith("amoeba-export profile --target")
        assert (dist / r["name"] / "manifest.json").is_file() and (dist / r["name"] / "build.sh").is_file()
        assert r["parity"]["greedy_token_agreement"] > 0.5
    md = (dist / "summary.md").read_text()
    assert (
        md.startswith("| artifact | target | flow | dtype | shape |")
        and "a5000-trtllm-40ms" in md
        and "estimated" in md
    )
    assert md in stdout
    # the trtllm artifact in float16 (the A5000's default) matched the masked reference
    assert summary[1]["parity"]["max_abs_logit_diff"] < 5e-2
    # a fixed-shape row for the device runner, chosen by name
    code, stdout, err = run(capsys, "matrix", str(f), "--model", str(model), "--strategy", str(sdir),
                            "--only", "orin-trtllm-fixed", "--out", str(tmp_path / "dist2"))
    assert code == 0, err
    row = json.loads((tmp_path / "dist2" / "summary.json").read_text())[0]
    assert row["shape"] == "5x0.75" and row["table_source"] is None


def test_a_failing_row_does_not_stop_the_others(setup, tables, capsys, tmp_path):
    model, sdir, _ = setup
    f = tmp_path / "m.toml"
    f.write_text('[[artifact]]\ntarget = "a5000"\nflow = "trtllm"\nbudget = "0.001us"\n'
                 '[[artifact]]\ntarget = "jetson-orin"\nflow = "mlc"\nshape = "4x1.0"\n')
    code, stdout, err = run(capsys, "matrix", str(f), "--model", str(model), "--strategy", str(sdir),
                            "--out", str(tmp_path / "dist"), "--no-verify")
    assert code == 2 and "1 of 2 artifacts failed: a5000-trtllm-0.001us" in err and "Traceback" not in err
    assert "no shape fits" in (tmp_path / "dist" / "summary.md").read_text()
    assert (tmp_path / "dist" / "jetson-orin-mlc-4x1.0" / "manifest.json").is_file()
    assert not (tmp_path / "dist" / "a5000-trtllm-0.001us").exists()


@pytest.mark.parametrize("text,needle", [
    ("[[artifact]]\ntarget = 'nowhere'\nflow = 'mlc'\nbudget = '40ms'\n", "unknown target 'nowhere'"),
    ("[[artifact]]\ntarget = 'a5000'\nflow = 'mlc'\nbudget = '40'\n", "needs a unit"),
    ("[[artifact]]\ntarget = 'a5000'\nflow = 'mlc'\n", "exactly one of 'budget' or 'shape'"),
    ("[[artifact]]\ntarget = 'a5000'\nflow = 'mlc'\nbudget = '4ms'\ncolour = 'red'\n", "unknown key(s) colour"),
    ("[[artifact]]\ntarget = 'host'\nflow = 'mlc'\nbudget = '4ms'\n", "not available on target 'host'"),
    ("[[artifact]]\ntarget = 'a5000'\nflow = 'mlc'\nbudget = '4ms'\n" * 2, "two rows are named"),
    ("dist = 3\n[[artifact]]\ntarget = 'a5000'\nflow = 'mlc'\nbudget = '4ms'\n", "'dist' must be"),
    ("[[artifact]\n", "not valid TOML"),
    ("", "no [[artifact]] rows"),
])
def test_malformed_matrix_is_one_line_and_builds_nothing(setup, capsys, tmp_path, text, needle):
    model, sdir, _ = setup
    f = tmp_path / "m.toml"
    f.write_text(text)
    code, _, err = run(
        capsys, "matrix", str(f), "--model", str(model), "--strategy", str(sdir), "--out", str(tmp_path / "d")
    )
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_profile_on_a_device_target_says_where_to_run(setup, capsys):
    model, sdir, _ = setup
    code, _, err = run(capsys, "profile", "--target", "jetson-orin", "--flow", "mlc", "--model", str(model),
                       "--strategy", str(sdir))
    assert code == 2 and "amoeba-export profile --target jetson-orin --flow mlc` on the jetson-orin" in err
    code, _, err = run(capsys, "profile", "--target", "host", "--flow", "trtllm", "--model", str(model),
                       "--strategy", str(sdir))
    assert code == 2 and "times a GPU" in err
