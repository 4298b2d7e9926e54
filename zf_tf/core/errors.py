"""The library's one error type for bad user input, and the one-line form of file-system
faults (a read-only or full disk, a path that is a file)."""

from __future__ import annotations

import errno
import os

# errno values that mean "this path cannot be written here", not a bug.
FILE_SYSTEM_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}
# The same faults as TensorFlow's C++ file systems word them (tf.errors.OpError messages).
_TF_FILE_SYSTEM_TEXTS = (
    "Read-only file system",
    "No space left on device",
    "Disk quota exceeded",
    "Permission denied",
    "Not a directory",
    "Is a directory",
)


class UsageError(ValueError):
    """A problem with the user's input (a setting, a path, a layer name).

    The command line prints it as one line (`error: ...`) with exit status 1 and no
    traceback; library callers can catch it as the ValueError it is.
    """


def file_system_fault(e: BaseException) -> str | None:
    """One line naming the path and the cause when `e` is a file-system fault (an OSError
    with a FILE_SYSTEM_ERRNOS errno, or a TensorFlow error saying so); None otherwise."""
    if isinstance(e, OSError) and e.errno in FILE_SYSTEM_ERRNOS:
        path = e.filename if e.filename is not None else "a file"
        cause = e.strerror or os.strerror(e.errno)
        return f"cannot write {path}: {cause}{_hint(e.errno)}"
    text = getattr(e, "message", None)
    if isinstance(text, str):
        for cause in _TF_FILE_SYSTEM_TEXTS:
            if cause in text:
                first = text.strip().splitlines()[0] if text.strip() else cause
                return f"cannot write: {first}"
    return None


def _hint(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return " (free some space, or choose another --workdir)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return " (choose a --workdir you can write)"
    return ""
