"""Profilers: the timing loop (scripted clock, exact), workloads, and the PyTorch-flow profiler on
tiny exported models. No wall-clock value is asserted anywhere."""
import gc
import json

import numpy as np
import pytest
import tiny
import torch

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows import FLOWS
from amoeba_export.flows.pytorch import runtime as prof
from amoeba_export.flows.pytorch import writer as pytorch_exporter
from amoeba_export.materialize import materialize
from profilers.profile import profile_artifact
from profilers.timing import (
    Timing,
    environment,
    is_stable,
    measure,
    percentile,
    physical_cores,
    pinned_threads,
    skew_warnings,
    time_steps,
)
from profilers.workload import Workload

FAST = dict(warmup=1, min_repeats=3, max_repeats=5, max_seconds=5.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: with 2 OpenMP threads and another process busy, one
    thread spin-waits for the other and a 3 ms step takes 40 ms. One thread keeps the suite fast."""
    with pinned_threads(1):
        yield


# ---------------------------------------------------------------- measure() with a scripted clock

class Script:
    """A fake clock plus a function whose every call takes the next scripted duration."""

    def __init__(self, durations):
        self.t = 0.0
        self.durations = list(durations)
        self.calls = 0
        self.events = []

    def clock(self):
        self.events.append("clock")
        return self.t

    def fn(self):
        self.events.append("fn")
        self.t += self.durations[self.calls]
        self.calls += 1


def test_warmup_discarded_and_stops_when_stable():
    s = Script([100.0, 50.0, 25.0] + [1.0] * 20)
    t = measure(s.fn, warmup=3, min_repeats=5, clock=s.clock)
    assert t.samples == [1.0] * 5 and t.n == 5
    assert t.stable and t.stop_reason == "stable" and t.warmup == 3
    assert s.calls == 8
    assert (t.median, t.p10, t.p90, t.stdev) == (1.0, 1.0, 1.0, 0.0)


def test_keeps_going_until_median_settles():
    # the median climbs with the early samples, then settles
    durs = [1.0, 2.0, 3.0, 4.0] + [5.0] * 16
    s = Script(durs)
    t = measure(s.fn, warmup=0, min_repeats=5, rel_tol=0.02, max_seconds=1e9, clock=s.clock)
    assert t.stop_reason == "stable"
    n = t.n
    assert n > 5 and t.samples == durs[:n]
    # the rule, checked independently: stable at n, not at any earlier admissible count
    assert is_stable(durs[:n], 2, 0.02)
    assert not any(is_stable(durs[:k], 2, 0.02) for k in range(5, n))


def test_unstable_stops_at_max_repeats():
    durs = [1.1 ** i for i in range(100)]  # the median keeps climbing
    s = Script(durs)
    t = measure(s.fn, warmup=2, min_repeats=5, max_repeats=12, max_seconds=1e9, clock=s.clock)
    assert t.n == 12 and t.stop_reason == "max_repeats" and not t.stable
    assert t.samples == pytest.approx(durs[2:14])


def test_stops_at_max_seconds():
    s = Script([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    t = measure(s.fn, warmup=0, min_repeats=5, max_repeats=50, max_seconds=10.0, clock=s.clock)
    assert t.samples == [1.0, 2.0, 3.0, 4.0]  # 1+2+3+4 = 10 s of timed phase
    assert t.stop_reason == "max_seconds" and not t.stable


def test_percentiles_on_known_samples():
    samples = [7.0, 1.0, 10.0, 3.0, 2.0, 9.0, 4.0, 6.0, 5.0, 8.0]
    t = Timing.from_samples(samples, stop_reason="max_repeats")
    assert t.median == 5.5 and t.p10 == pytest.approx(1.9) and t.p90 == pytest.approx(9.1)
    assert t.p10 == pytest.approx(np.percentile(samples, 10)) and t.p90 == pytest.approx(np.percentile(samples, 90))
    assert t.mean == 5.5 and t.stdev == pytest.approx(np.std(samples, ddof=1))
    assert t.samples == samples and t.n == 10  # kept in the order taken
    assert percentile([4.0], 90) == 4.0
    assert Timing.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_setup_is_untimed_and_sync_precedes_each_clock_read():
    s = Script([1.0] * 20)
    setups = []

    def setup():
        setups.append(1)
        s.events.append("setup")
        s.t += 100.0  # expensive, but outside the timed region

    t = measure(s.fn, warmup=2, min_repeats=5, max_seconds=1e9, setup=setup, sync=lambda: s.events.append("sync"),
                clock=s.clock)
    assert t.samples == [1.0] * 5
    assert len(setups) == 2 + 5  # before warm-up calls too
    ev = s.events
    for i, e in enumerate(ev):
        if e == "fn":  # fn is bracketed: sync, clock, fn, sync, clock
            assert ev[i - 2:i] == ["sync", "clock"] and ev[i + 1:i + 3] == ["sync", "clock"]


def test_measure_rejects_bad_settings_and_restores_gc():
    s = Script([1.0] * 10)
    for bad in (dict(min_repeats=0), dict(min_repeats=6, max_repeats=5), dict(warmup=-1),
                dict(max_seconds=0), dict(rel_tol=-0.1)):
        with pytest.raises(UserError):
            measure(s.fn, clock=s.clock, **bad)
    assert gc.isenabled()
    measure(s.fn, warmup=0, clock=s.clock)
    assert gc.isenabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_events_rejected_cleanly_without_cuda():
    calls = []
    with pytest.raises(UserError, match="CUDA"):
        measure(lambda: calls.append(1), cuda_events=True)
    assert calls == []  # nothing ran


def test_real_clock_smoke():
    t = measure(lambda: sum(range(1000)), warmup=1, min_repeats=5, max_repeats=10)
    assert t.timer == "perf_counter" and t.n == len(t.samples) >= 5 and t.median > 0
    assert t.p10 <= t.median <= t.p90


# ---------------------------------------------------------------- workload

@pytest.mark.parametrize("bad", [dict(batch=0), dict(prompt_len=-1), dict(gen_len=-5), dict(gen_len=0),
                                 dict(metric="latency"), dict(batch=1.5), dict(batch=True)])
def test_workload_validation(bad):
    with pytest.raises(UserError):
        Workload(**bad)


def test_workload_key_and_json():
    w = Workload()
    assert (w.batch, w.prompt_len, w.gen_len, w.metric) == (1, 128, 64, "tpot")
    assert w.key() == "b1-p128-g64-tpot"
    w2 = Workload(4, 512, 32, "ttft")
    assert w2.key() == "b4-p512-g32-ttft" and Workload.parse(w2.key()) == w2
    assert Workload.from_json(w2.to_json()) == w2
    assert Workload.from_json(json.dumps(w2.to_json())) == w2
    with pytest.raises(UserError):
        Workload.from_json({"batch": 1, "ctx": 3})
    with pytest.raises(UserError):
        Workload.parse("p128-b1")


# ---------------------------------------------------------------- threads and environment

def test_pinned_threads_restores():
    before = torch.get_num_threads()
    with pinned_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with pinned_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pinned_threads() as n:
        assert n == physical_cores() >= 1 and torch.get_num_threads() == n
    assert torch.get_num_threads() == before
    with pytest.raises(UserError):
        with pinned_threads(0):
            pass


def test_environment_record():
    with pinned_threads(1):
        env = environment()
    json.dumps(env)  # serialisable
    assert env["torch_threads"] == 1 and env["logical_cpus"] >= 1 and env["physical_cores"] >= 1
    assert env["versions"]["torch"] and env["versions"]["python"]
    assert "governor" in env and "loadavg" in env and isinstance(env["warnings"], list)


def test_skew_warnings():
    env = {"usable_cpus": 2, "physical_cores": 2, "torch_threads": 2, "loadavg": [2.3, 2.0, 1.9],
           "governor": "powersave"}
    w = skew_warnings(env)
    assert not any("load average" in x for x in w)  # it lags and counts our own work: other_load judges load
    assert any("governor is powersave" in x for x in w)
    quiet = {"usable_cpus": 2, "physical_cores": 2, "torch_threads": 2, "loadavg": [0.1, 0.1, 0.1],
             "governor": "performance", "jetson": {"power_mode": "MAXN"}}
    assert skew_warnings(quiet) == []
    assert any("oversubscribed" in x for x in skew_warnings({**quiet, "torch_threads": 4}))
    assert any("power mode" in x for x in skew_warnings({**quiet, "jetson": {"power_mode": "15W"}}))


# ---------------------------------------------------------------- the PyTorch-flow profiler

@pytest.fixture(scope="module")
def exported(tiny_gqa, tmp_path_factory):
    """Two artifacts the PyTorch exporter wrote: a uniform one (stock class) and a per-layer one."""
    em = ElasticModel(tiny_gqa, tiny.random_strategy(tiny_gqa))
    out = {}
    for name, shape in (("uniform", em.strategy.space.largest), ("per_layer", em.strategy.space.smallest)):
        d = tmp_path_factory.mktemp(name)
        pytorch_exporter.emit(materialize(em, shape), d, em.dir)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def models(exported):
    return {k: prof.load_artifact(v) for k, v in exported.items()}


def time_workload(model, workload, metrics=None, **measure_kwargs):
    """The PyTorch runtime's steps through the one timing loop, as `profile_artifact` runs them."""
    metrics, _ = workload.timed(metrics, model.config.max_position_embeddings, "max_position_embeddings")
    ids = torch.from_numpy(workload.prompt_ids(model.config.vocab_size))
    return time_steps(prof.Steps(model), ids, workload, metrics, **measure_kwargs)


def record_calls(model):
    """Forward pre-hook: (input_ids shape, per-layer cache lengths or None, logits_to_keep) per call."""
    calls = []

    def hook(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        calls.append((tuple(kwargs["input_ids"].shape), prof.cache_lengths(pkv) if pkv is not None else None,
                      kwargs.get("logits_to_keep")))
    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_load_artifact_classes(models):
    assert type(models["uniform"]).__name__ == "LlamaForCausalLM"
    assert type(models["per_layer"]).__name__ == "AmoebaLlamaForCausalLM"
    assert not models["uniform"].training


def test_time_workload_all_metrics(models):
    w = Workload(batch=1, prompt_len=16, gen_len=4, metric="e2e")
    for model in models.values():
        out = time_workload(model, w, **FAST)
        assert set(out) == {"ttft", "tpot", "e2e"}
        for t in out.values():
            assert t.median > 0 and t.n == len(t.samples) >= FAST["min_repeats"]
            assert t.p10 <= t.median <= t.p90


def test_tpot_steps_one_token_from_a_prompt_len_cache(models):
    P = 24
    for model in models.values():
        calls, handle = record_calls(model)
        try:
            t = time_workload(model, Workload(batch=2, prompt_len=P), metrics=("tpot",),
                                   warmup=2, min_repeats=5, max_repeats=8, max_seconds=5.0)["tpot"]
        finally:
            handle.remove()
        first, steps = calls[0], calls[1:]
        assert first == ((2, P), None, 1)  # the untimed prefill that builds the cache
        assert len(steps) == 2 + t.n  # warm-up + timed decode steps, nothing else
        n_layers = model.config.num_hidden_layers
        for shape, lengths, _ in steps:
            assert shape == (2, 1)  # one new token per sequence
            assert lengths == [P] * n_layers  # every step starts from the same cache length


def test_ttft_is_one_prefill_over_the_prompt(models):
    model = models["per_layer"]
    calls, handle = record_calls(model)
    seen = []
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        t = time_workload(model, Workload(batch=2, prompt_len=64), metrics=("ttft",), **FAST)["ttft"]
    finally:
        handle.remove()
        embed.remove()
    assert len(calls) == FAST["warmup"] + t.n
    assert all(c == ((2, 64), None, 1) for c in calls)  # fresh cache, last-position logits only
    assert seen == [(2, 64)] * len(calls)


def test_e2e_is_prefill_plus_decode_to_gen_len(models):
    model = models["uniform"]
    calls, handle = record_calls(model)
    try:
        t = time_workload(model, Workload(prompt_len=8, gen_len=5, metric="e2e"),
                               metrics=("e2e",), **FAST)["e2e"]
    finally:
        handle.remove()
    runs = FAST["warmup"] + t.n
    assert len(calls) == runs * 5
    for r in range(runs):
        run = calls[r * 5:(r + 1) * 5]
        assert run[0] == ((1, 8), None, 1)
        assert [c[1][0] for c in run[1:]] == [8, 9, 10, 11]  # greedy decode grows the cache


def test_rewind_restores_the_cache_state(models):
    model = models["per_layer"]
    ids = torch.randint(0, tiny.VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tok, cache = prof.prefill(model, ids)
        ref = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
        for _ in range(3):
            prof.decode_step(model, tok, cache)
        assert prof.cache_lengths(cache) == [14] * model.config.num_hidden_layers
        prof.rewind(cache, 10)
        assert prof.cache_lengths(cache) == [10] * model.config.num_hidden_layers
        again = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, ref)
        with pytest.raises(ValueError):
            prof.rewind(cache, 20)


def test_profile_artifact_record(exported):
    before = torch.get_num_threads()
    rec = profile_artifact(
        FLOWS["pytorch"], exported["per_layer"], Workload(prompt_len=8, gen_len=3), threads=1, **FAST
    )
    assert torch.get_num_threads() == before
    rec = json.loads(json.dumps(rec))  # JSON-serialisable
    assert rec["workload"] == {"batch": 1, "prompt_len": 8, "gen_len": 3, "metric": "tpot"}
    assert set(rec["timings"]) == {"ttft", "tpot"}
    for t in rec["timings"].values():
        assert {"median", "p10", "p90", "n", "samples", "stable", "stop_reason"} <= set(t)
        assert len(t["samples"]) == t["n"] and t["median"] > 0
    assert rec["environment"]["torch_threads"] == 1 and rec["runtime"]["threads"] == 1
    assert rec["runtime"]["class"] == "AmoebaLlamaForCausalLM" and rec["runtime"]["dtype"] == "float32"
    assert rec["artifact"] == str(exported["per_layer"])


def test_profiler_user_errors(exported, models, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        prof.load_artifact(tmp_path)
    with pytest.raises(UserError):
        prof.load_artifact(exported["uniform"], dtype="float8")
    with pytest.raises(UserError, match="max_position_embeddings"):
        prof.open(exported["uniform"], Workload(prompt_len=300))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            prof.load_artifact(exported["uniform"], device="cuda")


def test_time_requests_derives_tpot_from_whole_requests():
    """Engines that only serve whole requests: TTFT = a one-token request, TPOT = (E2E - TTFT) / (gen_len - 1)."""
    from profilers.timing import time_requests

    now = [0.0]

    def clock():
        return now[0]

    def run(n):  # 100 ms prefill, 10 ms per further token
        now[0] += 0.1 + 0.01 * (n - 1)

    wl = Workload(1, 8, 5, "tpot")
    t = time_requests(run, wl, ("ttft", "tpot", "e2e"), clock=clock, warmup=0, min_repeats=3)
    assert t["ttft"].median == pytest.approx(0.1) and t["e2e"].median == pytest.approx(0.14)
    assert t["tpot"].median == pytest.approx(0.01) and t["tpot"].timer.startswith("derived")
    assert list(time_requests(run, wl, ("tpot",), clock=clock, warmup=0)) == ["tpot"]
    with pytest.raises(UserError, match="gen-len of at least 2"):
        time_requests(run, Workload(1, 8, 1, "tpot"), ("tpot",), clock=clock)


def test_device_profilers_refuse_where_they_cannot_run():
    from profilers.profile import cannot_measure
    from targets import load_target

    assert cannot_measure(load_target("host"), FLOWS["pytorch"]) is None
    assert "times a GPU" in cannot_measure(load_target("host"), FLOWS["mlc"])
    assert "not the a5000's GPU" in cannot_measure(load_target("a5000"), FLOWS["gguf"])
    assert "no visible GPU" in cannot_measure(load_target("jetson-orin"), FLOWS["mlc"])
