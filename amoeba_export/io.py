"""File discipline shared by every pass: checked reads, atomic directory writes, stable JSON.

Outputs are built in a temporary directory beside the destination and renamed into place only when
complete, so an interrupted run never leaves an artifact that looks finished. Reads of
safetensors and JSON turn truncation and corruption into one-line `UserError`s.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError, os_error_message
from .errors import notice as default_notice


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


# ------------------------------------------------------------------ partial outputs
# Every temporary output is named `.<name>.partial-<pid>-<random>` beside its destination (or
# `<prefix><pid>-<random>` in the temp folder for scratch space), so a later run can tell the
# leftovers of a killed process (its pid is gone) from the work of one still running.

def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner(rest: str) -> int | None:
    m = re.match(r"(\d+)-", rest)
    return int(m.group(1)) if m else None


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir() or f.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def sweep_stale(folder: Path, prefix: str, *, all_stale: bool = False, notice: Callable[[str], None] | None = None,
                what: str = "") -> int:
    """Remove the entries of `folder` named `prefix<pid>-...` whose process is gone (every entry with
    the prefix when `all_stale`: the caller holds the destination's lock, so no live run owns one).
    Entries named before pids were recorded count as stale when `all_stale`. Returns bytes freed."""
    freed, gone = 0, []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid = _owner(p.name[len(prefix):])
        if all_stale or (pid is not None and not _alive(pid)):
            with contextlib.suppress(OSError):
                freed += _size(p)
            _remove(p)
            gone.append(p.name)
    if gone and notice is not None:
        notice(f"removed {len(gone)} leftover{'s' if len(gone) > 1 else ''} of interrupted runs{what} "
               f"({freed / 1e6:.1f} MB): {', '.join(sorted(gone)[:3])}{' ...' if len(gone) > 3 else ''}")
    return freed


@contextlib.contextmanager
def scratch_dir(prefix: str):
    """A temporary directory in the system temp folder, removed afterwards; the scratch dirs of
    killed runs with the same prefix are removed first."""
    root = Path(tempfile.gettempdir())
    sweep_stale(root, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, write) -> None:
    """Write one file through `write(binary file object)` into a temporary file beside `path`, synced,
    then renamed over it: a reader never sees half a file, an interrupted write leaves none (a killed
    writer's leftover is removed by the next write of the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = f".{path.name}.partial-"
    sweep_stale(path.parent, partial)
    fd, tmp = tempfile.mkstemp(prefix=f"{partial}{os.getpid()}-", dir=path.parent)
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


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, dumps_json(obj))


# ------------------------------------------------------------------ destinations

def check_destination(dest: Path, *, ours: Callable[[Path], bool], force: bool, protect=()) -> None:
    """Refuse an output path whose replacement would destroy what amoeba-export did not write.

    Refused always: the current directory or a folder holding it, any input (`protect`: the model,
    strategy and adapter directories) or a folder holding one, and a file. An existing non-empty
    directory is replaced only when `ours(dest)` recognises it as an earlier output of the same
    kind, and only with `force`.
    """
    dest = Path(dest)
    real = dest.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        what = "the current directory" if real == cwd else "a folder holding the current directory"
        raise UserError(f"output {dest} is {what}: choose a new directory for the output (nothing was changed)")
    for p in protect:
        if p is None:
            continue
        pr = Path(p).resolve()
        if real == pr or real in pr.parents:
            raise UserError(f"output {dest} {'is' if real == pr else 'holds'} the input {p}: choose another "
                            "directory (nothing was changed)")
    if not real.exists():
        return
    if not real.is_dir():
        raise UserError(f"output {dest} is a file, not a directory: choose another path (nothing was changed)")
    try:
        empty = next(real.iterdir(), None) is None
    except OSError as e:
        raise UserError(f"cannot read output {os_error_message(e)}") from None
    if empty:
        return
    if not ours(real):
        raise UserError(f"output {dest} already holds files amoeba-export did not write: choose an empty or new "
                        "directory (nothing was changed)")
    if not force:
        raise UserError(f"output {dest} holds an earlier output of amoeba-export: pass --force to replace it")


_LOCKS: dict[Path, int] = {}  # lock file -> descriptor, held by this process (re-entrant)


@contextlib.contextmanager
def output_lock(dest: Path):
    """An exclusive lock on `dest` for the whole run (`.<name>.lock` beside it, flock'd, so a killed
    run's lock is released by the kernel): a second run writing the same output is refused."""
    dest = Path(dest).absolute()
    lock = dest.parent / f".{dest.name}.lock"
    if lock in _LOCKS:
        yield
        return
    fd = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                fd = None
                raise UserError(f"another amoeba-export run{f' (pid {holder})' if holder.isdigit() else ''} is writing "
                                f"{dest}: wait for it to finish or choose another output") from None
            try:  # the previous holder may have unlinked the file between our open and flock
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        if fd is not None:  # ours, and locked: take it away again
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
        raise UserError(f"cannot write {dest}: {os_error_message(e)}") from None
    _LOCKS[lock] = fd
    try:
        yield
    finally:
        del _LOCKS[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _filesystem_fault(folder: Path) -> str | None:
    """'the disk is full' / 'the file system is read-only' when that is the state of `folder`'s file
    system: how a writer that does not raise OSError (safetensors, torch, onnx) failed."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    if st.f_bavail * st.f_frsize < (1 << 20):
        return "the disk is full"
    return None


@contextlib.contextmanager
def atomic_dir(dest: Path, *, ours: Callable[[Path], bool] | None = None, force: bool = False, protect=(),
               notice: Callable[[str], None] | None = default_notice):
    """Yield a temporary directory beside `dest`; put it in `dest`'s place when the block completes.

    With `ours`, `dest` is a user's output path, checked by `check_destination` (`force`, `protect`);
    without, it is a path of our own (a cache, a checkpoint) and is replaced freely. The destination
    is locked for the block, leftovers of killed runs beside it are removed first (with a notice), and
    a failure removes the temporary directory: nothing half-written stays behind.
    """
    dest = Path(dest).absolute()
    if ours is not None:
        check_destination(dest, ours=ours, force=force, protect=protect)
    with output_lock(dest):
        partial = f".{dest.name}.partial-"
        sweep_stale(dest.parent, partial, all_stale=True, notice=notice, what=f" beside {dest}")
        sweep_stale(dest.parent, f".{dest.name}.old-", all_stale=True, notice=notice, what=f" beside {dest}")
        if ours is not None:  # again under the lock: another run may have written it meanwhile
            check_destination(dest, ours=ours, force=force, protect=protect)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{partial}{os.getpid()}-", dir=dest.parent))
        except OSError as e:
            raise UserError(f"cannot write {dest}: {os_error_message(e)}") from None
        try:
            yield tmp
            _publishable(tmp)
            if dest.exists() and not dest.is_symlink() and dest.is_dir() and _exchange(tmp, dest):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced output
            elif dest.exists() or dest.is_symlink():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}-0")
                dest.rename(old)
                tmp.rename(dest)
                _remove(old)
            else:
                tmp.rename(dest)
        except (UserError, KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write {dest}: {os_error_message(e, (tmp, dest))}; nothing was written") from None
        except BaseException as e:
            fault = _filesystem_fault(dest.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            if fault is None:
                raise
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise UserError(f"cannot write {dest}: {fault} ({type(e).__name__}{': ' + first if first else ''}); "
                            "nothing was written") from None


_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}


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
                    raise RuntimeError(
                        f"tensor stream out of plan: got {got_name} {tuple(t.shape)} {t.dtype}, planned {name} {shape}"
                    )
                flat = t.reshape(-1)  # a view when t is contiguous: no copy
                if flat.numel() and flat.stride(0) != 1:
                    flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
                if flat.numel():
                    f.write(flat.view(torch.uint8).numpy().data)
        total += offset
    if len(names) > 1:
        write_json(
            Path(directory) / f"{stem}.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    return names + ([f"{stem}.safetensors.index.json"] if len(names) > 1 else [])
