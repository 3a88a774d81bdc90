"""`score` and `calibrate` split over two CPU processes (torchrun, gloo) give exactly the tables of
one process, and a distributed score resumes from the shapes an earlier launch finished."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny

from amoeba_export.cli import main
from amoeba_export.score import AccuracyTable, EvalConfig, default_path
from amoeba_export.strategy import Strategy

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(processes: int, *args: str, cwd: Path) -> None:
    """The CLI in this process (one), or under torchrun (several)."""
    if processes == 1:
        main(list(args))  # a mistake exits with code 2, failing the test
        return
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m", "amoeba_export.cli"]
    proc = subprocess.run(cmd + list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{rng.randrange(93)}" for _ in range(150)) for _ in range(30)))
    tiny.random_strategy(tiny_gqa, seed=2).save(root / "strategy")
    return tiny_gqa, root, text


def score_table(model: Path, sdir: Path, text: Path, processes: int, cwd: Path) -> AccuracyTable:
    args = ["score", "--model", str(model), "--strategy", str(sdir), "--heldout", str(text), "--windows", "4",
            "--seq-len", "16", "--tasks", "", "--device", "cpu"]
    launch(processes, *args, cwd=cwd)
    cfg = EvalConfig(heldout=str(text), ppl_windows=4, seq_len=16, mc_tasks=())
    return json.loads(default_path(sdir, cfg).read_text())


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
def test_two_process_score_equals_one_and_resumes(setup, tmp_path):
    model, root, text = setup
    for name in ("one", "two", "resumed"):
        shutil.copytree(root / "strategy", tmp_path / name)
    one = score_table(model, tmp_path / "one", text, 1, tmp_path)
    two = score_table(model, tmp_path / "two", text, 2, tmp_path)
    assert len(one["entries"]) == 12
    assert two["entries"] == one["entries"]  # every number, bit for bit
    assert two["provenance"]["processes"] == 2

    # A launch killed after finishing one shape leaves its part file: the next launch keeps it.
    cfg = EvalConfig(heldout=str(text), ppl_windows=4, seq_len=16, mc_tasks=())
    path = default_path(tmp_path / "resumed", cfg)
    parts = path.parent / f".{path.name}.parts"
    parts.mkdir(parents=True)
    shape = sorted(one["entries"])[0]
    marked = dict(one["entries"][shape], ppl=123.0)  # a value no scoring produces: it must come from the part
    key = {"model": one["model"], "strategy_fingerprint": one["strategy"]["fingerprint"], "eval": one["eval"]}
    (parts / f"{shape}.json").write_text(json.dumps({**key, "shape": shape, "entry": marked, "seconds": 1.0}))
    (parts / "24x0.5.json").write_text('{"cut short')  # a part being written when the process died
    resumed = score_table(model, tmp_path / "resumed", text, 2, tmp_path)
    assert resumed["entries"][shape]["ppl"] == 123.0
    assert {s: e for s, e in resumed["entries"].items() if s != shape} == {
        s: e for s, e in one["entries"].items() if s != shape
    }
    assert not parts.exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
def test_two_process_calibrate_equals_one(setup, tmp_path):
    model, _, text = setup
    args = ["calibrate", "--model", str(model), "--calib", str(text), "--depth-samples", "3", "--width-samples", "6",
            "--seq-len", "32", "--min-depth", "3", "--device", "cpu"]
    launch(1, *args, "--out", str(tmp_path / "one"), cwd=tmp_path)
    launch(2, *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    one, two = Strategy.load(tmp_path / "one"), Strategy.load(tmp_path / "two")
    assert one.depths == two.depths
    assert one.meta["depth_dp"] == two.meta["depth_dp"]
    for k in one.stats:
        assert np.array_equal(one.stats[k], two.stats[k]), k
    for w in one.widths:
        for a, b in zip(one.widths[w], two.widths[w]):
            assert np.array_equal(a.q_heads, b.q_heads) and np.array_equal(a.channels, b.channels)
            assert np.array_equal(a.o_bias, b.o_bias) and np.array_equal(a.down_bias, b.down_bias)
