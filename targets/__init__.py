"""Device registry: one TOML per device in this folder, plus `host`, detected on the running machine."""
from __future__ import annotations

import os
import platform
import tomllib
from pathlib import Path

from amoeba_export.errors import UserError

HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted({"host"} | {p.stem for p in HERE.glob("*.toml")})


def detect_host() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"name": "host", "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "arch": platform.machine(),
            "flows": ["pytorch"], "source": "detected on the running machine"}


def load_target(name: str) -> dict:
    if name == "host":
        return detect_host()
    path = HERE / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(names())}")
    with open(path, "rb") as f:
        return {"name": name, **tomllib.load(f)}
