"""SMOL: AmoebaLLM's shape-aware mixture of LoRAs (docs/amoeba-algorithm.md §5-§6) as an `Adapter`.

Every adapted projection holds E LoRA experts, A_i [r, in] and B_i [out, r]. One global router sees
only the shape: x = concat(S_d, onehot(w)), where S_d is the kept-layer mask over the base model's
layers for depth d and the one-hot runs over the adapter's own `width_choice` list, in its trained
order. The router is affine, z = W2(W1 x + b1) + b2; training adds ε ⊙ softplus(Wn x + bn); top-k
of z, softmax over the selected ones only. The experts' *weights* are mixed,
A_mix = Σ g_i A_i and B_mix = Σ g_i B_i, so ΔW = s·B_mix A_mix has the cross-expert terms
g_i g_j B_i A_j: it is not Σ g_i s B_i A_i.

The gate depends on the shape only, never on the tokens, so for one shape it is a constant and
merging it is exact. Export uses the noise-free gate and records it in the manifest, with the
top-k margin and the noise scale (docs/amoeba-algorithm.md §6: a margin small against softplus(noise) marks
a shape where the repo's noisy evaluation could have picked other experts).

Binding: a shape names a depth, and only the strategy knows which layers that depth keeps. The
adapter learns this through `bind(strategy)`, which ElasticModel calls whenever an adapter and a
strategy meet. `gate_for(layers, width)` takes the kept layers explicitly instead.

Storage: `adapter.json` (config, width_choice in one-hot order, expert names) and
`adapter.safetensors` (router.*, layers.{i}.{proj}.lora_A [E, r, in] and lora_B [E, out, r], all fp32),
byte-deterministic. Expert tensors are read one projection at a time, as the base weights are, so a
7B checkpoint (about 3.2 GB of experts) is never in memory all at once.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .adapter import PROJECTIONS, Adapter, LoRADelta, check_factors, projection_shape
from .errors import UserError
from .io import read_json, safetensors_header, write_json, write_safetensors_stream
from .shapes import WIDTH_TOLERANCE, Shape, format_width
from .strategy import MODEL_KEYS

FORMAT = "amoeba-export/adapter"
VERSION = 1
ROUTER = ("w1", "b1", "w2", "b2", "noise_w", "noise_b")  # W1 [H, in], b1 [H], W2 [E, H], b2 [E], Wn [E, in], bn [E]
Key = tuple[int, str]  # (base layer, projection)


def _order(key: Key) -> tuple[int, int]:
    return key[0], PROJECTIONS.index(key[1])


class ExpertFile(Mapping):
    """(layer, proj) -> (A [E, r, in], B [E, out, r]) in fp32, read from a safetensors file on access.

    `entries` names each projection's tensors: one stacked tensor per factor (`stacked`, our
    format) or one tensor per expert (the upstream layout), stacked on reading. Shapes come from
    the header, so checks never read data."""

    def __init__(self, path: Path, entries: dict[Key, tuple[list[str], list[str]]], stacked: bool):
        self.path, self.entries, self.stacked = Path(path), dict(entries), stacked
        header = safetensors_header(self.path)
        self._shapes: dict[Key, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for key, (a, b) in self.entries.items():
            shapes = []
            for names in (a, b):
                missing = [n for n in names if n not in header]
                if missing:
                    raise UserError(f"corrupt adapter {self.path}: no tensor {missing[0]}")
                got = {tuple(header[n]["shape"]) for n in names}
                if len(got) != 1:
                    raise UserError(f"adapter {self.path}: the experts of {names[0]} differ in shape")
                shape = got.pop()
                shapes.append(shape if stacked else (len(names),) + shape)
            self._shapes[key] = (shapes[0], shapes[1])

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.entries[key]
        with safe_open(str(self.path), framework="pt") as f:
            read = (
                (lambda ns: f.get_tensor(ns[0]))
                if self.stacked
                else (lambda ns: torch.stack([f.get_tensor(n) for n in ns]))
            )
            return read(a).float(), read(b).float()

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[Key]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self, key: Key) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self._shapes[key]

    def names(self, key: Key) -> tuple[str, str]:
        return self.entries[key][0][0], self.entries[key][1][0]

    def select(self, key: Key, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [k, r, in], B [k, out, r]) of the `chosen` experts only, in that order."""
        a, b = self.entries[key]
        with safe_open(str(self.path), framework="pt") as f:
            if self.stacked:
                read = lambda ns: torch.stack([f.get_slice(ns[0])[i] for i in chosen])  # noqa: E731
            else:
                read = lambda ns: torch.stack([f.get_tensor(ns[i]) for i in chosen])  # noqa: E731
            return read(a).float(), read(b).float()


def _chosen(experts: Mapping[Key, tuple[torch.Tensor, torch.Tensor]], key: Key, chosen: list[int]):
    """The chosen experts' factors: read from the file where they live there, else indexed in memory."""
    if isinstance(experts, ExpertFile):
        return experts.select(key, chosen)
    A, B = experts[key]
    return A[chosen].float(), B[chosen].float()


def affine_router(R: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z = W2(W1 x + b1) + b2, softplus(Wn x + bn)): the noise-free logits and the scale of the
    training noise, in the dtype of `R` and `x` (differentiable: the trainer calls it on parameters)."""
    z = F.linear(F.linear(x, R["w1"], R["b1"]), R["w2"], R["b2"])
    return z, F.softplus(F.linear(x, R["noise_w"], R["noise_b"]))


@dataclass(eq=False)
class SMOL(Adapter):
    r: int
    alpha: float
    scale: float  # alpha / r (alpha / sqrt(r) under rsLoRA)
    top_k: int
    n_layers: int  # of the base model: the length of the router's kept-layer mask
    width_choice: list[float]  # the router's one-hot order
    router: dict[str, torch.Tensor]  # ROUTER
    experts: Mapping[Key, tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A [E, r, in], B [E, out, r])
    model: dict = field(default_factory=dict)  # MODEL_KEYS (and fingerprint) of the base it was made for
    meta: dict = field(default_factory=dict)
    _depths: dict[int, list[int]] | None = field(default=None, repr=False, compare=False)
    _gates: dict = field(default_factory=dict, repr=False, compare=False)  # shape -> (g, chosen, z, noise)
    _mixed: tuple | None = field(default=None, repr=False, compare=False)  # (shape, {key: LoRADelta}) of the last shape

    def __post_init__(self):
        R = self.router
        missing = [k for k in ROUTER if k not in R]
        if missing:
            raise UserError(f"corrupt SMOL adapter: the router lacks {', '.join(missing)}")
        H, n_in = R["w1"].shape
        E = R["w2"].shape[0]
        want = {"w1": (H, n_in), "b1": (H,), "w2": (E, H), "b2": (E,), "noise_w": (E, n_in), "noise_b": (E,)}
        bad = [f"{k} {list(R[k].shape)} (expected {list(v)})" for k, v in want.items() if tuple(R[k].shape) != v]
        if bad:
            raise UserError(f"corrupt SMOL adapter: router tensor {bad[0]}")
        if n_in != self.n_layers + len(self.width_choice):
            raise UserError(f"SMOL router takes {n_in} inputs, but {self.n_layers} layers + {len(self.width_choice)} "
                            "widths make a different number")
        if not 1 <= self.top_k <= E:
            raise UserError(f"SMOL top_k {self.top_k} is not between 1 and the {E} experts")
        if len({format_width(w) for w in self.width_choice}) != len(self.width_choice):
            raise UserError(f"SMOL width_choice {self.width_choice} lists a width twice")
        self.router = {k: R[k].float() for k in ROUTER}

    @property
    def n_experts(self) -> int:
        return self.router["w2"].shape[0]

    # ------------------------------------------------------------------ the router
    def bind(self, strategy) -> None:
        """Take the kept layers of every depth from the strategy of the model this adapter is attached to."""
        if strategy.model.get("n_layers") != self.n_layers:
            raise UserError(f"the SMOL adapter's router masks {self.n_layers} layers, but the strategy is for "
                            f"{strategy.model.get('n_layers')} layers")
        self._depths = {int(d): list(ls) for d, ls in strategy.depths.items()}
        self._gates.clear()
        self._mixed = None

    def kept_layers(self, shape: Shape) -> list[int]:
        if self._depths is not None and shape.depth in self._depths:
            return self._depths[shape.depth]
        if shape.depth == self.n_layers:
            return list(range(self.n_layers))
        raise UserError(f"the SMOL adapter does not know which layers depth {shape.depth} keeps: attach it to an "
                        "ElasticModel with a strategy (or call bind(strategy))")

    def width_index(self, width: float) -> int:
        """Position of `width` in the one-hot (the exact trained values; docs/amoeba-algorithm.md §1)."""
        best = min(range(len(self.width_choice)), key=lambda i: abs(self.width_choice[i] - width))
        if abs(self.width_choice[best] - width) > WIDTH_TOLERANCE:
            raise UserError(f"width {format_width(width)} is not one the SMOL adapter was trained for (width_choice "
                            f"{', '.join(format_width(w) for w in self.width_choice)}): its router has no input for it")
        return best

    def router_input(self, layers: list[int], width: float) -> torch.Tensor:
        """x = concat(kept-layer mask over the base's layers, onehot(width))."""
        x = torch.zeros(self.n_layers + len(self.width_choice))
        if any(not 0 <= i < self.n_layers for i in layers):
            raise UserError(f"kept layers {layers} are outside the adapter's {self.n_layers} layers")
        x[list(layers)] = 1.0
        x[self.n_layers + self.width_index(width)] = 1.0
        return x

    def router_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, softplus(Wn x + bn)) in float64: the noise-free logits and the scale of the training noise.

        float64 because a float32 matrix-vector product can differ in the last bit with the
        tensors' memory alignment (an adapter in memory vs the same one read back from disk), and
        the gate must be a pure function of the adapter file: it selects experts and its float32
        value is merged into the exported weights."""
        return affine_router({k: v.double() for k, v in self.router.items()}, x.double())

    def gate_for(
        self, layers: list[int], width: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """(g [E] float32 with top_k non-zeros summing to 1, the selected experts by decreasing logit).

        Without a generator the gate is deterministic (what export uses); with one, the logits get
        ε ⊙ softplus(Wn x + bn), ε ~ N(0, I) drawn from it, as in training."""
        return self._route(layers, width, generator)[:2]

    def _route(self, layers: list[int], width: float, generator: torch.Generator | None = None):
        """(g, chosen, the noise-free logits z, the noise scale softplus(Wn x + bn))."""
        with torch.no_grad():
            z, noise = self.router_logits(self.router_input(layers, width))
            noisy = (
                z if generator is None else z + torch.randn(z.shape, generator=generator, dtype=torch.float64) * noise
            )
            top = torch.topk(noisy, self.top_k)
            sparse = torch.full_like(noisy, float("-inf")).scatter(0, top.indices, top.values)
            return torch.softmax(sparse, dim=0).float(), [int(i) for i in top.indices], z, noise

    def gate(self, shape: Shape, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
        """The gate of `shape` (its kept layers from the bound strategy); cached when deterministic."""
        if generator is not None:
            return self.gate_for(self.kept_layers(shape), shape.width, generator)
        return self._routed(shape)[:2]

    def _routed(self, shape: Shape):
        if shape not in self._gates:
            self._gates[shape] = self._route(self.kept_layers(shape), shape.width)
        return self._gates[shape]

    # ------------------------------------------------------------------ the Adapter interface
    def delta(self, shape: Shape, layer: int, proj: str) -> LoRADelta | None:
        """s · B_mix A_mix with A_mix = Σ g_i A_i, B_mix = Σ g_i B_i over the selected experts (fp32)."""
        if (layer, proj) not in self.experts:
            return None
        if self._mixed is None or self._mixed[0] != shape:  # the masked forward asks for every layer and
            self._mixed = (shape, {})                        # projection on every call: mix once per shape
        mixed = self._mixed[1]
        if (layer, proj) not in mixed:
            g, chosen = self.gate(shape)
            A, B = _chosen(self.experts, (layer, proj), chosen)  # only the selected experts are read
            with torch.no_grad():
                A_mix = sum(g[i] * A[n] for n, i in enumerate(chosen))
                B_mix = sum(g[i] * B[n] for n, i in enumerate(chosen))
            mixed[(layer, proj)] = LoRADelta(A_mix, B_mix, self.scale)
        return mixed[(layer, proj)]

    def record(self, shape: Shape) -> dict:
        g, chosen, z, noise = self._routed(shape)
        ranked = sorted(z.tolist(), reverse=True)
        return {
            "kind": "smol",
            "deterministic": True,  # noise-free gate (docs/amoeba-algorithm.md §6)
            "gate": g.tolist(),
            "experts": chosen,
            "width_index": self.width_index(shape.width),
            "router_logits": z.tolist(),
            "noise_scale": noise.tolist(),  # softplus(Wn x + bn): the std of the training-time noise
            "top_k_margin": ranked[self.top_k - 1] - ranked[self.top_k] if self.top_k < self.n_experts else None,
            "r": self.r, "alpha": self.alpha, "scale": self.scale, "n_experts": self.n_experts, "top_k": self.top_k,
            "source": self.meta.get("source"),
        }

    def check_model(self, info: dict) -> None:
        if info["n_layers"] != self.n_layers:
            raise UserError(
                f"the SMOL adapter is for a {self.n_layers}-layer model, but the model has {info['n_layers']}"
            )
        for key in sorted(self.experts, key=_order):
            a_shape, b_shape = self._shapes(key)
            check_factors(info, key[0], key[1], a_shape, b_shape, self._names(key))
            if a_shape[0] != self.n_experts or a_shape[1] != self.r:
                raise UserError(f"adapter tensor {self._names(key)[0]} has shape {list(a_shape)}: expected "
                                f"{self.n_experts} experts of rank {self.r}")

    def _shapes(self, key: Key):
        if isinstance(self.experts, ExpertFile):
            return self.experts.shapes(key)
        A, B = self.experts[key]
        return tuple(A.shape), tuple(B.shape)

    def _names(self, key: Key) -> tuple[str, str]:
        if isinstance(self.experts, ExpertFile):
            return self.experts.names(key)
        return f"layers.{key[0]}.{key[1]}.lora_A", f"layers.{key[0]}.{key[1]}.lora_B"

    # ------------------------------------------------------------------ storage
    def save(self, directory: Path) -> None:
        """adapter.safetensors (streamed, one projection in memory at a time) + adapter.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.experts, key=_order)
        specs = [(f"router.{k}", tuple(self.router[k].shape)) for k in ROUTER]
        for layer, proj in keys:
            a_shape, b_shape = self._shapes((layer, proj))
            specs += [
                (f"layers.{layer}.{proj}.lora_A", tuple(a_shape)),
                (f"layers.{layer}.{proj}.lora_B", tuple(b_shape)),
            ]

        def tensors():
            for k in ROUTER:
                yield f"router.{k}", self.router[k].detach().float().contiguous()
            for layer, proj in keys:
                A, B = self.experts[(layer, proj)]
                yield f"layers.{layer}.{proj}.lora_A", A.detach().float().contiguous()
                yield f"layers.{layer}.{proj}.lora_B", B.detach().float().contiguous()

        write_safetensors_stream(directory, specs, tensors(), torch.float32, max_shard_bytes=1 << 62, stem="adapter")
        write_json(directory / "adapter.json", {
            "format": FORMAT, "version": VERSION, "kind": "smol",
            "r": self.r, "alpha": self.alpha, "scale": self.scale, "n_experts": self.n_experts, "top_k": self.top_k,
            "n_layers": self.n_layers, "router_hidden": int(self.router["w1"].shape[0]),
            "width_choice": [float(w) for w in self.width_choice],
            "experts": [[layer, proj] for layer, proj in keys],
            "model": self.model, "meta": self.meta,
        })

    @classmethod
    def load(cls, directory: Path) -> "SMOL":
        directory = Path(directory)
        doc = read_json(directory / "adapter.json")
        if doc.get("format") != FORMAT or doc.get("kind") != "smol":
            raise UserError(f"{directory / 'adapter.json'} is not an amoeba-export SMOL adapter")
        if doc.get("version") != VERSION:
            raise UserError(f"adapter version {doc.get('version')} is not supported (expected {VERSION})")
        path = directory / "adapter.safetensors"
        try:
            entries = {
                (int(l), str(p)): ([f"layers.{l}.{p}.lora_A"], [f"layers.{l}.{p}.lora_B"]) for l, p in doc["experts"]
            }
            if any(p not in PROJECTIONS for _, p in entries):
                raise ValueError("unknown projection")
            experts = ExpertFile(path, entries, stacked=True)
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                missing = [k for k in ROUTER if f"router.{k}" not in names]
                if missing:
                    raise UserError(f"corrupt adapter {path}: no tensor router.{missing[0]}")
                router = {k: f.get_tensor(f"router.{k}") for k in ROUTER}
            return cls(
                r=int(doc["r"]),
                alpha=float(doc["alpha"]),
                scale=float(doc["scale"]),
                top_k=int(doc["top_k"]),
                n_layers=int(doc["n_layers"]),
                width_choice=[float(w) for w in doc["width_choice"]],
                router=router,
                experts=experts,
                model=dict(doc.get("model") or {}),
                meta=dict(doc.get("meta") or {}),
            )
        except UserError:
            raise
        except Exception as e:  # a malformed document or file: one line, not a traceback
            raise UserError(f"corrupt adapter in {directory}: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ tests and training
    @classmethod
    def init(cls, info: dict, width_choice, *, r: int = 64, alpha: float = 16.0, n_experts: int = 5, top_k: int = 2,
             targets=PROJECTIONS, router_hidden: int = 16, seed: int = 0) -> "SMOL":
        """The training start (docs/amoeba-algorithm.md §5): every A Kaiming-uniform, every B zero (so the adapted
        model starts as the stage-1 model exactly), the router's three linears with PyTorch's
        default Linear init."""
        n_in = info["n_layers"] + len(width_choice)

        def factors(out_f: int, in_f: int):
            A = torch.empty(n_experts, r, in_f)
            for a in A:
                torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # what PEFT gives lora_A
            return A, torch.zeros(n_experts, out_f, r)

        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
            torch.manual_seed(seed)
            w1, w2, noise = (
                torch.nn.Linear(n_in, router_hidden),
                torch.nn.Linear(router_hidden, n_experts),
                torch.nn.Linear(n_in, n_experts),
            )
            router = {
                "w1": w1.weight,
                "b1": w1.bias,
                "w2": w2.weight,
                "b2": w2.bias,
                "noise_w": noise.weight,
                "noise_b": noise.bias,
            }
            return cls._build(
                info,
                width_choice,
                r,
                alpha,
                top_k,
                targets,
                {k: v.detach().clone() for k, v in router.items()},
                factors,
                f"init (seed {seed})",
            )

    @classmethod
    def random(cls, info: dict, width_choice, *, r: int = 4, alpha: float = 8.0, n_experts: int = 3, top_k: int = 2,
               targets=PROJECTIONS, router_hidden: int = 16, std: float = 0.2, seed: int = 0) -> "SMOL":
        """Random experts with non-zero B (unlike the training init) and a random router, so the
        gates differ between shapes and every merge visibly changes the model."""
        g = torch.Generator().manual_seed(seed)
        n_in, E = info["n_layers"] + len(width_choice), n_experts
        rand = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
        router = {"w1": rand(router_hidden, n_in), "b1": rand(router_hidden), "w2": rand(E, router_hidden, scale=0.5),
                  "b2": rand(E), "noise_w": rand(E, n_in, scale=0.3), "noise_b": rand(E, scale=0.3)}
        return cls._build(
            info,
            width_choice,
            r,
            alpha,
            top_k,
            targets,
            router,
            lambda out_f, in_f: (rand(E, r, in_f, scale=std), rand(E, out_f, r, scale=std)),
            f"random (seed {seed})",
        )

    @classmethod
    def _build(cls, info: dict, width_choice, r: int, alpha: float, top_k: int, targets, router: dict, factors,
               source: str) -> "SMOL":
        """A SMOL for the model `info` whose experts come from `factors(out_features, in_features)`,
        called layer by layer, projection by projection."""
        experts = {
            (layer, proj): factors(*projection_shape(info, proj))
            for layer in range(info["n_layers"])
            for proj in targets
        }
        return cls(r=r, alpha=float(alpha), scale=alpha / r, top_k=top_k, n_layers=info["n_layers"],
                   width_choice=[float(w) for w in width_choice], router=router, experts=experts,
                   model={k: info[k] for k in (*MODEL_KEYS, "fingerprint") if k in info}, meta={"source": source})
