"""A standard PEFT LoRA directory read into a plain `LoRA`, merged exactly before slicing.

The configuration is read with the peft library's own `LoraConfig`, so defaults and field names
are PEFT's. The weights come from `adapter_model.safetensors` (a pickled `.bin` is never loaded),
named as PEFT saves them: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r]. The scale is lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA,
with rank_pattern and alpha_pattern applied per module the way PEFT matches them.

Only an update that is exactly W + s·B A on the seven LLaMA projections is accepted. Anything else
changes the model in a way one merged weight cannot express, and is refused in one line: DoRA,
LoRA or trained biases, modules_to_save, trainable tokens, layer replication, aLoRA's
token-activated updates, QALoRA's pooled inputs, and inits that rewrite the base weights
(PiSSA, OLoRA, LoftQ, CorDA).
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from safetensors import safe_open

from .adapter import PROJECTIONS, LoRA, LoRADelta, check_factors
from .errors import UserError
from .io import safetensors_header

_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# Config fields whose effect a merged W + s·B A cannot express: (attribute, what it is).
_UNSUPPORTED = (
    ("use_dora", "DoRA (weight-decomposed LoRA)"),
    ("lora_bias", "LoRA biases (lora_bias)"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D weight layout)"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("trainable_token_indices", "trainable tokens"),
    ("layer_replication", "layer replication"),
    ("alora_invocation_tokens", "aLoRA (token-activated LoRA)"),
    ("use_qalora", "QALoRA (pooled LoRA inputs)"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("use_bdlora", "block-diagonal LoRA"),
)
_REWRITES_BASE = ("pissa", "olora", "loftq", "corda")


def _targeted(config, module: str) -> bool:
    def matches(spec) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, module) is not None
        return any(module == k or module.endswith("." + k) for k in spec)

    if config.target_modules is not None and not matches(config.target_modules):
        return False
    return not matches(getattr(config, "exclude_modules", None))


def _load_config(directory: Path):
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("reading a PEFT LoRA adapter needs the peft package: pip install peft") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig.from_pretrained(str(directory))
    except Exception as e:
        raise UserError(
            f"unreadable PEFT config {directory / 'adapter_config.json'}: {type(e).__name__}: {e}"
        ) from None


def read_peft_lora(directory: str | Path, info: dict) -> LoRA:
    """The LoRA of a PEFT adapter directory (`save_pretrained` output), checked against `info`."""
    directory = Path(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"{directory} holds a pickled adapter_model.bin, which is never loaded: save the adapter "
                            "with safetensors (save_pretrained(..., safe_serialization=True))")
        raise UserError(f"missing file {weights}")
    config = _load_config(directory)
    from peft.utils.other import get_pattern_key  # importable: _load_config checked peft

    where = directory / "adapter_config.json"
    for attr, what in _UNSUPPORTED:
        if getattr(config, attr, None):
            raise UserError(f"{where}: {what} cannot be merged into the dense weights; only plain LoRA is supported")
    if getattr(config, "bias", "none") != "none":
        raise UserError(
            f"{where}: bias={config.bias!r} trains base biases, which cannot be merged; only bias='none' is supported"
        )
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise UserError(
            f"{where}: init_lora_weights={init!r} rewrote the base weights during training, so the adapter "
            "does not apply to the original model; convert it with PEFT (path_initial_model_for_weight_conversion)"
        )

    factors: dict[tuple[int, str], dict[str, str]] = {}
    for name in safetensors_header(weights):
        if name == "__metadata__":
            continue
        m = _NAME.fullmatch(name)
        if m is None or m.group(3) not in PROJECTIONS or (m.group(2) == "self_attn") != (m.group(3) in PROJECTIONS[:4]):
            extra = (
                "modules_to_save weights" if "modules_to_save" in name else "not a LoRA factor of a LLaMA projection"
            )
            raise UserError(f"{weights}: tensor {name} is {extra}; only LoRA on q/k/v/o/gate/up/down can be merged")
        factors.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = name
    if not factors:
        raise UserError(f"{weights} holds no LoRA weights")

    deltas: dict[tuple[int, str], LoRADelta] = {}
    with safe_open(str(weights), framework="pt") as f:
        for (layer, proj), names in sorted(factors.items()):
            if set(names) != {"A", "B"}:
                have = next(iter(names.values()))
                raise UserError(f"{weights}: {have} has no matching lora_{'B' if 'A' in names else 'A'} tensor")
            A, B = f.get_tensor(names["A"]).float(), f.get_tensor(names["B"]).float()
            check_factors(info, layer, proj, A.shape, B.shape, (names["A"], names["B"]))
            module = names["A"].removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if not _targeted(config, module):
                raise UserError(f"{weights}: {names['A']} adapts {module}, which adapter_config.json does not target")
            r = A.shape[0]
            r_config = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
            if r != r_config:
                raise UserError(f"{weights}: {names['A']} has rank {r}, but adapter_config.json says r={r_config}")
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module), config.lora_alpha)
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            deltas[(layer, proj)] = LoRADelta(A, B, float(scale))
    meta = {"source": "peft", "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": bool(config.use_rslora),
            "targets": [p for p in PROJECTIONS if any(k[1] == p for k in deltas)]}
    return LoRA(deltas, meta)
