"""search: budget units, the hierarchical search against an independent exhaustive oracle, the
Pareto front, the infeasible-budget messages and the Pareto plot."""
import numpy as np
import pytest

from amoeba_export.errors import UserError
from amoeba_export.search import (
    SearchResult,
    format_bytes,
    format_time,
    pareto_front,
    parse_bytes,
    parse_time,
    plot_pareto,
    search,
    summary_rows,
)
from amoeba_export.shapes import Shape

DEPTHS = range(19, 31)
WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5)
SPACE = [Shape(d, w) for d in DEPTHS for w in WIDTHS]
GiB = 2**30


# --- units ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("40ms", 0.04), ("40 ms", 0.04), ("0.04s", 0.04), ("1.5s", 1.5), ("500us", 0.0005),
    ("500\u00b5s", 0.0005), ("500\u03bcs", 0.0005), ("40000us", 0.04), ("0.3ms", 0.0003),
    ("1e-3s", 0.001), (" 40MS ", 0.04),
])
def test_parse_time_good(text, seconds):
    assert parse_time(text) == seconds  # exact: decimal scaling rounds once


@pytest.mark.parametrize("text, problem", [
    ("40", "needs a unit"), ("-5ms", "must be positive"), ("0ms", "must be positive"),
    ("40 parsecs", "unknown unit 'parsecs'"), ("", "is empty"), ("fast", "is not a time"),
    ("40ms fast", "is not a time"), ("1e999ms", "out of range"), ("-5", "needs a unit"),
])
def test_parse_time_bad(text, problem):
    with pytest.raises(UserError) as e:
        parse_time(text)
    msg = str(e.value)
    assert problem in msg and "--budget" in msg and "40ms" in msg and "\n" not in msg


@pytest.mark.parametrize("text, n", [
    ("6GiB", 6 * GiB), ("512MiB", 512 * 2**20), ("6GB", 6 * 10**9), ("1.5 GiB", 1610612736),
    ("2kib", 2048), ("100B", 100),
])
def test_parse_bytes_good(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text, problem", [
    ("6", "needs a unit"), ("-1GiB", "must be positive"), ("0GB", "must be positive"),
    ("3 gigs", "unknown unit 'gigs'"), ("", "is empty"), ("lots", "is not a size"),
    ("1e999999999GiB", "out of range"), ("0.4B", "less than one byte"),
])
def test_parse_bytes_bad(text, problem):
    with pytest.raises(UserError) as e:
        parse_bytes(text)
    assert problem in str(e.value) and "--memory" in str(e.value)


def test_format():
    assert [format_time(x) for x in (0.0382, 1.2, 850e-6, 0.005, 0.9996e-3, 0.99996)] == \
        ["38.2 ms", "1.20 s", "850 us", "5.0 ms", "1.0 ms", "1.00 s"]
    assert [format_bytes(x) for x in (GiB, int(1.3 * GiB), 512 * 2**20, 100)] == \
        ["1 GiB", "1.3 GiB", "512 MiB", "100 B"]


# --- synthetic tables ----------------------------------------------------------------------------

def make_tables(rng, *, lat_noise=0.0, score_noise=0.0, score_swaps=0, lat_swaps=0, missing=0,
                quantise=False):
    """latency = c0 + depth*(a + b*width) seconds, score increasing in depth and width, with
    optional noise, deliberate non-monotone swaps within a depth, missing shapes and coarse
    rounding (to force ties)."""
    c0, a, b = rng.uniform(1, 5), rng.uniform(0.2, 1.0), rng.uniform(0.5, 2.0)
    latency, score = {}, {}
    for s in SPACE:
        latency[s] = (c0 + s.depth * (a + b * s.width)) * 1e-3 * (1 + lat_noise * rng.normal())
        score[s] = 0.3 + 0.02 * (s.depth - 19) + 0.3 * (s.width - 0.5) + score_noise * rng.normal()
    for table, n in ((score, score_swaps), (latency, lat_swaps)):
        for _ in range(n):  # swap two widths at one depth: breaks monotonicity in width
            d = int(rng.choice(list(DEPTHS)))
            w1, w2 = rng.choice(WIDTHS, size=2, replace=False)
            table[Shape(d, w1)], table[Shape(d, w2)] = table[Shape(d, w2)], table[Shape(d, w1)]
    if quantise:
        latency = {s: round(v * 2000) / 2000 for s, v in latency.items()}  # 0.5 ms steps
        score = {s: round(v, 2) for s, v in score.items()}
    for s in rng.choice(len(SPACE), size=missing, replace=False):
        del (score if rng.random() < 0.5 else latency)[SPACE[s]]
    return score, latency


def oracle(score, latency, budget, memory=None, memory_budget=None):
    """Independent brute force with the documented tie-break."""
    fits = [s for s in score if s in latency and latency[s] <= budget
            and (memory_budget is None or memory[s] <= memory_budget)]
    return max(fits, key=lambda s: (score[s], -latency[s], s.depth, s.width), default=None)


VARIANTS = {
    "monotone": {},
    "noisy-score": {"score_noise": 0.03},
    "swapped-score": {"score_swaps": 8},
    "noisy-latency": {"lat_noise": 0.08},
    "swapped-latency": {"lat_swaps": 6, "score_swaps": 4},
    "ties": {"quantise": True, "score_swaps": 3},
    "ragged": {"missing": 12, "lat_noise": 0.03, "score_noise": 0.02},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hierarchical_equals_exhaustive(variant):
    """200 tables in all (7 variants); search() itself raises RuntimeError on a disagreement."""
    rng = np.random.default_rng(sum(map(ord, variant)))
    checked = infeasible = fallbacks = 0
    for _ in range(29):
        score, latency = make_tables(rng, **VARIANTS[variant])
        lats = sorted(latency.values())
        budget = float(rng.uniform(lats[0] * 0.9, lats[-1] * 1.05))
        expected = oracle(score, latency, budget)
        if expected is None:
            with pytest.raises(UserError, match="no shape fits"):
                search(score, latency, budget)
            infeasible += 1
            continue
        r = search(score, latency, budget)
        assert r.shape == expected and r.agrees_with_exhaustive and r.method == "hierarchical"
        assert r.latency_s == latency[r.shape] <= budget and r.score == score[r.shape]
        assert set(r.feasible) == {s for s in score if s in latency and latency[s] <= budget}
        assert r.shape in r.pareto  # the choice is never dominated without a memory budget
        assert r.space_size == len(set(score) & set(latency))
        fallbacks += bool(r.nonmonotone_depths)
        checked += 1
    assert checked >= 20
    if variant in ("noisy-latency", "swapped-latency"):
        assert fallbacks > 0  # the fallback path really ran


def test_evaluated_fewer_than_shapes_on_monotone_tables():
    rng = np.random.default_rng(7)
    for _ in range(50):
        score, latency = make_tables(rng, score_noise=0.02)
        lats = sorted(latency.values())
        r = search(score, latency, float(rng.uniform(lats[5], lats[-5])))
        assert r.nonmonotone_depths == []
        assert r.evaluated < len(SPACE) == r.space_size


def test_evaluated_exact_count():
    """latency = depth*(1+width) ms, budget 36.5 ms, so the widest fit is w <= 36.5/d - 1.

    Depths 25..30: 1 lookup each (their x0.5 is too slow: dropped)            =  6
    19: x0.5, then 1.0 no, 0.875 fits                                          =  3
    20: x0.5, then 1.0, 0.875 no, 0.75 fits                                    =  4
    21, 22: x0.5, then 1.0, 0.875, 0.75 no, 0.625 fits                         = 10
    23, 24: x0.5, then 1.0, 0.875, 0.75, 0.625 no (x0.5 already read)         = 10
    The winners' latencies are among those read: 33 of 60.
    """
    latency = {s: (s.depth * (1 + s.width)) * 1e-3 for s in SPACE}
    score = {s: s.depth + s.width for s in SPACE}
    r = search(score, latency, 0.0365)
    assert r.evaluated == 33 and r.space_size == 60
    assert r.shape == Shape(24, 0.5)


def test_non_monotone_score_in_width():
    """A narrower width that scores higher than a wider one that also fits must win."""
    latency = {s: (s.depth * (1 + s.width)) * 1e-3 for s in SPACE}
    score = {s: s.depth / 100 + s.width / 10 for s in SPACE}
    score[Shape(24, 0.625)] = 1.0  # fits (39 ms), and 24x0.75 (42 ms) fits too with a lower score
    r = search(score, latency, 0.042)
    assert r.shape == Shape(24, 0.625) and r.nonmonotone_depths == []


def test_non_monotone_latency_falls_back_at_that_depth():
    """24x0.5 measured slow (noise) would make the plain method drop depth 24 and miss 24x0.625."""
    latency = {s: (s.depth * (1 + s.width)) * 1e-3 for s in SPACE}
    score = {s: s.depth / 100 + s.width / 10 for s in SPACE}
    latency[Shape(24, 0.5)] = 0.050
    score[Shape(24, 0.625)] = 1.0
    r = search(score, latency, 0.040)
    assert r.shape == Shape(24, 0.625) and r.nonmonotone_depths == [24]


def test_tie_breaking():
    s1, s2, s3 = Shape(20, 1.0), Shape(22, 0.75), Shape(24, 0.5)
    score = {s1: 0.6, s2: 0.6, Shape(19, 0.5): 0.1}
    latency = {s1: 0.010, s2: 0.009, Shape(19, 0.5): 0.001}
    assert search(score, latency, 0.02).shape == s2  # equal score: lower latency
    score[s3], latency[s3] = 0.6, 0.009
    assert search(score, latency, 0.02).shape == s3  # equal score and latency: larger depth
    latency[s3] = 0.02
    assert search(score, latency, 0.02).shape == s2  # exactly on the budget fits (and is slower)
    assert search(score, latency, 0.0199).shape == s2


def small_table():
    shapes = [Shape(19, 0.5), Shape(19, 1.0), Shape(24, 0.5), Shape(24, 1.0)]
    latency = dict(zip(shapes, (0.0073, 0.0110, 0.0090, 0.0140)))
    score = dict(zip(shapes, (0.40, 0.45, 0.50, 0.60)))
    memory = dict(zip(shapes, (int(1.3 * GiB), 2 * GiB, int(1.6 * GiB), 3 * GiB)))
    return score, latency, memory


def test_infeasible_budget_message():
    score, latency, _ = small_table()
    with pytest.raises(UserError) as e:
        search(score, latency, 0.005)
    assert str(e.value) == ("no shape fits 5.0 ms: the fastest is 19x0.5 at 7.3 ms "
                            "(try --budget 8ms or a faster flow)")
    assert search(score, latency, parse_time("8ms")).shape == Shape(19, 0.5)  # the hint works


def test_memory_budget():
    score, latency, memory = small_table()
    assert search(score, latency, 0.02).shape == Shape(24, 1.0)
    r = search(score, latency, 0.02, memory, parse_bytes("2GiB"))
    assert r.shape == Shape(24, 0.5) and Shape(24, 1.0) not in r.feasible
    assert r.memory_budget == 2 * GiB and Shape(24, 1.0) in r.pareto  # front ignores memory
    with pytest.raises(UserError) as e:
        search(score, latency, 0.02, memory, GiB)
    assert str(e.value) == ("no shape fits 1 GiB of memory: the smallest is 19x0.5 at 1.3 GiB "
                            "(try --memory 1.3GiB)")
    assert search(score, latency, 0.02, memory, parse_bytes("1.3GiB")).shape == Shape(19, 0.5)
    # Each budget alone is met by some shape, but no shape meets both.
    memory[Shape(19, 0.5)], memory[Shape(24, 0.5)] = int(1.5 * GiB), int(1.4 * GiB)
    with pytest.raises(UserError) as e:
        search(score, latency, 0.008, memory, int(1.4 * GiB))
    assert str(e.value) == (
        "no shape fits both 8.0 ms and 1.4 GiB of memory: within the memory the fastest is 24x0.5 "
        "at 9.0 ms, within the time the smallest is 19x0.5 at 1.5 GiB (try --budget 9ms or "
        "--memory 1.5GiB)")


def test_memory_budget_random():
    rng = np.random.default_rng(3)
    for _ in range(30):
        score, latency = make_tables(rng, score_noise=0.02, lat_noise=0.03)
        memory = {s: int((s.depth * s.width * 0.2 + rng.uniform(0, 0.3)) * GiB) for s in SPACE}
        budget, mem_budget = float(np.median(list(latency.values()))), int(np.median(list(memory.values())))
        expected = oracle(score, latency, budget, memory, mem_budget)
        if expected is None:
            with pytest.raises(UserError):
                search(score, latency, budget, memory, mem_budget)
        else:
            r = search(score, latency, budget, memory, mem_budget)
            assert r.shape == expected and memory[r.shape] <= mem_budget


def test_missing_shapes_ignored_and_empty_intersection():
    score, latency, _ = small_table()
    del latency[Shape(24, 1.0)]
    score[Shape(30, 1.0)] = 0.99  # no latency: never chosen
    r = search(score, latency, 0.02)
    assert r.shape == Shape(24, 0.5) and r.space_size == 3
    with pytest.raises(UserError, match="share no shape"):
        search({Shape(19, 0.5): 0.4}, {Shape(20, 0.5): 0.001}, 0.02)
    with pytest.raises(ValueError):
        search(score, latency, -1.0)


def test_pareto_front_hand_built():
    e, g, a, b, c, d, f = (Shape(19, 0.5), Shape(20, 0.5), Shape(21, 0.5), Shape(22, 0.5),
                           Shape(23, 0.5), Shape(24, 0.5), Shape(25, 0.5))
    points = {
        a: (0.010, 0.50),
        b: (0.012, 0.60),
        c: (0.012, 0.55),   # dominated by b (same latency, worse)
        d: (0.015, 0.60),   # dominated by b (same score, slower)
        e: (0.009, 0.40),
        g: (0.009, 0.40),   # exact duplicate of e: neither dominates, both stay
        f: (0.020, 0.70),
        Shape(26, 0.5): (0.030, 0.65),  # dominated by f
        Shape(27, 0.5): (float("nan"), 0.99),  # not a point
    }
    assert pareto_front(points) == [e, g, a, b, f]
    assert pareto_front({}) == []


def test_summary_rows_and_as_dict():
    score, latency, memory = small_table()
    r = search(score, latency, 0.01)
    rows = summary_rows(r, score, latency)
    assert [row["shape"] for row in rows] == ["19x0.5", "24x0.5", "24x1.0"]  # 19x1.0 is dominated
    assert [row["chosen"] for row in rows] == ["", "<- chosen", ""]
    assert [row["fits"] for row in rows] == ["yes", "yes", "no"]
    # With a memory budget the choice can be off the front; the table still shows it.
    r = search(score, latency, 0.012, memory, 2 * GiB)
    assert r.shape == Shape(24, 0.5)
    memory[Shape(24, 0.5)] = 3 * GiB
    r = search(score, latency, 0.012, memory, 2 * GiB)
    assert r.shape == Shape(19, 1.0) and r.shape not in r.pareto
    assert [row["shape"] for row in summary_rows(r, score, latency)] == \
        ["19x0.5", "24x0.5", "19x1.0", "24x1.0"]
    r = search(score, latency, 0.01)
    assert rows[1] == {"shape": "24x0.5", "latency": "9.0 ms", "score": "0.5", "fits": "yes",
                       "chosen": "<- chosen"}
    d = r.as_dict()
    assert d["shape"] == "24x0.5" and d["pareto"][0] == "19x0.5" and isinstance(d["evaluated"], int)
    assert isinstance(r, SearchResult)


# --- plot ----------------------------------------------------------------------------------------

def test_plot_pareto(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    score, latency = make_tables(rng, score_noise=0.01)
    budget = parse_time("28ms")  # cuts the cloud: some shapes fit, some do not
    r = search(score, latency, budget)
    assert 0 < len(r.feasible) < len(SPACE)
    out = plot_pareto(tmp_path / "plots" / "pareto.png", score, latency, budget, r.shape,
                      "host / pytorch / tpot", score_label="accuracy")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["pareto.png"]  # no temp file left
    again = plot_pareto(tmp_path / "again.png", score, latency, budget, r.shape,
                        "host / pytorch / tpot", score_label="accuracy")
    assert again.read_bytes() == data  # deterministic bytes
    assert b"matplotlib" not in data  # no version text
    plot_pareto(tmp_path / "none.png", score, latency, budget, None, "no choice")
    with pytest.raises(ValueError):
        plot_pareto(tmp_path / "bad.png", score, latency, budget, Shape(99, 1.0), "x")


def test_infeasible_hint_is_the_smallest_round_budget_that_fits():
    score = {Shape(19, 0.5): 0.4, Shape(20, 0.5): 0.5}
    for fastest, hint in ((0.007, "7ms"), (0.00085, "850us"), (1.23, "1.3s")):
        latency = {Shape(19, 0.5): fastest, Shape(20, 0.5): fastest * 2}
        with pytest.raises(UserError, match=f"try --budget {hint} or a faster flow"):
            search(score, latency, fastest / 2)
        assert search(score, latency, parse_time(hint)).shape == Shape(19, 0.5)
