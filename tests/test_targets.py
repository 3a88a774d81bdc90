"""The device registry: every TOML loads and validates, every number has a source, host detection
is sane and probes once per process, broken files fail with a UserError naming the key."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomllib

import targets
from amoeba_export.errors import UserError

REQUIRED_DEVICES = {"host", "jetson-orin", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb", "a5000", "rtx-4090",
                    "l4", "a100-80gb", "h100-sxm", "h200", "core-ultra-7-155h", "galaxy-s24-sd8g3",
                    "iphone-15-pro"}
HOST_FLOWS = ["pytorch", "onnx", "gguf", "vllm", "executorch", "openvino"]  # in targets.FLOWS order
TOMLS = sorted(p.stem for p in targets.HERE.glob("*.toml"))


def _numbers(table: dict, prefix: str = ""):
    """(dotted key, value, table) for every number, walked independently of targets.unsourced_numbers."""
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _numbers(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, v, table
        elif isinstance(v, list) and any(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            yield key, v, table


def test_required_devices_present():
    assert REQUIRED_DEVICES <= set(targets.names())
    assert set(TOMLS) == REQUIRED_DEVICES - {"host"}


@pytest.mark.parametrize("name", TOMLS)
def test_toml_loads_and_validates(name):
    t = targets.load_target(name)
    assert t["name"] == name
    assert t["kind"] in targets.KINDS
    assert t["arch"].startswith("sm_") or t["kind"] == "cpu"
    assert t["memory_bytes"] > 2**30 and t["bandwidth_gbs"] > 10
    assert t["peak_tflops"]["sparsity"] == "dense" and t["peak_tflops"]["fp16"] > (0.1 if t["kind"] == "cpu" else 1)
    assert t["flows"] and set(t["flows"]) <= set(targets.FLOWS)
    assert set(t["flow_defaults"]) == set(t["flows"])
    for flow, d in t["flow_defaults"].items():
        assert isinstance(d["dtype"], str) and d["dtype"]
        assert 0 < d["efficiency"] <= 1 and d["efficiency_source"].strip()
    assert targets.peak_tflops(t, "float16") == t["peak_tflops"]["fp16"]
    line = targets.describe(t)
    assert name in line and t["arch"] in line and "GB/s" in line and "\n" not in line


@pytest.mark.parametrize("name", TOMLS)
def test_every_number_has_a_source(name):
    with open(targets.HERE / f"{name}.toml", "rb") as f:
        data = tomllib.load(f)
    nums = list(_numbers(data))
    assert nums
    for key, value, table in nums:
        leaf = key.rsplit(".", 1)[-1]
        src = table.get(f"{leaf}_source") or table.get("source")
        assert isinstance(src, str) and src.strip(), f"{name}: {key} = {value} has no source"
    assert targets.unsourced_numbers(data) == []
    assert data["bandwidth"]["source"].strip()


def test_jetson_flows_and_cited_mlc_efficiency():
    orin = targets.load_target("jetson-orin")
    assert orin["arch"] == "sm_87" and orin["bandwidth_gbs"] == 204.8 and orin["memory"]["unified"]
    assert set(orin["flows"]) == {"pytorch", "onnx", "gguf", "trtllm", "mlc"}
    assert orin["flow_defaults"]["trtllm"]["version"] == "0.12.0-jetson"
    mlc = orin["flow_defaults"]["mlc"]
    assert mlc["dtype"] == "q4f16_1" and mlc["efficiency"] == 0.85 and "docs/devices.md §3" in mlc["efficiency_source"]
    assert "MAXN" in orin["power"]["modes"]


def test_host_detection_sane_and_cached():
    h = targets.load_target("host")
    assert h["name"] == "host" and h["kind"] == "cpu"
    assert h["cores"] >= 1 and h["memory_bytes"] > 0 and h["arch"]
    assert h["bandwidth_gbs"] > 0.1 and "detected on the running machine" in h["bandwidth"]["source"]
    assert h["peak_tflops"]["fp32"] > 0
    assert h["flows"] == HOST_FLOWS
    assert h["flow_defaults"]["pytorch"]["dtype"] == "float32" and h["flow_defaults"]["gguf"]["dtype"] in (
        "Q8_0",
        "F16",
    )
    assert h["source"] == "detected on the running machine"
    assert h["gpu"] is None or h["gpu"]["arch"].startswith("sm_")
    assert "host" in targets.describe(h)
    # probes run once per process: the same object comes back, and detect_host hands out copies
    assert targets.probe_bandwidth() is targets.probe_bandwidth()
    h2 = targets.detect_host()
    assert h2 == h and h2 is not h
    h2["flows"].append("mlc")
    assert targets.detect_host()["flows"] == HOST_FLOWS


def test_unknown_target_lists_names():
    with pytest.raises(UserError, match="unknown target 'nope'.*jetson-orin"):
        targets.load_target("nope")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A copy of the registry in tmp_path, which `targets` then reads from."""
    shutil.copy(targets.HERE / "a5000.toml", tmp_path / "dev.toml")
    monkeypatch.setattr(targets, "HERE", tmp_path)
    return tmp_path / "dev.toml"


def _edit(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("old, new, key", [
    ('value_gbs = 768\n', '', "bandwidth.value_gbs"),
    ('source = "NVIDIA RTX A5000 datasheet"\nconfidence = "datasheet"\n\n[peak_tflops]',
     'confidence = "datasheet"\n\n[peak_tflops]', "bandwidth.source"),
    ('arch = "sm_86"\n', '', "arch"),
    ('[flows.pytorch]\ndtype = "float16"\n', '[flows.pytorch]\n', "flows.pytorch.dtype"),
    ('[flows.onnx]', '[flows.tensorflow]', "flows.tensorflow"),
    ('efficiency = 0.6\n', 'efficiency = 1.6\n', "flows.gguf.efficiency"),
    ('efficiency = 0.6\nefficiency_source = "assumed"\n', 'efficiency = 0.6\n', "flows.gguf.efficiency_source"),
    ('board_w = 230\nsource = "NVIDIA RTX A5000 datasheet (total board power)"\n', 'board_w = 230\n', "power.board_w"),
    ('sparsity = "dense"', 'sparsity = "sparse"', "peak_tflops.sparsity"),
])
def test_broken_toml_names_file_and_key(registry, old, new, key):
    assert targets.load_target("dev")["name"] == "dev"
    _edit(registry, old, new)
    with pytest.raises(UserError) as e:
        targets.load_target("dev")
    assert str(registry) in str(e.value) and key in str(e.value)


def test_invalid_toml_syntax_is_a_user_error(registry):
    registry.write_text(registry.read_text() + "\n[broken\n")
    with pytest.raises(UserError, match="not valid TOML"):
        targets.load_target("dev")
    assert "dev" in targets.names()


def test_gpu_detection_through_torch_cuda(monkeypatch):
    """No GPU here: a stand-in torch module checks how detect_gpu reads torch.cuda."""
    import sys
    import types

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    cuda = types.SimpleNamespace(
        is_available=lambda: True, get_device_properties=lambda i: props, device_count=lambda: 1
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    gpu = targets.detect_gpu()
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "memory_bytes": 80 * 2**30, "count": 1,
                   "source": "detected on the running machine (torch.cuda, device 0)"}
    cuda.is_available = lambda: False
    assert targets.detect_gpu() is None
