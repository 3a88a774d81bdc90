"""Stage-1 calibration on a tiny model: the DP recurrence, FLAP selection and compensation, resume."""
import random

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.metrics import perplexity
from amoeba_export.strategy import Strategy
from trainer.calibrate import CalibrationConfig, run_calibration
from trainer.depth import LayerRunner, dp_select, kept_layers, ppl_evaluator
from trainer.width import collect_stats, flap_widths, uniform_widths


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    random.seed(0)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n\n".join(" ".join(f"w{random.randrange(90)}" for _ in range(150)) for _ in range(30)))
    return p


def windows(n=4, T=32, seed=0):
    return torch.randint(3, tiny.VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def test_dp_candidate_score_equals_masked_reference(tiny_gqa):
    em = ElasticModel(tiny_gqa)
    ids = windows()
    evaluate = ppl_evaluator(LayerRunner(em.stack(), ids))
    for kept, first in (([0, 1, 3, 4, 5], 2), ([1, 2, 5], 0), ([0, 1, 2, 3, 5], 4)):
        with em.masked(layers=kept) as m:
            ref = perplexity(lambda x: m(input_ids=x, use_cache=False).logits, ids)
        assert evaluate(first, kept) == pytest.approx(ref, rel=1e-5)


def test_dp_follows_the_upstream_recurrence():
    """Against a direct transcription of docs/amoeba-algorithm.md §2 with a synthetic additive metric."""
    L, k, dmin = 7, 1, 3
    cost = np.array([0.5, 0.1, 0.9, 0.2, 0.05, 0.3, 0.7])
    calls = []

    def evaluate(first, kept):  # additive cost plus an interaction, so greedy and DP differ
        calls.append(first)
        removed = set(range(L)) - set(kept)
        return float(sum(cost[i] for i in removed) + (0.6 if {1, 4} <= removed else 0.0))

    t = dp_select(L, dmin, k, evaluate, higher_is_better=False)
    N, M = L - k, L - dmin
    assert len(calls) == sum(min(n, M) for n in range(1, N + 1))
    # re-run the recurrence by hand with the same scores
    calls.clear()
    d = [[np.inf] * (M + 1) for _ in range(N + 1)]
    S = [[None] * (M + 1) for _ in range(N + 1)]
    for n in range(N + 1):
        S[n][0] = [1] * N
    for n in range(1, N + 1):
        for m in range(1, min(n, M) + 1):
            c = list(S[n - 1][m - 1])
            c[N - n] = 0
            v = evaluate(N - n, [i for i in range(N) if c[i]] + [N])
            d[n][m], S[n][m] = (v, c) if v < d[n - 1][m] else (d[n - 1][m], S[n - 1][m])
    assert t.masks[-1][1:] == ["".join(map(str, S[N][m])) for m in range(1, M + 1)]
    depths = kept_layers(t, L, k)
    assert sorted(depths) == list(range(dmin, L + 1))
    assert all(L - 1 in v and len(v) == d_ for d_, v in depths.items())


def test_dp_resumes_from_checkpoint(tmp_path):
    cost = np.linspace(0.1, 1.0, 6)
    evaluate = lambda first, kept: float(sum(cost[i] for i in range(6) if i not in kept))  # noqa: E731
    ck = tmp_path / "dp.json"
    full = dp_select(6, 3, 1, evaluate, False)
    partial = dp_select(6, 3, 1, evaluate, False, checkpoint=ck, rows=2)
    assert len(partial.metric) == 3 and ck.is_file()
    seen = []
    resumed = dp_select(6, 3, 1, lambda f, k: seen.append(f) or evaluate(f, k), False, checkpoint=ck)
    assert resumed.masks == full.masks and resumed.metric == full.metric
    assert min(seen) < 6 - 1 - 2  # only rows after the checkpoint were evaluated
    assert len(seen) == sum(min(n, 3) for n in range(3, 6))


def test_flap_hits_the_ratio_and_compensates_the_mean(tiny_gqa):
    em = ElasticModel(tiny_gqa)
    ids = windows(6, 40, seed=1)
    stats = collect_stats(em.stack(), ids, batch_size=2)
    info = em.info
    for ratio in (0.875, 0.75, 0.5):
        per_layer = flap_widths(stats, em.weights, info, ratio)
        from trainer.calibrate import _kept_fraction
        assert _kept_fraction(per_layer, info) == pytest.approx(ratio, abs=0.05)
        sizes = {(int(l.q_heads.sum()), int(l.channels.sum())) for l in per_layer}
        assert len(sizes) > 1  # adaptive across layers
    # bias compensation: over the calibration tokens, the mean o_proj output error is zero
    per_layer = flap_widths(stats, em.weights, info, 0.5)
    lw = per_layer[2]
    captured = []
    o = em.hf_model().model.layers[2].self_attn.o_proj
    h = o.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        em.hf_model()(input_ids=ids, use_cache=False)
    h.remove()
    x = torch.cat(captured).double()
    W = o.weight.double()
    mask = torch.from_numpy(np.repeat(lw.q_heads, info["head_dim"])).double()
    err = x @ W.T - ((x * mask) @ W.T + torch.from_numpy(lw.o_bias).double())
    assert err.mean(0).abs().max() < 1e-4
    assert (x @ W.T - (x * mask) @ W.T).mean(0).abs().max() > 1e-2  # without the bias it is not


def test_flap_group_unit_and_uniform_policy(tiny_qwen):
    em = ElasticModel(tiny_qwen)
    stats = collect_stats(em.stack(), windows(4, 32), batch_size=2)
    info = em.info
    G = info["n_heads"] // info["n_kv_heads"]
    for lw in flap_widths(stats, em.weights, info, 0.5, head_unit="group"):
        groups = lw.q_heads.reshape(-1, G)
        assert all(g.all() or not g.any() for g in groups)
    uni = uniform_widths(stats, em.weights, info, 0.5, align=16)
    assert len({(int(l.q_heads.sum()), int(l.channels.sum())) for l in uni}) == 1
    assert all(l.channels.sum() % 16 == 0 for l in uni)
    assert all(l.kv_heads(info["n_kv_heads"]).all() for l in uni)  # every group keeps a head


def test_full_width_keeps_everything(tiny_gqa):
    em = ElasticModel(tiny_gqa)
    stats = collect_stats(em.stack(), windows(2, 16), batch_size=2)
    for lw in flap_widths(stats, em.weights, em.info, 1.0):
        assert lw.q_heads.all() and lw.channels.all() and not lw.o_bias.any()


def test_calibrate_end_to_end_and_exports(tiny_gqa, calib_file, tmp_path):
    cfg = CalibrationConfig(calib=str(calib_file), depth_samples=3, width_samples=6, seq_len=48, min_depth=4)
    strategy, out = run_calibration(tiny_gqa, cfg, tmp_path / "s")
    loaded = Strategy.load(out)
    assert sorted(loaded.depths) == [4, 5, 6] and sorted(loaded.widths) == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert loaded.meta["depth_dp"]["masks"] == strategy.meta["depth_dp"]["masks"]
    assert not (tmp_path / ".s.calibration").exists()  # work dir removed on success
    # same settings, same result (deterministic)
    again, _ = run_calibration(tiny_gqa, cfg, tmp_path / "s2")
    assert again.depths == strategy.depths
    for w in strategy.widths:
        for a, b in zip(again.widths[w], strategy.widths[w]):
            assert np.array_equal(a.q_heads, b.q_heads) and np.array_equal(a.channels, b.channels)
            np.testing.assert_allclose(a.o_bias, b.o_bias, atol=1e-6)


@pytest.mark.parametrize("stage", ["depth DP", "FLAP statistics"])
def test_a_damaged_checkpoint_is_reported_and_redone(tiny_gqa, calib_file, tmp_path, monkeypatch, capsys, stage):
    """A run stopped after the DP (or after the FLAP statistics) leaves its checkpoint; damaged, the
    next run says so in one line and redoes that stage instead of failing."""
    import trainer.calibrate as cal

    cfg = CalibrationConfig(calib=str(calib_file), depth_samples=2, width_samples=4, seq_len=32, min_depth=4)
    stop = "collect_stats" if stage == "depth DP" else "flap_widths"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cal, stop, interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_calibration(tiny_gqa, cfg, tmp_path / "s")
    work = tmp_path / ".s.calibration"
    damaged = work / ("depth_dp.json" if stage == "depth DP" else "flap_stats.safetensors")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    strategy, out = run_calibration(tiny_gqa, cfg, tmp_path / "s")
    err = capsys.readouterr().err
    assert f"unreadable {stage}" in err and "Traceback" not in err
    assert Strategy.load(out).depths == strategy.depths and not work.exists()
