"""What is timed: `Workload(batch, prompt_len, gen_len, metric)`.

The metric is the number a budget bounds. `--budget 40ms` means time per output token at batch 1
and a 128-token prompt unless `--metric`, `--prompt-len`, `--gen-len` or `--batch` say otherwise;
a budget needs a unit (ms, s, us), and a bare or negative number is an error. The metrics:

- ``tpot``: time per output token, one decode step with a KV cache of `prompt_len` tokens
  (the default meaning of `--budget`);
- ``ttft``: time to first token, the prefill of `prompt_len` tokens producing the first token;
- ``e2e``: the whole request, prefill plus decode until `gen_len` tokens are out.

`key()` names the workload in latency-table paths (`latency_tables/<target>/<flow>/<model>/<key>.json`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from amoeba_export.errors import UserError

METRICS = ("tpot", "ttft", "e2e")


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 64
    metric: str = "tpot"

    def __post_init__(self):
        for name in ("batch", "prompt_len", "gen_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"workload {name} must be a whole number, got {v!r}")
            if v < 1:
                raise UserError(f"workload {name} must be at least 1, got {v}")
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}: choose one of {', '.join(METRICS)}")

    def timed(self, metrics: tuple[str, ...] | None, max_positions: int | None, limit_name: str
              ) -> tuple[tuple[str, ...], int]:
        """(the metrics a profiler times: `metrics`, default ttft, tpot and the workload's own, each
        once; the longest sequence they need), checked against the artifact's `max_positions`
        (`limit_name` says which setting that is)."""
        metrics = tuple(dict.fromkeys(metrics or ("ttft", "tpot", self.metric)))
        for m in metrics:
            if m not in METRICS:
                raise UserError(f"unknown metric {m!r}: choose from {', '.join(METRICS)}")
        longest = self.prompt_len + (self.gen_len if "e2e" in metrics else 1)
        if max_positions is not None and longest > max_positions:
            raise UserError(f"workload {self.key()} needs {longest} positions but the model's {limit_name} is "
                            f"{max_positions}: shorten --prompt-len or --gen-len")
        return metrics, longest

    def prompt_ids(self, vocab_size: int, seed: int = 0) -> np.ndarray:
        """Seeded random token ids, int64 [batch, prompt_len], within the vocabulary: every profiler
        times the same prompt for the same seed. Random ids cost what text costs: a dense model's work
        does not depend on which tokens it reads."""
        return np.random.default_rng(seed).integers(0, vocab_size, (self.batch, self.prompt_len), dtype=np.int64)

    def key(self) -> str:
        """Filename-safe name, e.g. ``b1-p128-g64-tpot``."""
        return f"b{self.batch}-p{self.prompt_len}-g{self.gen_len}-{self.metric}"

    def __str__(self) -> str:
        return self.key()

    def to_json(self) -> dict:
        """A JSON-serialisable dict (``json.dumps`` it to get text)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | str) -> "Workload":
        """From `to_json()`'s dict, or its JSON text. Unknown or malformed fields are a UserError."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise UserError(f"workload: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"workload: expected an object with batch, prompt_len, gen_len, metric; got {data!r}")
        unknown = set(data) - {"batch", "prompt_len", "gen_len", "metric"}
        if unknown:
            raise UserError(f"workload: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def parse(cls, key: str) -> "Workload":
        """The inverse of `key()`."""
        try:
            b, p, g, metric = key.split("-")
            if not (b[0], p[0], g[0]) == ("b", "p", "g"):
                raise ValueError
            return cls(int(b[1:]), int(p[1:]), int(g[1:]), metric)
        except (ValueError, IndexError):
            raise UserError(f"malformed workload key {key!r}: expected e.g. b1-p128-g64-tpot") from None
