"""The TensorRT-LLM flow, checked without TensorRT-LLM (it cannot be installed here, docs/flow-internals.md §5.3).

The unified checkpoint is read back by its TensorRT-LLM names (qkv split by head counts, fc =
gate_proj, gate = up_proj) and run by the NumPy LLaMA forward; the HF directory beside it is loaded
by transformers as the stock class. Both are compared with the masked reference forward in fp32,
for every shape of a random strategy (legalize pads the per-layer ones exactly). Measured on the
tiny models (2 x 24 tokens, 12 shapes each): max |logit diff| 6.0e-7 / 4.8e-7 / 9.5e-7 for the
checkpoint, 0 for the HF directory (transformers runs the reference's own ops); SmolLM2-135M at
24x0.75 (slow): 1.03e-4 with every greedy token equal. build.sh is checked for its flags and run
against stand-in tools (a fake trtllm-build, nvidia-smi and quantize.py) to exercise its branches.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open

from amoeba_export.elastic import ElasticModel
from amoeba_export.errors import UserError
from amoeba_export.flows import FLOWS
from amoeba_export.flows.trtllm import writer as trtllm
from amoeba_export.io import safetensors_header, sha256_file
from amoeba_export.legalize import legalize
from amoeba_export.materialize import materialize
from amoeba_export.pipeline import VERIFY_TEXT
from amoeba_export.shapes import Shape
from profilers.workload import Workload
from targets import load_target

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
MODELS = {  # head_dim 32 is in TensorRT-LLM's kernel set (conftest's tiny models use 16)
    "gqa_tied": dict(hidden=64, heads=2, kv_heads=1, head_dim=32, ff=96, seed=5),
    "mha_qkv_bias_untied": dict(hidden=64, heads=2, kv_heads=2, head_dim=32, ff=96, tied=False, qkv_bias=True, seed=6),
    "gqa_llama3": dict(
        hidden=128, heads=4, kv_heads=2, head_dim=32, ff=160, tied=False, seed=7, rope_parameters=LLAMA3
    ),
}
WORKLOAD = Workload(batch=2, prompt_len=100, gen_len=28)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: tiny.make_tiny_model(tmp_path_factory.mktemp(k), **kw) for k, kw in MODELS.items()}


def elastic(model_dir) -> ElasticModel:
    return ElasticModel(model_dir, tiny.random_strategy(model_dir, seed=3))


N_TOKENS = 24  # > 16 positions: the llama3 scaling (original context 16) matters


def export(em, shape, out: Path, dtype=None, quant=None):
    dense, _ = legalize(materialize(em, shape, dtype), trtllm.CAPS, flow="trtllm", quant=quant)
    out.mkdir(parents=True)
    files = trtllm.emit(dense, out, em.dir, quant=quant).files
    return dense, files


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def ckpt(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / trtllm.CKPT / "config.json").read_text()), tensors(out / trtllm.CKPT / trtllm.RANK0)


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_matches_reference_for_every_shape(models, name, tmp_path):
    """The must-show figure: the unified checkpoint, read by TensorRT-LLM names, reproduces the
    masked reference for every shape (uniform ones and per-layer ones padded by legalize)."""
    em = elastic(models[name])
    ids = tiny.ids(N_TOKENS)
    worst, per_layer = 0.0, 0
    for shape in em.strategy.space:
        export(em, shape, tmp_path / str(shape))
        per_layer += not materialize(em, shape).uniform
        got = trtllm.load(tmp_path / str(shape))(ids)
        ref = em.logits(ids, shape)
        assert got.shape == ref.shape == (2, 24, tiny.VOCAB)
        diff = (got - ref).abs().max().item()
        tiny.record_parity("trtllm", name, materialize(em, shape).uniform, "float32", diff)
        assert diff < TOL, (shape, diff)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        worst = max(worst, diff)
    assert per_layer >= 6  # the narrower widths have per-layer sizes before legalize
    print(f"\ntrtllm checkpoint vs reference, {name}: {len(em.strategy.space)} shapes, max |logit diff| {worst:.2e}")


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_directory_is_the_stock_class_and_matches(models, name, tmp_path):
    from transformers import AutoModelForCausalLM

    em = elastic(models[name])
    ids = tiny.ids(N_TOKENS)
    worst = 0.0
    for shape in (em.strategy.space.largest, em.strategy.space.smallest):
        export(em, shape, tmp_path / str(shape))
        config = json.loads((tmp_path / str(shape) / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(shape), dtype=torch.float32).eval()
        assert type(model).__name__ == "LlamaForCausalLM"
        with torch.inference_mode():
            got = model(input_ids=ids, use_cache=False).logits
        diff = (got - em.logits(ids, shape)).abs().max().item()
        assert diff < TOL, (shape, diff)
        worst = max(worst, diff)
    print(f"\ntrtllm HF directory (transformers) vs reference, {name}: max |logit diff| {worst:.2e}")


# ---------------------------------------------------------------- structure

def test_config_and_tensor_layout(models, tmp_path):
    """Untied, q/k/v biases, per-layer shape padded: names, shapes, qkv order, the fc/gate swap."""
    em = elastic(models["mha_qkv_bias_untied"])
    dense, files = export(em, em.strategy.space.smallest, tmp_path / "p")
    assert files[-2:] == ["trtllm_checkpoint/config.json", "trtllm_checkpoint/rank0.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    cfg, t = ckpt(tmp_path / "p")
    s = dense.layers[0]
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "float32" and cfg["logits_dtype"] == "float32"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"], cfg["intermediate_size"]) == (
        s.n_heads, s.n_kv_heads, 32, s.n_ff)
    assert cfg["num_hidden_layers"] == len(dense.layers) == em.strategy.space.smallest.depth
    assert cfg["attn_bias"] is True and cfg["mlp_bias"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["hidden_act"] == "silu"
    assert cfg["rotary_base"] == 500000.0 and cfg["rotary_scaling"] is None
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert not cfg["use_parallel_embedding"] and cfg["embedding_sharding_dim"] == 0
    H, V, D, NH, NKV, F = 64, tiny.VOCAB, 32, s.n_heads, s.n_kv_heads, s.n_ff
    want = {"transformer.vocab_embedding.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for j in range(len(dense.layers)):
        p = f"transformer.layers.{j}."
        want.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "post_layernorm.weight": (H,),
                p + "attention.qkv.weight": ((NH + 2 * NKV) * D, H),
                p + "attention.qkv.bias": ((NH + 2 * NKV) * D,),
                p + "attention.dense.weight": (H, NH * D),
                p + "attention.dense.bias": (H,),
                p + "mlp.fc.weight": (F, H),
                p + "mlp.fc.bias": (F,),
                p + "mlp.gate.weight": (F, H),
                p + "mlp.gate.bias": (F,),
                p + "mlp.proj.weight": (H, F),
                p + "mlp.proj.bias": (H,),
            }
        )
    assert {k: tuple(v.shape) for k, v in t.items()} == want
    hf = tensors(tmp_path / "p" / "model.safetensors")
    for j in range(len(dense.layers)):
        p, h = f"transformer.layers.{j}.", f"model.layers.{j}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([hf[h + f"self_attn.{m}.{kind}"] for m in ("q_proj", "k_proj", "v_proj")])
            assert torch.equal(t[p + f"attention.qkv.{kind}"], qkv)
            for trt, src in (("attention.dense", "self_attn.o_proj"), ("mlp.fc", "mlp.gate_proj"),
                             ("mlp.gate", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")):
                assert t[p + f"{trt}.{kind}"].numpy().tobytes() == hf[h + f"{src}.{kind}"].numpy().tobytes(), (
                    trt,
                    kind,
                )
        # the base has no gate/up biases: mlp_bias (for the compensation on proj) needs explicit zeros
        assert not t[p + "mlp.fc.bias"].any() and not t[p + "mlp.gate.bias"].any()
    assert any(t[f"transformer.layers.{j}.mlp.proj.bias"].any() for j in range(len(dense.layers)))
    assert torch.equal(t["lm_head.weight"], hf["lm_head.weight"])
    assert not torch.equal(t["lm_head.weight"], t["transformer.vocab_embedding.weight"])


def test_tied_lm_head_and_zero_qkv_biases(models, tmp_path):
    em = elastic(models["gqa_tied"])
    export(em, em.strategy.space.largest, tmp_path / "full")  # full width: no bias at all
    cfg, t = ckpt(tmp_path / "full")
    assert cfg["tie_word_embeddings"] is True and not cfg["attn_bias"] and not cfg["mlp_bias"]
    assert not any(k.endswith(".bias") for k in t)
    assert torch.equal(t["lm_head.weight"], t["transformer.vocab_embedding.weight"])  # written although tied
    export(em, em.strategy.space.smallest, tmp_path / "narrow")  # compensation biases on dense and proj
    cfg, t = ckpt(tmp_path / "narrow")
    assert cfg["attn_bias"] and cfg["mlp_bias"] and cfg["num_key_value_heads"] == 1
    for j in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{j}."
        assert not t[p + "attention.qkv.bias"].any()  # zeros the attn_bias flag needs
    assert any(t[f"transformer.layers.{j}.attention.dense.bias"].any() for j in range(cfg["num_hidden_layers"]))


def test_llama3_rotary_scaling(models, tmp_path):
    """TensorRT-LLM's spelling, and it matters: without it the forward drifts past 16 positions."""
    em = elastic(models["gqa_llama3"])
    shape = em.strategy.space.smallest
    export(em, shape, tmp_path / "a")
    cfg, _ = ckpt(tmp_path / "a")
    assert cfg["rotary_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}
    assert cfg["rotary_base"] == 500000.0
    cfg["rotary_scaling"] = None
    (tmp_path / "a" / trtllm.CKPT / "config.json").write_text(json.dumps(cfg))
    ids = tiny.ids(N_TOKENS)
    assert (trtllm.load(tmp_path / "a")(ids) - em.logits(ids, shape)).abs().max().item() > 1e-3


def test_float16_and_quant_checkpoints_are_float16(models, tmp_path):
    em = elastic(models["mha_qkv_bias_untied"])
    shape = em.strategy.space.smallest
    ids = tiny.ids(N_TOKENS)
    ref = em.logits(ids, shape)
    export(em, shape, tmp_path / "f16", dtype="float16")
    export(em, shape, tmp_path / "awq", quant="int4_awq")  # float32 dense: the HF directory stays float32
    for out, hf_dtype in ((tmp_path / "f16", "float16"), (tmp_path / "awq", "float32")):
        cfg, _ = ckpt(out)
        header = safetensors_header(out / trtllm.CKPT / trtllm.RANK0)
        assert cfg["dtype"] == "float16" and {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
        assert json.loads((out / "config.json").read_text())["dtype"] == hf_dtype
        diff = (trtllm.load(out)(ids) - ref).abs().max().item()
        assert diff < 2e-2, (out.name, diff)  # float16 rounding of the weights only
    assert ckpt(tmp_path / "awq")[0]["intermediate_size"] % 64 == 0  # CAPS.align: AWQ groups need n_ff % 64


def test_deterministic_bytes(models, tmp_path):
    em = elastic(models["gqa_llama3"])
    shape = em.strategy.space.smallest
    files = export(em, shape, tmp_path / "a")[1]
    assert export(em, shape, tmp_path / "b")[1] == files
    for f in files:
        assert sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f), f


def test_refusals(models, tiny_gqa, tmp_path):
    em = elastic(tiny_gqa)  # head_dim 16: no TensorRT-LLM attention kernel, and it cannot be padded (RoPE)
    with pytest.raises(UserError, match="kernel set"):
        legalize(materialize(em, em.strategy.space.largest), trtllm.CAPS, flow="trtllm")
    em = elastic(models["gqa_llama3"])
    per_layer = materialize(em, em.strategy.space.smallest)
    assert not per_layer.uniform
    with pytest.raises(ValueError, match="same sizes"):
        trtllm.emit(per_layer, tmp_path, em.dir)
    dense, _ = legalize(per_layer, trtllm.CAPS, flow="trtllm")
    with pytest.raises(UserError, match="unknown trtllm quantisation"):
        trtllm.emit(dense, tmp_path, em.dir, quant="q4_k_m")


def test_load_errors_are_one_line(models, tmp_path):
    em = elastic(models["gqa_tied"])
    out = tmp_path / "x"
    export(em, em.strategy.space.largest, out)
    rank0 = out / trtllm.CKPT / trtllm.RANK0
    data = rank0.read_bytes()
    rank0.write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        trtllm.load(out)
    rank0.write_bytes(data)
    (out / trtllm.CKPT / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        trtllm.load(out)
    (out / trtllm.CKPT / "config.json").unlink()
    with pytest.raises(UserError, match="missing file"):
        trtllm.load(out)


# ---------------------------------------------------------------- build.sh and build()

@pytest.fixture(scope="module")
def artifact(models, tmp_path_factory):
    """One exported shape with o/down biases (mlp_bias), legalized for int4_awq (n_ff % 64 == 0)."""
    em = elastic(models["gqa_llama3"])
    out = tmp_path_factory.mktemp("artifact") / "a"
    dense, _ = export(em, em.strategy.space.smallest, out, quant="int4_awq")
    assert dense.layers[0].mlp_bias
    return out


def write_script(out: Path, target: str, quant=None, workload=WORKLOAD) -> str:
    assert trtllm.script(out, load_target(target), quant=quant, workload=workload) == ["build.sh"]
    assert os.access(out / "build.sh", os.X_OK)
    assert subprocess.run(["bash", "-n", str(out / "build.sh")], check=False).returncode == 0
    return (out / "build.sh").read_text()


@pytest.mark.parametrize("target, arch, cap", [("a5000", "sm_86", "8.6"), ("jetson-orin", "sm_87", "8.7")])
@pytest.mark.parametrize("quant", [None, "int4_awq"])
def test_build_script_contents(artifact, target, arch, cap, quant):
    text = write_script(artifact, target, quant)
    ckpt_dir = "trtllm_checkpoint" if quant is None else "trtllm_checkpoint_int4_awq"
    for flag in (
        f"--checkpoint_dir {ckpt_dir} --output_dir engine",
        "--gemm_plugin float16",
        "--gpt_attention_plugin float16",
        "--max_batch_size 2",
        "--max_input_len 100",
        "--max_seq_len 128",
        "--max_num_tokens 200",
        "--max_beam_width 1",
        "--kv_cache_type paged",
        "--remove_input_padding enable",
        "--context_fmha enable",
        "--workers 1",
    ):
        assert flag in text, flag
    assert "set -euo pipefail" in text and 'cd "$(dirname "$0")"' in text
    assert "nvidia-smi --query-gpu=compute_cap" in text and f'[[ $cap != "{cap}" ]]' in text and arch in text
    assert "trtllm-serve" in text and "run.py --engine_dir" in text
    assert ("--use_mmap" in text) == target.startswith("jetson")
    awq = ("quantization/quantize.py\" --model_dir . --dtype float16 --qformat int4_awq \\\n  --awq_block_size 128 "
           "--output_dir trtllm_checkpoint_int4_awq --calib_size")
    assert (awq in text) == (quant == "int4_awq")
    assert ("TRTLLM_EXAMPLES is not set" in text) == (quant is not None)


def test_build_script_sizes_and_refusals(artifact):
    text = write_script(artifact, "a5000", workload=Workload(batch=64, prompt_len=200, gen_len=50))
    assert "--max_num_tokens 8192" in text  # 64 x 200 capped at TensorRT-LLM's default
    text = write_script(artifact, "jetson-orin", workload=Workload(batch=16, prompt_len=200, gen_len=50))
    assert "--max_num_tokens 2048" in text and "large for a Jetson" in text
    text = write_script(artifact, "a5000", workload=Workload(batch=1, prompt_len=60, gen_len=4))
    assert "--max_num_tokens 60" in text and "--max_seq_len 64" in text
    # AWQ groups: 128 in-features where every in-feature count allows, else 64 (SmolLM2: hidden 576)
    sizes = {"hidden_size": 576, "num_attention_heads": 9, "head_size": 64}
    assert trtllm.awq_block({**sizes, "intermediate_size": 1536}) == 64
    assert trtllm.awq_block({**sizes, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 2816}) == 128
    with pytest.raises(UserError, match="int4_awq groups 64 or 128"):
        trtllm.awq_block({**sizes, "intermediate_size": 1100})
    with pytest.raises(UserError, match="drops this model's MLP"):
        trtllm.script(artifact, load_target("a5000"), quant="int8_wo", workload=WORKLOAD)
    with pytest.raises(UserError, match="max_position_embeddings"):
        trtllm.script(artifact, load_target("a5000"), workload=Workload(prompt_len=250, gen_len=64))


def test_weight_only_script_without_mlp_bias(models, tmp_path):
    em = elastic(models["gqa_tied"])
    export(em, em.strategy.space.largest, tmp_path / "w")  # full width: no bias
    text = write_script(tmp_path / "w", "a5000", "int8_wo")
    assert (
        "--use_weight_only --weight_only_precision int8" in text
        and "--checkpoint_dir trtllm_checkpoint_int8_wo" in text
    )
    assert "--weight_only_precision int4" in write_script(tmp_path / "w", "a5000", "int4_wo")


def run_script(out: Path, tools: dict[str, str] | None = None, **env) -> subprocess.CompletedProcess:
    """bash build.sh in a bare environment; `tools`: stand-in executables put first on PATH."""
    path = "/usr/bin:/bin"
    if tools:
        bin_dir = out.parent / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        for name, body in tools.items():
            (bin_dir / name).write_text("#!/bin/sh\n" + body)
            (bin_dir / name).chmod(0o755)
        path = f"{bin_dir}:{path}"
    return subprocess.run(["env", "-i", f"PATH={path}", *(f"{k}={v}" for k, v in env.items()), "bash", "build.sh"],
                          cwd=out, capture_output=True, text=True, check=False)


FAKE_BUILD = """if [ "$1" = --help ]; then echo "usage: --kv_cache_type {continuous,paged}"; exit 0; fi
echo "$@" > trtllm-build.args; mkdir -p engine; echo '{}' > engine/config.json; : > engine/rank0.engine
"""


def test_build_script_without_toolchain_fails_in_one_line(artifact):
    write_script(artifact, "a5000")
    r = run_script(artifact)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("build.sh: no TensorRT-LLM here"), r.stderr


def test_build_script_pytorch_backend(artifact, tmp_path):
    """No trtllm-build, but TensorRT-LLM 1.x installed: the HF directory is served as it is."""
    dist = tmp_path / "site" / "tensorrt_llm-1.2.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: 1.2.1\n")
    write_script(artifact, "a5000")
    r = run_script(artifact, PYTHON=sys.executable, PYTHONPATH=tmp_path / "site")
    assert r.returncode == 0, r.stderr
    assert "TensorRT-LLM 1.2.1" in r.stdout and f"trtllm-serve {artifact}" in r.stdout
    dist.rename(dist.with_name("tensorrt_llm-0.12.0.dist-info"))  # Jetson's 0.12: trtllm-build missing from PATH
    (dist.with_name("tensorrt_llm-0.12.0.dist-info") / "METADATA").write_text("Name: tensorrt_llm\nVersion: 0.12.0\n")
    r = run_script(artifact, PYTHON=sys.executable, PYTHONPATH=tmp_path / "site")
    assert r.returncode == 1 and "TensorRT-LLM 0.12.0 is installed but trtllm-build is not on PATH" in r.stderr


def test_build_script_runs_trtllm_build_and_checks_arch(artifact):
    write_script(artifact, "a5000")
    r = run_script(artifact, {"trtllm-build": FAKE_BUILD, "nvidia-smi": "echo 8.6\n"}, PYTHON=sys.executable)
    assert r.returncode == 0, r.stderr
    args = (artifact / "trtllm-build.args").read_text()
    assert "--checkpoint_dir trtllm_checkpoint --output_dir engine" in args and "--kv_cache_type paged" in args
    assert f"run: {sys.executable}" in r.stdout and "--engine_dir" in r.stdout
    (artifact / "trtllm-build.args").unlink()
    write_script(artifact, "jetson-orin")  # an engine for sm_87 refused on an sm_86 GPU, before building
    r = run_script(artifact, {"trtllm-build": FAKE_BUILD, "nvidia-smi": "echo 8.6\n"}, PYTHON=sys.executable)
    assert r.returncode == 1 and not (artifact / "trtllm-build.args").exists()
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "sm_86" in r.stderr and "(sm_87)" in r.stderr
    # 0.12's trtllm-build has no --kv_cache_type
    old = FAKE_BUILD.replace("--kv_cache_type {continuous,paged}", "--paged_kv_cache")
    r = run_script(artifact, {"trtllm-build": old, "nvidia-smi": "echo 8.7\n"}, PYTHON=sys.executable)
    assert r.returncode == 0, r.stderr
    assert "--paged_kv_cache enable" in (artifact / "trtllm-build.args").read_text() and "--use_mmap" in r.stdout
    (artifact / "trtllm-build.args").unlink()


def test_build_script_int4_awq_checks_the_quantiser(artifact, tmp_path):
    """quantize.py runs with TRTLLM_EXAMPLES; a quantised checkpoint that lost mlp_bias stops the build."""
    write_script(artifact, "a5000", "int4_awq")
    tools = {"trtllm-build": FAKE_BUILD, "nvidia-smi": "echo 8.6\n"}
    r = run_script(artifact, tools, PYTHON=sys.executable)
    assert r.returncode == 1 and "TRTLLM_EXAMPLES is not set" in r.stderr
    quantize = tmp_path / "examples" / "quantization" / "quantize.py"
    quantize.parent.mkdir(parents=True)
    for drop, ok in ((False, True), (True, False)):
        quantize.write_text(f"""import json, sys, pathlib
out = pathlib.Path(sys.argv[sys.argv.index("--output_dir") + 1]); out.mkdir(exist_ok=True)
cfg = json.load(open("trtllm_checkpoint/config.json"))
if {drop}: cfg.pop("mlp_bias")
(out / "config.json").write_text(json.dumps(cfg)); (out / "args").write_text(" ".join(sys.argv[1:]))
""")
        r = run_script(artifact, tools, PYTHON=sys.executable, TRTLLM_EXAMPLES=tmp_path / "examples", CALIB_SIZE=16)
        assert (r.returncode == 0) == ok, r.stderr
        assert "--calib_size 16" in (artifact / "trtllm_checkpoint_int4_awq" / "args").read_text()
        if ok:
            assert "--checkpoint_dir trtllm_checkpoint_int4_awq" in (artifact / "trtllm-build.args").read_text()
            (artifact / "trtllm-build.args").unlink()
        else:
            assert "lost part of this model (mlp_bias False (ours True))" in r.stderr
            assert not (artifact / "trtllm-build.args").exists()


def test_build_skips_without_trtllm_build_and_runs_it_with(artifact, monkeypatch):
    target = load_target("a5000")
    write_script(artifact, "a5000")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    rec = trtllm.build(artifact, target)
    assert rec["built"] == [] and rec["script"] == "build.sh"
    assert rec["skipped"] == "trtllm-build is not on PATH here: run `bash build.sh` on the a5000"
    bin_dir = artifact.parent / "fakebin2"
    bin_dir.mkdir()
    for name, body in (("trtllm-build", FAKE_BUILD), ("nvidia-smi", "echo 8.6\n")):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    rec = trtllm.build(artifact, target)
    assert rec["returncode"] == 0 and rec["built"] == ["engine/config.json", "engine/rank0.engine"], rec
    assert rec["toolchain"]["trtllm-build"] == str(bin_dir / "trtllm-build")


def test_compile_for_jetson_writes_the_script_and_verifies(models, tmp_path):
    """The pipeline end to end: the Jetson target's default int4_awq, built on the device."""
    from amoeba_export.pipeline import compile_shape

    em = elastic(models["gqa_llama3"])
    res = compile_shape(em, em.strategy.space.smallest, FLOWS["trtllm"], load_target("jetson-orin"), tmp_path / "j")
    m = res.manifest
    assert m["dtype"] == "int4_awq" and m["emitted"][-3:] == ["trtllm_checkpoint/config.json",
                                                               "trtllm_checkpoint/rank0.safetensors", "build.sh"]
    assert m["engine"]["built"] == [] and "run `bash build.sh` on the jetson-orin" in m["engine"]["skipped"]
    assert m["parity"]["max_abs_logit_diff"] < m["parity"]["tolerance"] == trtllm.TOLERANCE["int4_awq"]
    assert "--qformat int4_awq" in (tmp_path / "j" / "build.sh").read_text()


# ---------------------------------------------------------------- the real default model (slow)

@pytest.mark.slow
def test_real_model_per_layer_shape(default_elastic, tmp_path):
    """SmolLM2-135M at 24x0.75 (per-layer, padded by legalize; o/down biases), float32. Measured:
    max |logit diff| 1.03e-4, every greedy token equal. Tolerance trtllm.TOLERANCE["float32"] = 1e-3:
    the NumPy forward sums in another order than torch, over logits spanning tens of units."""
    em = default_elastic
    shape = em.strategy.resolve(Shape.parse("24x0.75"))
    dense, report = legalize(materialize(em, shape, "float32"), trtllm.CAPS, flow="trtllm")
    assert dense.layers[0].mlp_bias and report.padded["zero_channels"] > 0
    trtllm.emit(dense, tmp_path, em.dir)
    ids = torch.tensor([em.tokenizer()(VERIFY_TEXT, add_special_tokens=False)["input_ids"][:24]])  # verify's prompt
    got = trtllm.load(tmp_path)(ids)
    ref = em.logits(ids, shape).float()
    diff = (got - ref).abs().max().item()
    tiny.record_parity("trtllm", "SmolLM2-135M 24x0.75", materialize(em, shape).uniform, "float32", diff)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\nreal model {shape} ({ids.shape[1]} tokens, logits in [{ref.min():.1f}, {ref.max():.1f}]): "
          f"max |logit diff| {diff:.2e}, greedy agreement {agree:.3f}")
    assert diff < trtllm.TOLERANCE["float32"] == 1e-3 and agree == 1.0
