"""Fault injection: bad files, bad options, OS faults, killed and concurrent runs.

Every case checks the same four things: the exit code, one `error:` line (no traceback), nothing of
the user's lost (listings before and after), and nothing of ours left behind (no partial outputs,
no lock files). docs/safety.md says what each guard is for.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from amoeba_export.io import output_lock

run = tiny.run_cli


# ---------------------------------------------------------------- helpers

def listing(root: Path) -> dict:
    """Every path under `root` with its size and content hash: what 'nothing lost' compares."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


def leftovers(folder: Path) -> list[str]:
    """Our temporary files in `folder`: partial outputs, replaced outputs, lock files."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(".") and any(k in p.name for k in (".partial-", ".old-", ".lock")))


PROGRESS = re.compile(r"\|.*\| *\d+/\d+ \[|\x1b\[A")  # a tqdm bar's rendering


def one_error(code, err, needle):
    """Exit code 2, one `error:` line holding `needle`, nothing else but notices and progress bars."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [l.strip() for l in err.splitlines()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    others = [l for l in lines if l and not l.startswith(("error:", "note:")) and not PROGRESS.search(l)]
    assert not others, err


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_gqa):
    """The tiny model with its strategy and an accuracy table (so budgets search without scoring)."""
    root = tmp_path_factory.mktemp("faults")
    sdir = root / "strategy"
    tiny.strategy_with_accuracy(tiny_gqa, sdir, seed=3)
    return tiny_gqa, sdir


def export(capsys, model, *args):
    m, s = model
    return run(
        capsys, "--target", "host", "--flow", "pytorch", "--model", str(m), "--strategy", str(s), "--no-build", *args
    )


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("the user's own notes\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "results.csv").write_text("a,b\n1,2\n")
    return folder


# ---------------------------------------------------------------- bad options

@pytest.mark.parametrize("args,needle", [
    (["--shape", "5x0.75", "--budget", "30ms"], "give one or the other"),
    (["--shape", "5x0.75", "--memory", "1GiB"], "give one or the other"),
    (["--shape", "5x0.75", "--dry-run"], "--shape does not search"),
    (["--shape", "5x0.75", "--no-feedback"], "--shape does not search"),
    (["--budget", "30ms", "--threads", "0"], "'--threads': 0 is not in the range"),
    (["--budget", "30ms", "--bogus"], "No such option '--bogus'"),
    (["--budget", "30ms", "--layout", "diagonal"], "'--layout'"),
    (["--budget", "30ms", "--memory", "lots"], "--memory"),
    (["--shape", "5x0.75", "--dtype", "q3_x"], "cannot write dtype 'q3_x'"),
    (["--budget", "-3ms"], "positive"),
])
def test_bad_options(model, capsys, tmp_path, args, needle):
    code, _, err = export(capsys, model, "--out", str(tmp_path / "o"), *args)
    one_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["calibrate", "--depth-samples", "0"], "'--depth-samples': 0 is not in the range"),
    (["profile", "--validate", "-1"], "'--validate': -1 is not in the range"),
    (["train", "--out", "x", "--threads", "0"], "'--threads': 0 is not in the range"),
])
def test_bad_subcommand_options(capsys, args, needle):
    code, _, err = run(capsys, *args)
    one_error(code, err, needle)


# ---------------------------------------------------------------- bad files

def model_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: [c], "expected a JSON object, got a list"),
        (
            lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"},
            "'num_attention_heads' must be a positive integer",
        ),
        (lambda c: {**c, "num_hidden_layers": "six"}, "'num_hidden_layers' must be a positive integer, got 'six'"),
        (lambda c: {**c, "hidden_size": -64}, "'hidden_size' must be a positive integer"),
    ],
)
def test_config_validated_as_data(model, capsys, tmp_path, edit, needle):
    m = model_copy(model[0], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(edit(cfg)))
    code, _, err = run(capsys, "shapes", "--model", str(m), "--strategy", str(model[1]))
    one_error(code, err, needle)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: [d], "is not an amoeba-export strategy"),
    (lambda d: {k: v for k, v in d.items() if k != "depths"}, "'depths' must be"),
    (lambda d: {**d, "model": {**d["model"], "n_layers": "6"}}, "'model.n_layers' must be a positive integer"),
    (lambda d: {**d, "widths": "1,0.5"}, "'widths' must be a non-empty list"),
    (lambda d: {**d, "depths": {"5": "all"}}, "'depths.5' must list layer indices"),
])
def test_strategy_validated_as_data(model, capsys, tmp_path, edit, needle):
    s = tmp_path / "s"
    shutil.copytree(model[1], s)
    doc = json.loads((s / "strategy.json").read_text())
    (s / "strategy.json").write_text(json.dumps(edit(doc)))
    code, _, err = run(capsys, "shapes", "--model", str(model[0]), "--strategy", str(s))
    one_error(code, err, needle)


def test_truncated_strategy_tensors(model, capsys, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(model[1], s)
    f = s / "strategy.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, _, err = run(capsys, "shapes", "--model", str(model[0]), "--strategy", str(s))
    one_error(code, err, "truncated safetensors")


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_model_without_tokenizer_is_refused(model, capsys, tmp_path, command):
    m = model_copy(model[0], tmp_path / "m")
    for f in m.glob("tokenizer*"):
        f.unlink()
    before = listing(tmp_path)
    if command == "calibrate":
        code, _, err = run(capsys, "calibrate", "--model", str(m), "--out", str(tmp_path / "s"))
    else:
        code, _, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(m), "--strategy",
                           str(model[1]), "--shape", "5x0.75", "--out", str(tmp_path / "o"))
    one_error(code, err, "has no tokenizer")
    assert listing(tmp_path) == before


def table_file(tmp_path: Path, model, edit) -> Path:
    """A measured latency table for the tiny model's shapes, edited by `edit(entries)`."""
    from amoeba_export.base_model import model_info
    from amoeba_export.score import strategy_fingerprint
    from amoeba_export.strategy import Strategy
    from profilers.tables import LatencyTable, hardware_fingerprint
    from profilers.workload import Workload
    from targets import load_target

    info = model_info(model[0])
    space = Strategy.load(model[1]).space
    entries = {str(s): {"predicted": 0.001 * s.depth * s.width} for s in space}
    edit(entries)
    table = LatencyTable(
        target="host",
        flow="pytorch",
        model={"name": info["name"], "fingerprint": info["fingerprint"]},
        strategy=strategy_fingerprint(model[1]),
        workload=Workload().to_json(),
        source="measured",
        entries=entries,
        provenance={"hardware": hardware_fingerprint(load_target("host"))},
    )
    path = LatencyTable.path("host", "pytorch", info["name"], Workload(), root=tmp_path / "tables")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table.__dict__))
    return path


@pytest.mark.parametrize("edit,needle", [
    (lambda e: e["5x0.75"].update(predicted=-1.0), "entry 5x0.75: predicted latency -1.0 is not a positive"),
    (lambda e: e["5x0.75"].update(predicted="fast"), "entry 5x0.75: predicted latency 'fast' is not a positive"),
    (lambda e: e["5x0.75"].update(predicted=float("nan")), "entry 5x0.75: predicted latency nan"),
    (lambda e: e["5x0.75"].update(measured={"median": 0}), "entry 5x0.75: measured median 0"),
    (lambda e: e.pop("5x0.75"), "does not match the strategy's shapes (lacks 5x0.75)"),
    (lambda e: e.update({"9x0.1": {"predicted": 1.0}}), "has extra 9x0.1"),
    (lambda e: e.update({"fast": {"predicted": 1.0}}), "entry 'fast' is not a shape"),
])
def test_latency_table_validated_before_use(model, capsys, tmp_path, edit, needle):
    table_file(tmp_path, model, edit)
    code, _, err = export(capsys, model, "--budget", "1s", "--dry-run", "--tables", str(tmp_path / "tables"),
                          "--no-feedback")
    one_error(code, err, needle)


def test_latency_table_not_an_object(model, capsys, tmp_path):
    path = table_file(tmp_path, model, lambda e: None)
    path.write_text("[1, 2, 3]")
    code, _, err = export(capsys, model, "--budget", "1s", "--dry-run", "--tables", str(tmp_path / "tables"))
    one_error(code, err, "expected a JSON object")


@pytest.mark.parametrize("row,needle", [
    ('target = "host"\nflow = "pytorch"\nshape = "5x0.75"\ndtype = "q9"\n', "cannot write dtype 'q9'"),
    ('target = "host"\nflow = "pytorch"\nshape = "2x0.75"\n', "not in the calibrated space"),
    ('target = "jetson-orin"\nflow = "mlc"\nshape = "5x0.75"\ndtype = "float16"\n', "cannot write dtype 'float16'"),
])
def test_matrix_rows_checked_before_the_first_build(model, capsys, tmp_path, row, needle):
    f = tmp_path / "m.toml"
    good = '[[artifact]]\ntarget = "host"\nflow = "pytorch"\nshape = "6x1.0"\n'
    f.write_text(good + "[[artifact]]\n" + row)
    code, _, err = run(capsys, "matrix", str(f), "--model", str(model[0]), "--strategy", str(model[1]),
                       "--out", str(tmp_path / "dist"), "--no-build")
    one_error(code, err, needle)
    assert "matrix row 2" in err and not (tmp_path / "dist").exists()  # row 1 was not built either


def test_matrix_row_into_user_files_refused_before_building(model, capsys, tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[[artifact]]\ntarget = "host"\nflow = "pytorch"\nshape = "6x1.0"\n'
                 '[[artifact]]\nname = "mine"\ntarget = "host"\nflow = "pytorch"\nshape = "5x0.75"\n')
    user_files(tmp_path / "dist" / "mine")
    before = listing(tmp_path / "dist")
    code, _, err = run(capsys, "matrix", str(f), "--model", str(model[0]), "--strategy", str(model[1]),
                       "--out", str(tmp_path / "dist"), "--no-build")
    one_error(code, err, "already holds files amoeba-export did not write")
    assert listing(tmp_path / "dist") == before


def test_damaged_accuracy_table_is_scored_again(model, capsys, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(model[1], s)
    calib = tmp_path / "c.txt"
    calib.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(150)) for i in range(10)))
    args = ["score", "--model", str(model[0]), "--strategy", str(s), "--heldout", str(calib), "--windows", "2",
            "--seq-len", "32", "--tasks", ""]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    table = next(p for p in s.glob("accuracy-*.json") if "c-" in p.name)
    table.write_text(table.read_text()[:100])  # cut short
    code, _, err = run(capsys, *args)
    assert code == 0 and "corrupt JSON" in err and "scoring every shape again" in err and "Traceback" not in err
    assert len(json.loads(table.read_text())["entries"]) == 12


# ---------------------------------------------------------------- fingerprints

def fine_tune(src: Path, dst: Path) -> Path:
    """A copy of the model with one weight changed (a 'fine-tune' of the same architecture)."""
    model_copy(src, dst)
    f = dst / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.2.mlp.down_proj.weight"
    t[name] = t[name].clone()
    t[name][0, 0] += 1e-3
    save_file(t, str(f), metadata={"format": "pt"})
    return dst


def test_one_weight_changes_the_fingerprint(model, tmp_path):
    from amoeba_export.base_model import fingerprint

    tuned = fine_tune(model[0], tmp_path / "tuned")
    assert fingerprint(model[0]) != fingerprint(tuned)
    resharded = model_copy(model[0], tmp_path / "same")
    (resharded / "config.json").write_text(json.dumps({**json.loads((resharded / "config.json").read_text()),
                                                       "transformers_version": "0.0.0"}))
    assert fingerprint(model[0]) == fingerprint(resharded)  # tool-written config keys do not count


def test_manifest_input_hash_cache_follows_the_file(tmp_path):
    """Large inputs' sha256 is cached by identity: a rewritten file (same size) is hashed again."""
    import hashlib

    from amoeba_export.base_model import input_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    assert input_sha256(f, cache_from=1024) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert input_sha256(f, cache_from=1024) == hashlib.sha256(b"a" * 4096).hexdigest()  # from the cache
    f.write_bytes(b"b" * 4096)
    assert input_sha256(f, cache_from=1024) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_strategy_for_other_weights(model, capsys, tmp_path):
    tuned = fine_tune(model[0], tmp_path / "tuned")
    code, _, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(tuned), "--strategy",
                       str(model[1]), "--shape", "5x0.75", "--out", str(tmp_path / "o"))
    one_error(code, err, "the strategy was made for other weights")
    assert not (tmp_path / "o").exists()
    code, out, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(tuned), "--strategy",
                         str(model[1]), "--shape", "5x0.75", "--out", str(tmp_path / "o"), "--allow-other-weights",
                         "--no-build")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["allowed_other_weights"] == {
        "strategy": json.loads((model[1] / "strategy.json").read_text())["model"]["fingerprint"]
    }


# ---------------------------------------------------------------- parity

def test_parity_failure_writes_nothing_unless_accepted(model, capsys, tmp_path, monkeypatch):
    import dataclasses

    from amoeba_export import flows

    load = flows.FLOWS["pytorch"].load

    def off_by_a_little(out_dir):  # an exporter bug: logits shifted by 0.01
        fn = load(out_dir)
        return lambda ids: fn(ids) + 0.01 * torch.arange(fn(ids).shape[-1]) / 96

    monkeypatch.setitem(flows.FLOWS, "pytorch", dataclasses.replace(flows.FLOWS["pytorch"], load=off_by_a_little))
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"))
    one_error(code, err, "parity check failed for pytorch at 5x0.75: max |logit difference|")
    assert list(tmp_path.iterdir()) == []
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"), "--accept-parity-loss")
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["accepted_parity_loss"][0].startswith("parity: max |logit difference|")


def scripted_perplexity(monkeypatch, with_biases=100.0, without=180.0):
    """Held-out perplexity as legalize sees it, scripted: a random tiny model's perplexity barely
    moves when its biases go, while a real model's can blow up (docs/verify.md)."""
    import amoeba_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "dense_perplexity", lambda elastic: lambda dense: (
        with_biases if any(s.attn_bias or s.mlp_bias for s in dense.layers) else without))


def test_mlc_without_its_biases_is_refused(capsys, tmp_path, tiny_llama3, monkeypatch):
    """The audit's case: a per-layer shape of a Llama-3-style model whose compensation biases MLC cannot
    carry, at a cost over the limit: refused in one line; --accept-parity-loss ships it and says so."""
    scripted_perplexity(monkeypatch)
    sdir = tmp_path / "s"
    tiny.random_strategy(tiny_llama3, seed=5).save(sdir)
    args = ["--target", "jetson-orin", "--flow", "mlc", "--model", str(tiny_llama3), "--strategy", str(sdir),
            "--shape", "4x0.5", "--dtype", "q0f32", "--out", str(tmp_path / "o")]
    code, _, err = run(capsys, *args)
    one_error(code, err, "mlc cannot run 4x0.5 exactly, and dropping the o_proj/down_proj compensation biases raises "
                         "held-out perplexity 100.000 -> 180.000 (+80%, over the 25% limit)")
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, *args, "--accept-parity-loss")
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["accepted_parity_loss"][0].startswith("legalize: mlc cannot run 4x0.5 exactly")
    assert m["parity"]["max_abs_logit_diff"] <= m["parity"]["tolerance"]  # the export is exact; legalize is not


def test_budget_skips_shapes_the_flow_cannot_run(capsys, tmp_path, tiny_llama3, monkeypatch):
    scripted_perplexity(monkeypatch)
    monkeypatch.setenv("AMOEBA_EXPORT_TABLES", str(tmp_path / "tables"))
    sdir = tmp_path / "s"
    tiny.strategy_with_accuracy(tiny_llama3, sdir, seed=5)
    acc = next(sdir.glob("accuracy-*.json"))
    doc = json.loads(acc.read_text())
    doc["entries"]["6x0.75"]["ppl"], doc["entries"]["6x0.5"]["ppl"] = 1.0, 1.5  # the best two need their biases
    acc.write_text(json.dumps(doc))
    code, out, err = run(capsys, "--target", "jetson-orin", "--flow", "mlc", "--model", str(tiny_llama3), "--strategy",
                         str(sdir), "--budget", "1s", "--dtype", "q0f32", "--out", str(tmp_path / "o"), "--json")
    assert code == 0, err
    assert err.count("searching again without it") == 2 and "mlc cannot run 6x0.75 exactly" in err
    assert json.loads(out)["shape"] == "6x1.0"


# ---------------------------------------------------------------- data safety

def test_out_dot_refused_with_the_files_intact(model, capsys, tmp_path, monkeypatch):
    user_files(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    before = listing(tmp_path)
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", ".", "--force")
    one_error(code, err, "is the current directory")
    assert listing(tmp_path) == before


def test_out_above_the_current_directory_refused(model, capsys, tmp_path, monkeypatch):
    user_files(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path / "a" / "b")
    before = listing(tmp_path)
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "a"), "--force")
    one_error(code, err, "a folder holding the current directory")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("which", ["model", "strategy", "above the model"])
def test_out_onto_an_input_refused(model, capsys, tmp_path, which):
    m = model_copy(model[0], tmp_path / "inputs" / "m")
    s = tmp_path / "inputs" / "s"
    shutil.copytree(model[1], s)
    target = {"model": m, "strategy": s, "above the model": tmp_path / "inputs"}[which]
    before = listing(tmp_path)
    code, _, err = run(capsys, "--target", "host", "--flow", "pytorch", "--model", str(m), "--strategy", str(s),
                       "--shape", "5x0.75", "--out", str(target), "--force")
    one_error(code, err, "the input")
    assert listing(tmp_path) == before


def test_out_with_user_files_refused_even_with_force(model, capsys, tmp_path):
    user_files(tmp_path / "o")
    before = listing(tmp_path)
    for extra in ([], ["--force"]):
        code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"), *extra)
        one_error(code, err, "already holds files amoeba-export did not write")
        assert listing(tmp_path) == before


def test_out_that_is_a_file_refused(model, capsys, tmp_path):
    (tmp_path / "o").write_text("mine")
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"))
    one_error(code, err, "is a file, not a directory")
    assert (tmp_path / "o").read_text() == "mine"


def test_earlier_artifact_needs_force_and_extra_files_protect_it(model, capsys, tmp_path):
    out = tmp_path / "o"
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(out))
    assert code == 0, err
    first = listing(out)
    code, _, err = export(capsys, model, "--shape", "6x1.0", "--out", str(out))
    one_error(code, err, "pass --force to replace it")
    assert listing(out) == first
    code, _, err = export(capsys, model, "--shape", "6x1.0", "--out", str(out), "--force")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["shape"] == "6x1.0"
    (out / "my-notes.md").write_text("written into the artifact by the user")
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(out), "--force")
    one_error(code, err, "already holds files amoeba-export did not write")
    assert (out / "my-notes.md").is_file() and leftovers(tmp_path) == []


def test_calibrate_and_imports_refuse_user_folders(model, capsys, tmp_path):
    user_files(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    before = listing(tmp_path)
    code, _, err = run(capsys, "calibrate", "--model", str(model[0]), "--out", str(tmp_path / "mine"))
    one_error(code, err, "already holds files amoeba-export did not write")
    npy = tmp_path / "dp.npy"
    code, _, err = run(capsys, "import-strategy", str(npy), "--model", str(model[0]), "--out", str(tmp_path / "file"))
    one_error(code, err, "is a file, not a directory")
    code, _, err = run(capsys, "import-checkpoint", str(tmp_path), "--strategy-npy", str(npy), "--model",
                       str(model[0]), "--out", str(tmp_path / "mine"))
    one_error(code, err, "already holds files amoeba-export did not write")
    assert listing(tmp_path) == before


def test_train_refuses_a_folder_that_is_not_a_run(model, capsys, tmp_path):
    user_files(tmp_path / "run")
    before = listing(tmp_path)
    code, _, err = run(capsys, "train", "--model", str(model[0]), "--strategy", str(model[1]),
                       "--out", str(tmp_path / "run"), "--steps", "1")
    one_error(code, err, "already holds files amoeba-export did not write")
    assert listing(tmp_path) == before


def test_stale_partials_of_killed_runs_are_removed(model, capsys, tmp_path):
    stale = tmp_path / ".o.partial-99999999-abcd"  # no such pid
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"\0" * 4096)
    legacy = tmp_path / ".o.partial-k2j3h4"  # named before pids were recorded
    legacy.mkdir()
    (tmp_path / ".o.lock").write_text("99999999\n")  # a killed run's lock file (its flock died with it)
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "removed 2 leftovers of interrupted runs" in err
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- OS faults

def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs (size or ro); skipped where this user may not mount."""
    mounted = []

    def mount(options: str) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        if not _mount(path, options):
            pytest.skip("mounting a tmpfs needs root (the fault is then not reproducible here)")
        mounted.append(path)
        return path

    yield mount
    for p in mounted:
        subprocess.run(["umount", "--lazy", str(p)], capture_output=True)  # a mapped file may still hold it


def test_read_only_out(model, capsys, tmpfs):
    fs = tmpfs("ro,size=1m")
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(fs / "o"))
    one_error(code, err, "the file system is read-only")


def test_full_disk_leaves_nothing(model, capsys, tmpfs):
    fs = tmpfs("size=160k")
    code, _, err = export(capsys, model, "--shape", "6x1.0", "--out", str(fs / "o"))
    one_error(code, err, "the disk is full")
    assert list(fs.iterdir()) == []


@pytest.mark.parametrize("command", ["calibrate", "score"])
def test_full_disk_for_other_writers(model, capsys, tmpfs, tmp_path, command):
    fs = tmpfs("size=256k")
    shutil.copytree(model[1], fs / "strategy")
    before = listing(fs / "strategy")
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    (fs / "filler").write_bytes(b"\0" * free)  # the disk is now full
    calib = tmp_path / "c.txt"
    calib.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(150)) for i in range(10)))
    if command == "calibrate":
        args = ["calibrate", "--model", str(model[0]), "--out", str(fs / "s"), "--calib", str(calib),
                "--depth-samples", "2", "--width-samples", "2", "--seq-len", "32"]
    else:
        args = ["score", "--model", str(model[0]), "--strategy", str(fs / "strategy"), "--heldout", str(calib),
                "--windows", "2", "--seq-len", "32", "--tasks", ""]
    code, _, err = run(capsys, *args)
    one_error(code, err, "the disk is full")
    assert listing(fs / "strategy") == before
    # a failed calibration keeps its resumable work folder (docs/safety.md), nothing else
    assert sorted(p.name for p in fs.iterdir()) in (["filler", "strategy"], [".s.calibration", "filler", "strategy"])


def test_table_folder_read_only(model, capsys, tmpfs):
    fs = tmpfs("ro,size=1m")
    code, _, err = export(capsys, model, "--budget", "1s", "--dry-run", "--tables", str(fs / "tables"),
                          "--threads", "1", "--prompt-len", "8", "--gen-len", "2")
    one_error(code, err, "read-only")


def test_permission_denied(model, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available on this file system")
    else:
        locked.chmod(0o555)
    try:
        code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(locked / "o"))
        one_error(code, err, "not permitted" if os.geteuid() == 0 else "permission denied")
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)


def test_cache_path_that_is_a_file(model, capsys, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("AMOEBA_EXPORT_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, "calibrate", "--model", str(model[0]))
    one_error(code, err, "not a directory")
    assert (tmp_path / "cache").read_text() == "not a folder"


# ---------------------------------------------------------------- concurrent runs

def test_second_run_on_the_same_out_is_refused(model, capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from amoeba_export.io import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "o")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"))
        one_error(code, err, f"another amoeba-export run (pid {holder.pid}) is writing")
        assert not (tmp_path / "o").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = export(capsys, model, "--shape", "5x0.75", "--out", str(tmp_path / "o"))  # the kernel freed it
    assert code == 0, err
    assert leftovers(tmp_path) == []


def test_lock_is_reentrant_and_removed(tmp_path):
    with output_lock(tmp_path / "o"):
        with output_lock(tmp_path / "o"):
            assert (tmp_path / ".o.lock").read_text().strip() == str(os.getpid())
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- kill -9

def cli_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "amoeba_export.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_kill_nine_at_random_points(model, tmp_path):
    """Fourteen runs (export, calibrate, score) killed at seeded random moments (at least ten die before
    finishing): after each, the output is either absent or complete; the next run finishes and leaves
    nothing of the killed ones behind."""
    m, s = model
    calib = tmp_path / "c.txt"
    calib.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(150)) for i in range(20)))
    scored = tmp_path / "scored"
    shutil.copytree(s, scored)
    jobs = {
        "export": (tmp_path / "art", ["--target", "host", "--flow", "pytorch", "--model", str(m), "--strategy", str(s),
                                      "--shape", "5x0.75", "--out", str(tmp_path / "art"), "--force"]),
        "calibrate": (tmp_path / "strategy", ["calibrate", "--model", str(m), "--out", str(tmp_path / "strategy"),
                                              "--calib", str(calib), "--depth-samples", "4", "--width-samples", "8",
                                              "--seq-len", "64", "--force"]),
        "score": (scored, ["score", "--model", str(m), "--strategy", str(scored), "--heldout", str(calib),
                           "--windows", "4", "--seq-len", "64", "--tasks", ""]),
    }
    rng = random.Random(12)
    plan = ["export"] * 8 + ["calibrate"] * 3 + ["score"] * 3
    results = []
    def partials():
        return {str(q) for d in (tmp_path, scored) for q in d.iterdir() if ".partial-" in q.name}

    for name in plan:
        out, args = jobs[name]
        before = partials()
        p = cli_process(*args)
        delay = rng.uniform(1.5, 6.0)  # imports take ~3 s of it: kills land in loading, computing and writing
        try:
            p.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            finished = False
        # partial outputs this run left show the kill landed while it wrote (a later run removes them)
        results.append((name, round(delay, 1), "finished" if finished else "killed", len(partials() - before)))
        if name == "export" and out.exists():
            assert (out / "manifest.json").is_file()  # never a half artifact
        if name == "calibrate" and out.exists():
            assert (out / "strategy.json").is_file() and (out / "strategy.safetensors").is_file()
    killed = sum(r[2] == "killed" for r in results)
    print("kill -9 plan (command, seconds, outcome, partial outputs left):", results)
    assert killed >= 10 and any(r[3] for r in results)  # some kills landed mid-write
    for name, (out, args) in jobs.items():  # every command completes afterwards
        p = cli_process(*args)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "Traceback" not in err, err
    assert leftovers(tmp_path) == [] and leftovers(scored) == []
    assert not (tmp_path / ".strategy.calibration").exists()
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["shape"] == "5x0.75"
