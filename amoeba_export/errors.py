"""User-facing errors and notices.

Everything a user can get wrong (a bad shape, a missing file, a strategy for another model) raises
`UserError`; the CLI prints its one line and exits with code 2. Anything else is a bug and keeps
its traceback. `notice` is the one way a pass tells the user something on stderr while stdout
stays the command's result.
"""
from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2


def notice(message: str) -> None:
    """A notice on stderr."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# What an operating-system error means to the user, by errno (the causes named by the issue:
# full disk, read-only, permission, not a directory).
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this process may write",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory, not a file",
    errno.EEXIST: "it already exists",
    errno.ENOENT: "it does not exist",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "an input/output error on the device",
}


def os_error_message(e: OSError, inside=None) -> str:
    """'PATH: cause (the system's words)' for an OSError. `inside` = (temporary dir, what it becomes):
    a path in the temporary output is named relative to it."""
    cause = _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    detail = f" ({e.strerror})" if e.strerror and e.strerror.lower() != cause else ""
    path = e.filename
    if path is not None and inside is not None:
        tmp = str(inside[0])
        path = str(path)
        if path == tmp:
            path = str(inside[1])
        elif path.startswith(tmp + "/"):
            path = path[len(tmp) + 1:]
    where = f"{path}: " if path is not None else ""
    return f"{where}{cause}{detail}"
