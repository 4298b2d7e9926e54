"""Input pipelines: robust decode, the 10-crop geometry, sources (tfds by name, image
folders, the embedded tfds builder). Pure functions of (config.data, split); never imports
zf_tf."""

import json
import os
import tempfile


class DataError(ValueError):
    """The data a config names cannot be read as asked (unknown split, bad folder).

    The command line prints it as one line, like zf_tf's UsageError.
    """


def write_json(path: str, value) -> None:
    """Writes `value` as JSON to `path` through a temporary beside it, renamed into place
    (removed if writing fails): a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
