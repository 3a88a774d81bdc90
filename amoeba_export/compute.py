"""Where, and in what precision, the model runs: one setting for every command that runs it.

`--device auto|cpu|cuda|cuda:N` and `--compute-dtype auto|float32|bfloat16|float16` resolve here
once. `auto` is CUDA when this torch sees a GPU, else the CPU; the dtype defaults to float32 on the
CPU (so the default model's figures do not move) and bfloat16 on CUDA. The reference forward's own
rounding depends on the dtype, so verify's tolerance widens with it (docs/reference-forward.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import local_rank
from .errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How far the masked reference itself may be from a float32 one, by compute dtype (max |Δlogit|).
# Measured on SmolLM2-135M over every strategy shape (docs/reference-forward.md §3).
REFERENCE_ERROR = {"float32": 0.0, "float16": 0.5, "bfloat16": 2.0}


@dataclass(frozen=True)
class Compute:
    device: str = "cpu"  # "cpu" or "cuda:N"
    dtype: str = "float32"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def reference_error(self) -> float:
        return REFERENCE_ERROR[self.dtype]

    def to_json(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.device} {self.dtype}"


def resolve(device: str | None = "auto", dtype: str | None = "auto") -> Compute:
    """The Compute for the options as given; a device this machine does not have is one clear error."""
    device = (device or "auto").strip().lower()
    dtype = (dtype or "auto").strip().lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        if device != "cuda" and not index.isdigit():
            raise UserError(f"--device {device!r}: use {DEVICE_CHOICES}")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__}, "
                            f"CUDA {torch.version.cuda or 'not built in'}); use --device cpu")
        rank = local_rank()  # under torchrun / accelerate launch, each process takes its own GPU
        n = int(index or (rank if rank is not None else torch.cuda.current_device()))
        if n >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
        device = f"cuda:{n}"
    elif device != "cpu":
        raise UserError(f"--device {device!r}: use {DEVICE_CHOICES}")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"--compute-dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return Compute(device, dtype)


def available_bytes(compute: Compute) -> int:
    """Memory free for weights on the compute device: CUDA's free memory, else MemAvailable."""
    if compute.device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(compute.device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
