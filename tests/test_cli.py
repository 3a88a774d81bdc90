"""The command line: one-line errors with exit code 2, and the happy paths on a tiny model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gqa):
    root = tmp_path_factory.mktemp("cli")
    sdir = root / "strategy"
    tiny.random_strategy(tiny_gqa).save(sdir)
    return tiny_gqa, sdir, root


run = tiny.run_cli


def assert_user_error(code, err, needle):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and needle in err, err


def test_export_and_shapes(setup, capsys, tmp_path):
    model, sdir, _ = setup
    code, out, err = run(capsys, "--target", "host", "--flow", "pytorch", "--shape", "5x0.75", "--model", str(model),
                         "--strategy", str(sdir), "--out", str(tmp_path / "a"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["shape"] == "5x0.75" and summary["parity"]["max_abs_logit_diff"] < 1e-4
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["inputs"]["strategy"]["sha256"]["strategy.json"]
    code, out, err = run(capsys, "shapes", "--model", str(model), "--strategy", str(sdir), "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 4 * 3
    assert all(len(r["layers"]) == r["depth"] for r in rows)
    assert rows[0]["parameters"] == max(r["parameters"] for r in rows)


@pytest.mark.parametrize("args,needle", [
    (["--target", "mars", "--flow", "pytorch", "--shape", "5x0.5"], "unknown target 'mars'"),
    (["--target", "host", "--flow", "tensorflow", "--shape", "5x0.5"], "unknown flow 'tensorflow'"),
    (["--target", "host", "--flow", "pytorch", "--shape", "5by0.5"], "malformed shape '5by0.5'"),
    (["--target", "host", "--flow", "pytorch", "--shape", "5x1.5"], "out of range"),
    (["--target", "host", "--flow", "pytorch", "--shape", "2x0.5"], "not in the calibrated space"),
    (["--target", "host", "--flow", "pytorch"], "missing --budget (or --shape)"),
])
def test_bad_arguments(setup, capsys, tmp_path, args, needle):
    model, sdir, _ = setup
    code, _, err = run(capsys, *args, "--model", str(model), "--strategy", str(sdir), "--out", str(tmp_path / "x"))
    assert_user_error(code, err, needle)
    assert not (tmp_path / "x").exists()


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "shapes", "--model", str(tmp_path / "nope"))
    assert_user_error(code, err, "does not exist")


def test_truncated_weights(setup, capsys, tmp_path):
    model, sdir, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(capsys, "shapes", "--model", str(bad), "--strategy", str(sdir))
    assert_user_error(code, err, "truncated safetensors")


def test_corrupt_strategy(setup, capsys, tmp_path):
    model, sdir, _ = setup
    bad = tmp_path / "s"
    shutil.copytree(sdir, bad)
    (bad / "strategy.json").write_text("{not json")
    code, _, err = run(capsys, "shapes", "--model", str(model), "--strategy", str(bad))
    assert_user_error(code, err, "corrupt JSON")


def test_strategy_for_another_model(setup, capsys, tiny_qwen):
    _, sdir, _ = setup
    code, _, err = run(capsys, "shapes", "--model", str(tiny_qwen), "--strategy", str(sdir))
    assert_user_error(code, err, "strategy does not match the model")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_payload_in_npy_is_refused(setup, capsys, tmp_path):
    model, _, _ = setup
    evil = tmp_path / "dp_selection_strategy.npy"
    marker = tmp_path / "pwned"
    np.save(evil, np.array({"strategy": Payload(marker)}, dtype=object), allow_pickle=True)
    code, _, err = run(capsys, "import-strategy", str(evil), "--model", str(model), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "refusing to load")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_console_script_entry_point(setup, tmp_path):
    """The installed entry point, in a fresh process: exit code 2 and one line, no traceback."""
    model, sdir, _ = setup
    p = subprocess.run([sys.executable, "-m", "amoeba_export.cli", "--target", "host", "--flow", "pytorch",
                        "--shape", "x", "--model", str(model), "--strategy", str(sdir)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: malformed shape 'x': write DEPTHxWIDTH, e.g. 24x0.75"


def test_score_command(setup, capsys, tmp_path):
    import random

    model, sdir, _ = setup
    s2 = tmp_path / "s"
    shutil.copytree(sdir, s2)
    random.seed(1)
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(" ".join(f"w{random.randrange(90)}" for _ in range(120)) for _ in range(10)))
    args = ["score", "--model", str(model), "--strategy", str(s2), "--heldout", str(text), "--windows", "2",
            "--seq-len", "32", "--tasks", ""]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    tables = list(s2.glob("accuracy-*.json"))
    assert len(tables) == 1 and out.count("x") >= 12
    doc = json.loads(tables[0].read_text())
    assert len(doc["entries"]) == 12 and all(e["ppl"] > 1 for e in doc["entries"].values())
