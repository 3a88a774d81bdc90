"""The roofline estimator against a published measurement, and its monotonicity."""
from types import SimpleNamespace

import pytest

from amoeba_export.shared_types import LayerSpec
from profilers.roofline import estimate
from profilers.workload import Workload
from targets import load_target


def llama2_7b(layers=32, heads=32, ff=11008):
    spec = LayerSpec(heads, heads, 128, ff, False, False)
    return SimpleNamespace(hidden_size=4096, vocab_size=32000, layers=[spec] * layers)


def test_mlc_on_agx_orin_matches_the_published_decode_speed():
    """docs/devices.md §3: MLC q4f16_1 Llama-2-7B decodes at 46.9 tok/s on AGX Orin (input 16, output
    128). The estimate uses the target file's 0.85 efficiency, itself derived from that figure, so
    this checks the byte count (3.72 GB/token) and the units, not the efficiency."""
    tpot, detail = estimate(llama2_7b(), load_target("jetson-orin"), "mlc", Workload(1, 16, 128, "tpot"))
    assert tpot == pytest.approx(1 / 46.9, rel=0.03)
    assert detail["tpot_bound"] == "memory" and detail["source"] == "estimated"
    assert detail["tpot_bytes"] == pytest.approx(3.72e9, rel=0.02)


def test_estimates_shrink_with_the_shape_and_grow_with_the_workload():
    orin = load_target("jetson-orin-nano-8gb")
    full, _ = estimate(llama2_7b(), orin, "mlc", Workload())
    shallow, _ = estimate(llama2_7b(layers=20), orin, "mlc", Workload())
    narrow, _ = estimate(llama2_7b(ff=8192), orin, "mlc", Workload())
    assert shallow < narrow < full
    short, _ = estimate(llama2_7b(), orin, "mlc", Workload(1, 128, 64, "ttft"))
    long, _ = estimate(llama2_7b(), orin, "mlc", Workload(1, 1024, 64, "ttft"))
    assert long > 7 * short  # prefill is compute-bound: ~linear in prompt length
    e2e, d = estimate(llama2_7b(), orin, "mlc", Workload(1, 128, 64, "e2e"))
    assert e2e == pytest.approx(d["seconds"]["ttft"] + 63 * d["seconds"]["tpot"])


def test_unknown_flow_on_target_is_a_user_error():
    from amoeba_export.errors import UserError

    with pytest.raises(UserError, match="not available"):
        estimate(llama2_7b(), load_target("jetson-orin"), "coreml", Workload())
