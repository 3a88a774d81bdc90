"""Import of the upstream AmoebaLLM `dp_selection_strategy.npy` (amoeba_export.upstream).

The test writes synthetic files in the exact upstream layout with np.save(allow_pickle=True): the
test is the trusted writer; the code under test must never unpickle anything but numpy objects.
"""
from __future__ import annotations

import ast
import builtins
import functools
import os
import pickle
import pickletools
import subprocess
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from amoeba_export import upstream
from amoeba_export.errors import UserError
from amoeba_export.strategy import Strategy
from amoeba_export.upstream import import_dp_strategy, restricted_load_npy

PREFIX = "base_model.model.model.layers"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def make_model(n_kv: int = 4) -> dict:
    return {
        "name": f"tiny-{'mha' if n_kv == 4 else 'gqa'}",
        "fingerprint": "0" * 16,
        "n_layers": 6,
        "hidden_size": 32,
        "n_heads": 4,
        "n_kv_heads": n_kv,
        "head_dim": 8,
        "n_ff": 48,
    }


def make_upstream(model: dict, ratios=(1.0, 0.875, 0.75), seed: int = 0, prefix: str = PREFIX):
    """An upstream dict plus what it should import as: (doc, depths, widths{w: (heads, channels, ob, db)})."""
    rng = np.random.default_rng(seed)
    L, hd, nq, nkv, nff, h = (
        model[k] for k in ("n_layers", "head_dim", "n_heads", "n_kv_heads", "n_ff", "hidden_size")
    )
    strategy, depths = {}, {L: list(range(L))}
    for m in (1, 2, 3):
        drop = sorted(rng.choice(L - 1, size=m, replace=False).tolist())  # the last layer always stays
        mask = np.ones(L)
        mask[drop] = 0.0
        strategy[m] = mask
        depths[L - m] = [i for i in range(L) if i not in drop]
    width_mask = {f"{prefix}.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}": None for i in range(L) for p in ATTN + MLP}
    bias = dict(width_mask)
    expected = {}
    for r in ratios:
        per_layer = []
        for i in range(L):
            if (
                r == 1.0
            ):  # FLAP at ratio 1 drops exactly one unit model-wide (docs/amoeba-algorithm.md §3): head 2 of layer 1
                heads = np.ones(nq, bool)
                if i == 1:
                    heads[2] = False
                channels = np.ones(nff, bool)
            else:
                heads = rng.random(nq) < r
                channels = rng.random(nff) < r
            per_layer.append(
                (heads, channels, rng.standard_normal(h).astype(np.float32), rng.standard_normal(h).astype(np.float32))
            )
        expected[r] = per_layer
    for i in range(L):
        for p in ATTN + MLP:
            width_mask[f"{prefix}.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}"] = (
                {} if p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") else None
            )
            bias[f"{prefix}.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}"] = (
                {} if p in ("o_proj", "down_proj") else None
            )
        for r in ratios:
            heads, channels, ob, db = expected[r][i]
            q = np.repeat(heads, hd)
            kv = q if nkv == nq else np.repeat(heads.reshape(nkv, -1).any(axis=1), hd)
            width_mask[f"{prefix}.{i}.self_attn.q_proj"][r] = q
            width_mask[f"{prefix}.{i}.self_attn.k_proj"][r] = kv.copy()
            width_mask[f"{prefix}.{i}.self_attn.v_proj"][r] = kv.copy()
            width_mask[f"{prefix}.{i}.mlp.gate_proj"][r] = channels
            width_mask[f"{prefix}.{i}.mlp.up_proj"][r] = channels.copy()
            bias[f"{prefix}.{i}.self_attn.o_proj"][r] = ob
            bias[f"{prefix}.{i}.mlp.down_proj"][r] = db
    metric = {m: np.float64(0.4 + 0.01 * m) for m in strategy}
    doc = {"strategy": strategy, "metric": metric, "width_mask": width_mask, "bias": bias}
    return doc, depths, expected


def save_upstream(path: Path, doc) -> Path:
    np.save(path, np.array(doc, dtype=object), allow_pickle=True)
    return path


def assert_matches(s: Strategy, depths, expected):
    assert s.depths == depths
    assert set(s.widths) == set(expected)
    for w, per_layer in expected.items():
        for lw, (heads, channels, ob, db) in zip(s.widths[w], per_layer):
            np.testing.assert_array_equal(lw.q_heads, heads)
            np.testing.assert_array_equal(lw.channels, channels)
            np.testing.assert_array_equal(lw.o_bias, ob)
            np.testing.assert_array_equal(lw.down_bias, db)
            assert lw.q_heads.dtype == bool and lw.channels.dtype == bool
            assert lw.o_bias.dtype == np.float32 and lw.down_bias.dtype == np.float32


# --------------------------------------------------------------------------- round trip


def test_round_trip_mha(tmp_path):
    model = make_model()
    doc, depths, expected = make_upstream(model)
    path = save_upstream(tmp_path / "dp_selection_strategy.npy", doc)
    s = import_dp_strategy(path, model)
    assert_matches(s, depths, expected)
    assert s.model == model
    # w=1 keeps the stored mask exactly: layer 1 lost head 2
    assert not s.widths[1.0][1].q_heads[2] and s.widths[1.0][1].q_heads.sum() == 3
    assert s.meta["source"] == "upstream AmoebaLLM dp_selection_strategy.npy"
    assert s.meta["path"] == str(path)
    assert s.meta["metric"] == {str(m): pytest.approx(0.4 + 0.01 * m) for m in (1, 2, 3)}
    assert s.meta["width_keys"] == [1.0, 0.875, 0.75]
    assert sorted(s.depths) == [3, 4, 5, 6] and s.depths[6] == list(range(6))

    s.save(tmp_path / "out")
    back = Strategy.load(tmp_path / "out")
    assert_matches(back, depths, expected)
    assert back.model == model and back.meta == s.meta


def test_float_keys_snap_to_width_choice(tmp_path):
    model = make_model()
    doc, depths, expected = make_upstream(model, ratios=(1.0, 0.875000001, 0.6))
    s = import_dp_strategy(save_upstream(tmp_path / "s.npy", doc), model)
    assert set(s.widths) == {1.0, 0.875, 0.6}  # 0.6 is not near a choice: kept as is
    assert 0.875 in s.widths and 0.875000001 not in s.widths
    assert_matches(s, depths, {1.0: expected[1.0], 0.875: expected[0.875000001], 0.6: expected[0.6]})
    assert s.meta["width_keys"] == [1.0, 0.875000001, 0.6]
    custom = import_dp_strategy(tmp_path / "s.npy", model, width_choice=[1.0, 0.6000000001])
    assert set(custom.widths) == {1.0, 0.875000001, 0.6000000001}


def test_gqa_uses_q_mask(tmp_path):
    model = make_model(n_kv=2)
    doc, depths, expected = make_upstream(model)
    # k/v masks of a GQA model are not the source of truth: scramble them, q still decides
    for name, entry in doc["width_mask"].items():
        if name.endswith(("k_proj", "v_proj")):
            for r in entry:
                entry[r] = np.ones_like(entry[r])
    s = import_dp_strategy(save_upstream(tmp_path / "g.npy", doc), model)
    assert_matches(s, depths, expected)
    for w, per_layer in s.widths.items():
        for lw, (heads, *_rest) in zip(per_layer, expected[w]):
            np.testing.assert_array_equal(lw.kv_heads(2), heads.reshape(2, 2).any(axis=1))


def test_unprefixed_keys_and_depth_only(tmp_path):
    model = make_model()
    doc, depths, expected = make_upstream(model, prefix="model.layers")
    assert_matches(import_dp_strategy(save_upstream(tmp_path / "a.npy", doc), model), depths, expected)
    only = {"strategy": doc["strategy"], "metric": doc["metric"]}  # the shape of final_strategy.npy
    s = import_dp_strategy(save_upstream(tmp_path / "b.npy", only), model)
    assert s.depths == depths and list(s.widths) == [1.0]
    assert all(lw.q_heads.all() and lw.channels.all() and not lw.o_bias.any() for lw in s.widths[1.0])


def test_missing_bias_is_zero(tmp_path):
    model = make_model()
    doc, _, expected = make_upstream(model)
    doc["bias"] = {k: None for k in doc["bias"]}
    s = import_dp_strategy(save_upstream(tmp_path / "s.npy", doc), model)
    assert all(not lw.o_bias.any() and not lw.down_bias.any() for lws in s.widths.values() for lw in lws)


def test_numpy1_pickle_names(tmp_path):
    """Files written by numpy 1.x reference numpy.core.multiarray (protocol 3)."""
    model = make_model()
    doc, depths, expected = make_upstream(model)
    payload = pickle.dumps(np.array(doc, dtype=object), protocol=3).replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in payload
    path = tmp_path / "old.npy"
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(payload)
    assert_matches(import_dp_strategy(path, model), depths, expected)


def test_real_np_save_uses_only_admitted_globals(tmp_path):
    """Record (with a trusted, permissive unpickler) which globals np.save's pickle references."""
    model = make_model()
    doc, _, _ = make_upstream(model)
    doc["scalars"] = [np.int64(3), np.bool_(True), np.float32(1.5), np.str_("x"), (1, 2), None, 2.5, 7]
    path = save_upstream(tmp_path / "s.npy", doc)
    referenced = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            referenced.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as f:
        npy_format.read_magic(f)
        npy_format.read_array_header_1_0(f)
        data = f.read()
        Recorder(__import__("io").BytesIO(data)).load()
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(data))
    assert referenced and referenced <= set(upstream.ALLOWED_GLOBALS)
    assert restricted_load_npy(path)["scalars"][:3] == [3, True, 1.5]


def test_plain_array_loads(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(restricted_load_npy(tmp_path / "a.npy"), a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    np.testing.assert_array_equal(restricted_load_npy(tmp_path / "f.npy"), a)


# --------------------------------------------------------------------------- hostile files


class Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(target: Path):
    cmd = f"echo pwned > {target}"
    return {
        "os.system": Evil(os.system, cmd),
        "builtins.eval": Evil(builtins.eval, f"__import__('os').system({cmd!r})"),
        "builtins.exec": Evil(builtins.exec, f"import os; os.system({cmd!r})"),
        "subprocess.call": Evil(subprocess.call, cmd, None, None, None, None, None, None, None, True),
        "functools.partial": Evil(functools.partial, os.system, cmd),
    }


@pytest.mark.parametrize(
    "kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "functools.partial"]
)
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_refused(tmp_path, kind, nested):
    target = tmp_path / "pwned"
    payload = _evil_payloads(target)[kind]
    if nested:  # hidden deep inside an otherwise valid upstream dict
        doc, _, _ = make_upstream(make_model())
        doc["metric"][2] = payload
    else:
        doc = payload
    path = tmp_path / "evil.npy"
    np.save(path, np.array(doc, dtype=object), allow_pickle=True)
    with pytest.raises(
        UserError, match=r"refusing to load .*evil\.npy: it contains a pickled .*, which is not a numpy array"
    ):
        restricted_load_npy(path)
    with pytest.raises(UserError, match="refusing to load"):
        import_dp_strategy(path, make_model())
    assert not target.exists()


def test_refusal_message_names_the_global(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array(Evil(builtins.eval, "1+1"), dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as e:
        restricted_load_npy(path)
    assert str(e.value) == (
        f"refusing to load {path}: it contains a pickled builtins.eval, "
        "which is not a numpy array, dict, list or scalar"
    )


def test_truncated_and_foreign_files(tmp_path):
    model = make_model()
    doc, _, _ = make_upstream(model)
    good = save_upstream(tmp_path / "good.npy", doc).read_bytes()
    for n in (3, 20, len(good) // 2, len(good) - 1):
        (tmp_path / "cut.npy").write_bytes(good[:n])
        with pytest.raises(UserError):
            import_dp_strategy(tmp_path / "cut.npy", model)
    (tmp_path / "text.npy").write_text("this is not a numpy file\n")
    with pytest.raises(UserError, match="not a .npy file"):
        restricted_load_npy(tmp_path / "text.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(UserError):
        restricted_load_npy(tmp_path / "empty.npy")
    with pytest.raises(UserError, match="missing file"):
        restricted_load_npy(tmp_path / "absent.npy")
    np.save(tmp_path / "arr.npy", np.arange(100, dtype=np.int64))
    (tmp_path / "arr_cut.npy").write_bytes((tmp_path / "arr.npy").read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated"):
        restricted_load_npy(tmp_path / "arr_cut.npy")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(UserError, match="not an upstream AmoebaLLM strategy"):
        import_dp_strategy(tmp_path / "plain.npy", model)


def test_source_never_calls_np_load():
    tree = ast.parse(Path(upstream.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            assert not any(k.arg == "allow_pickle" for k in node.keywords)
            assert not (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and ast.unparse(node.func.value) in ("np", "numpy")
            )


# --------------------------------------------------------------------------- bad content


def _q(doc, i, r):
    return doc["width_mask"][f"{PREFIX}.{i}.self_attn.q_proj"][r]


def _expect_error(tmp_path, doc, model, match):
    path = save_upstream(tmp_path / "bad.npy", doc)
    with pytest.raises(UserError, match=match):
        import_dp_strategy(path, model)


def test_partial_head_refused(tmp_path):
    model = make_model()
    doc, _, _ = make_upstream(model)
    q = _q(doc, 3, 0.75)
    q[:] = True
    q[8 + 3] = False  # one dim of head 1
    _expect_error(tmp_path, doc, model, r"layer 3 at width 0\.75 keeps only part of head\(s\) 1")


def test_depth_mask_with_wrong_count(tmp_path):
    model = make_model()
    doc, _, _ = make_upstream(model)
    doc["strategy"][2] = np.array([1, 1, 1, 0, 1, 1], float)  # removes 1 layer, claims 2
    _expect_error(tmp_path, doc, model, r"depth 4.* keeps 5 layers, expected 4")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["strategy"].__setitem__(1, np.ones(7)), r"has 7 entries but the model has 6 layers"),
        (lambda d: d["strategy"].__setitem__(1, np.array([1, 1, 2, 1, 1, 0.0])), r"only 0/1 values"),
        (lambda d: d["strategy"].__setitem__(6, np.zeros(6)), r"removes 6 layers"),
        (
            lambda d: d["width_mask"][f"{PREFIX}.2.mlp.gate_proj"].__setitem__(0.75, np.ones(40, bool)),
            r"gate_proj mask of layer 2 .*expected \(48,\)",
        ),
        (
            lambda d: d["width_mask"][f"{PREFIX}.2.mlp.up_proj"][0.75].__setitem__(slice(None), False),
            r"up_proj mask of layer 2 .*differs",
        ),
        (
            lambda d: d["width_mask"][f"{PREFIX}.0.self_attn.k_proj"][1.0].__setitem__(slice(0, 8), False),
            r"k_proj mask of layer 0 .*differs",
        ),
        (
            lambda d: d["width_mask"][f"{PREFIX}.4.self_attn.q_proj"].pop(0.875),
            r"width 0\.875 has a q_proj mask for some layers but not for layers 4",
        ),
        (
            lambda d: d["bias"][f"{PREFIX}.5.mlp.down_proj"].pop(0.75),
            r"width 0\.75 has a down_proj bias for some layers but not for layers 5",
        ),
        (
            lambda d: d["bias"][f"{PREFIX}.5.self_attn.o_proj"].__setitem__(0.75, np.zeros(31)),
            r"o_proj bias of layer 5 .*expected \(32,\)",
        ),
        (
            lambda d: d["width_mask"].__setitem__(f"{PREFIX}.6.mlp.gate_proj", {1.0: np.ones(48, bool)}),
            r"names layer 6",
        ),
        (lambda d: d.pop("strategy"), r"not an upstream AmoebaLLM strategy"),
    ],
)
def test_shape_and_consistency_errors(tmp_path, mutate, match):
    model = make_model()
    doc, _, _ = make_upstream(model)
    mutate(doc)
    _expect_error(tmp_path, doc, model, match)


def test_wrong_model(tmp_path):
    doc, _, _ = make_upstream(make_model())
    path = save_upstream(tmp_path / "s.npy", doc)
    other = dict(make_model(), n_layers=8)
    with pytest.raises(UserError, match="model has 8 layers"):
        import_dp_strategy(path, other)
    wide = dict(make_model(), head_dim=16)
    with pytest.raises(UserError, match=r"q_proj mask of layer 0 .*expected \(64,\)"):
        import_dp_strategy(path, wide)
