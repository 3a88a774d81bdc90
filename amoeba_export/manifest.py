"""manifest.json: how an artifact was made, from what, and how well it matched the reference.

Written last into the artifact directory, so its presence means the artifact is complete. The
build record is the only place with wall-clock time; everything else is a pure function of inputs.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from .base_model import input_sha256
from .io import sha256_file, write_json

MANIFEST = "manifest.json"
FORMAT = "amoeba-export/artifact"
SCHEMA = 1
PACKAGES = ("amoeba-export", "torch", "transformers", "safetensors", "tokenizers", "numpy", "gguf", "llama_cpp_python",
            "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-genai")


def package_versions(names) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def versions() -> dict:
    installed = {k: v for k, v in package_versions(PACKAGES).items() if v is not None}
    return {"python": platform.python_version(), **installed}


def hash_inputs(paths: dict[str, Path | None]) -> dict:
    """sha256 of every input file (a directory: each of its files), keyed by role."""
    out = {}
    for role, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out[role] = {
            "path": str(path),
            "sha256": {str(f.relative_to(path) if path.is_dir() else f.name): input_sha256(f) for f in files},
        }
    return out


def is_artifact(path: Path) -> bool:
    """An earlier artifact of ours (what `--force` may replace): its manifest lists every other file in it."""
    path = Path(path)
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict) or "flow" not in doc:
        return False
    present = {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir() or p.is_symlink()}
    return present <= set(doc["files"]) | {MANIFEST}


def write_manifest(out_dir: Path, body: dict) -> dict:
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": FORMAT,
        "schema": SCHEMA,
        **body,
        "versions": versions(),
        "files": {str(p.relative_to(out_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "build": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["amoeba-export"] + sys.argv[1:]),
            "host": platform.node(),
        },
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest
