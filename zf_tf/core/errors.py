"""The library's one error type for bad user input, and the one-line form of file-system
faults (a read-only or full disk, a path that is a file)."""

from __future__ import annotations

import errno
import os
import re

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
_TF_FILE_SYSTEM_TEXTS = {
    "Read-only file system": errno.EROFS,
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Permission denied": errno.EACCES,
    "Not a directory": errno.ENOTDIR,
    "Is a directory": errno.EISDIR,
}


# TensorFlow's wrapping of an op's error: "{{function_node __wrapped__X_device_...}} " before
# the cause, " [Op:X] name: ..." after it.
_TF_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_TF_OP = re.compile(r"\s*\[Op:[^\]]*\].*$")


def op_message(e: BaseException) -> str:
    """The cause an error states, on one line, without TensorFlow's op internals
    ('Invalid JPEG data, size 500', not '{{function_node __wrapped__ExtractJpegShape_...}}
    Invalid JPEG data, size 500 [Op:ExtractJpegShape] name: ')."""
    text = str(getattr(e, "message", None) or e).strip()
    first = text.splitlines()[0] if text else ""
    first = _TF_OP.sub("", _TF_NODE.sub("", first)).strip()
    return first or type(e).__name__


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
                return f"cannot write: {op_message(e)}"
    return None


def writing(e: BaseException, path: str) -> BaseException:
    """`e`, met while writing `path` through a temporary, as an OSError naming `path` when
    it is a file-system fault: writers name no file (Keras' zip, h5py) or their own
    temporaries (TensorFlow's SavedModel: `.../variables_temp/part-00000...tempstate123`);
    any other error is returned as it is."""
    code = e.errno if isinstance(e, OSError) and e.errno in FILE_SYSTEM_ERRNOS else None
    text = getattr(e, "message", None)
    if code is None and isinstance(text, str):
        code = next((c for cause, c in _TF_FILE_SYSTEM_TEXTS.items() if cause in text), None)
    return e if code is None else OSError(code, os.strerror(code), path)


def _hint(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return " (free some space, or choose another --workdir)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return " (choose a --workdir you can write)"
    return ""
