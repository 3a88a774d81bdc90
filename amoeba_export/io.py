"""File discipline shared by every pass: checked reads, atomic directory writes, stable JSON.

Outputs are built in a temporary directory beside the destination and renamed into place only when
complete, so an interrupted run never leaves an artifact that looks finished. Reads of
safetensors and JSON turn truncation and corruption into one-line `UserError`s.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile

import numpy as np
from pathlib import Path

from .errors import UserError


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt JSON in {path}: {e}") from None


def dumps_json(obj) -> str:
    """Deterministic JSON (sorted keys, fixed separators, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, obj) -> None:
    Path(path).write_text(dumps_json(obj))


def safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without reading tensor data.

    Checks that the header is well-formed and that the file holds every byte the header promises,
    so a truncated download is caught here instead of as a crash deep inside a forward pass.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"corrupt safetensors file {path}: too short")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise UserError(f"corrupt safetensors file {path}: bad header length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"corrupt safetensors file {path}: unreadable header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"truncated safetensors file {path}: {size} bytes, header needs {8 + n + end}")
    return header


def hash_into(h, path: Path, chunk: int = 1 << 22):
    """Feed a file's bytes into the hash object `h`, a chunk at a time; returns `h`."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    return hash_into(hashlib.sha256(), path, chunk).hexdigest()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publishable(root: Path) -> None:
    """Ordinary permissions (mkdtemp makes 0700 and some writers 0600): what the umask allows;
    files written executable (a build script) stay executable."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() or p.stat().st_mode & 0o100 else 0o666) & ~umask)


def write_atomic(path: Path, write) -> None:
    """Write one file through `write(binary file object)` into a temporary file beside `path`, synced,
    then renamed over it: a reader never sees half a file, an interrupted write leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; publish with ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = True):
    """Yield a temporary directory beside `dest`; rename it to `dest` when the block completes."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        _publishable(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def _st_dtype(dtype) -> str:
    return _ST_DTYPES[str(dtype).removeprefix("torch.")]


def write_safetensors_stream(directory: Path, specs, tensors, dtype, max_shard_bytes: int = 4 << 30,
                             stem: str = "model") -> list[str]:
    """Write tensors to safetensors shards as they stream in, never holding more than one.

    `specs` lists (name, shape) in the order `tensors` yields them, so every header can be written
    before any data. One file `model.safetensors` when it fits in `max_shard_bytes`, else HF-style
    shards plus `model.safetensors.index.json` (`stem` replaces "model" in every name). Returns the
    file names written.
    """
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in specs:
        n = itemsize * int(np.prod(shape, dtype=np.int64)) if shape else itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), n))
        size += n
    shards.append(current)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    stream = iter(tensors)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, n in shard:
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(Path(directory) / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, n in shard:
                got_name, t = next(stream)
                if got_name != name or tuple(t.shape) != shape or t.dtype != dtype:
                    raise RuntimeError(f"tensor stream out of plan: got {got_name} {tuple(t.shape)} {t.dtype}, planned {name} {shape}")
                flat = t.reshape(-1)  # a view when t is contiguous: no copy
                if flat.numel() and flat.stride(0) != 1:
                    flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
                if flat.numel():
                    f.write(flat.view(torch.uint8).numpy().data)
        total += offset
    if len(names) > 1:
        write_json(Path(directory) / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + ([f"{stem}.safetensors.index.json"] if len(names) > 1 else [])
