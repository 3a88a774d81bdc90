"""The real default model (SmolLM2-135M-Instruct) and its shipped strategy. Marked slow."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

import tiny  # noqa: E402

from amoeba_export.base_model import default_model_dir, model_info  # noqa: E402
from amoeba_export.elastic import ElasticModel  # noqa: E402
from amoeba_export.flows import FLOWS  # noqa: E402
from amoeba_export.pipeline import compile_shape  # noqa: E402
from amoeba_export.shapes import Shape  # noqa: E402
from amoeba_export.strategy import SHIPPED  # noqa: E402

SHIPPED_DIR = SHIPPED / "smollm2-135m-instruct"
HOST = {"name": "host", "flows": ["pytorch"]}


@pytest.fixture()
def elastic(default_elastic):
    return default_elastic


def test_shipped_strategy_matches_the_default_model(elastic):
    s = elastic.strategy
    assert s.model["fingerprint"] == model_info(default_model_dir())["fingerprint"]
    assert sorted(s.depths) == list(range(19, 31)) and len(s.widths) == 5
    for w, frac in s.meta["kept_fraction"].items():
        assert abs(frac - float(w)) < 0.02


@pytest.mark.parametrize("shape", ["30x1.0", "24x0.75", "19x0.5"])
def test_parity_of_three_shapes(elastic, tmp_path, shape):
    res = compile_shape(elastic, Shape.parse(shape), FLOWS["pytorch"], HOST, tmp_path / shape, dtype="float32")
    p = res.manifest["parity"]
    tiny.record_parity("pytorch", f"SmolLM2-135M {shape}", res.dense.uniform, "float32", p["max_abs_logit_diff"])
    assert p["max_abs_logit_diff"] < 1e-4 and p["greedy_token_agreement"] == 1.0, p


def test_shipped_accuracy_entry_reproduces(elastic):
    """The layer-wise reference scores a shape as the shipped accuracy table says: the same
    multiple-choice answers, and perplexity within float rounding (the table's own thread count)."""
    import json

    from amoeba_export.score import EvalConfig, default_path, eval_set, score_shape

    shipped = json.loads((SHIPPED_DIR / default_path(SHIPPED_DIR).name).read_text())["entries"]["24x0.75"]
    cfg = EvalConfig()
    windows, items = eval_set(elastic.tokenizer(), cfg)
    entry = score_shape(elastic.logits_fn(Shape.parse("24x0.75")), elastic.tokenizer(), windows, items, cfg)
    assert entry["mc"] == shipped["mc"] and entry["ppl_tokens"] == shipped["ppl_tokens"]
    assert entry["ppl"] == pytest.approx(shipped["ppl"], rel=1e-4)


def test_depth_dp_slice_reproduces(elastic):
    """Re-run the first DP rows with the shipped settings: same scores, same decisions."""
    from trainer.calibrate import CalibrationConfig, depth_evaluator
    from trainer.depth import dp_select

    settings = dict(elastic.strategy.meta["settings"])
    settings.pop("fingerprint")
    cfg = CalibrationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    evaluate, higher = depth_evaluator(ElasticModel(None), cfg)
    rows = 2
    t = dp_select(elastic.n_layers, cfg.min_depth, cfg.keep_last, evaluate, higher, rows=rows)
    shipped = elastic.strategy.meta["depth_dp"]
    assert t.masks == shipped["masks"][: rows + 1]
    np.testing.assert_allclose(
        [v for row in t.metric for v in row if v is not None],
        [v for row in shipped["metric"][: rows + 1] for v in row if v is not None], rtol=1e-4)


def test_width_slice_reproduces(elastic):
    """FLAP statistics of the first two layers re-collected, and the selection re-derived from the
    shipped statistics, both match what is shipped."""
    from trainer.calibrate import CalibrationConfig, width_windows
    from trainer.width import collect_stats, flap_widths

    s = elastic.strategy
    settings = s.meta["settings"]
    cfg = CalibrationConfig(calib=settings["calib"], width_samples=settings["width_samples"],
                            seq_len=settings["seq_len"], seed=settings["seed"])
    fresh = ElasticModel(None)
    stats = collect_stats(fresh.stack(), width_windows(fresh, cfg), batch_size=8, layers=2)
    for k in ("o_mean", "o_var", "down_mean", "down_var"):
        np.testing.assert_allclose(stats[k], s.stats[k][:2], rtol=1e-3, atol=1e-5)
    for w in s.widths:
        again = flap_widths(s.stats, fresh.weights, fresh.info, w, settings["head_unit"])
        for a, b in zip(again, s.widths[w]):
            assert np.array_equal(a.q_heads, b.q_heads) and np.array_equal(a.channels, b.channels)
            np.testing.assert_allclose(a.o_bias, b.o_bias, atol=1e-6)
            np.testing.assert_allclose(a.down_bias, b.down_bias, atol=1e-6)


def test_full_depth_export_loads_without_amoeba_export_and_answers_paris(elastic, tmp_path):
    """A uniform export is a stock HF directory: a clean interpreter (no amoeba_export on the path)
    loads it with AutoModelForCausalLM and greedy decoding continues with Paris."""
    out = tmp_path / "full"
    # build=False: the AOTInductor package of this very shape is built and checked by
    # test_parity_of_three_shapes[30x1.0]; this test reads the directory only
    compile_shape(elastic, Shape(30, 1.0), FLOWS["pytorch"], HOST, out, dtype="float32", build=False)
    code = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert type(model) is LlamaForCausalLM, type(model)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0][ids.shape[1]:])
        assert "amoeba_export" not in sys.modules
        print(text)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Paris" in p.stdout, p.stdout
