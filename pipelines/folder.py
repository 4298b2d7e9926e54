"""An image folder in ImageNet layout: `root/<class>/<file>.{jpg,jpeg,png,...}`, or a flat
folder of unlabeled images `root/<file>` (label UNLABELED, for the modes that need no labels).

Classes are the sorted subfolder names. Files are checked once when the folder is
indexed (in parallel threads, reading only each file's first and last bytes): empty files,
files that are no known image format, and JPEG/PNG files cut short (no end marker) are
skipped and counted in one log line, so a bad file never crashes a run. Files that pass
this check but still fail to decode are dropped by the pipeline (`ignore_errors`) with a
warning.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os

from absl import logging

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
UNLABELED = -1  # the label of every image of a flat folder
_TAIL = 1024  # bytes at the end of a file searched for the end marker

_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
}


@dataclasses.dataclass
class FolderIndex:
    """Readable files of an image folder with their labels, and what was skipped."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    skipped: dict[str, list[str]]  # reason ('empty', 'corrupt', 'truncated') -> paths

    @property
    def labeled(self) -> bool:
        """False for a flat folder (no class subfolders: every label is UNLABELED)."""
        return bool(self.class_names)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def check_file(path: str) -> str | None:
    """Returns why an image file is unusable ('empty', 'corrupt', 'truncated') or None."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError:
        return "corrupt"
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None:
        return "corrupt"
    # Entropy-coded JPEG data never contains FF D9 (FF is stuffed), so a JPEG whose tail
    # lacks the EOI marker was cut short; likewise a PNG without its IEND chunk.
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated"
    if kind == "png" and b"IEND" not in tail:
        return "truncated"
    return None


def index_folder(root: str, max_workers: int = 16) -> FolderIndex:
    """Lists and checks the images of a class-subfolder tree.

    Args:
      root: folder holding one subfolder per class.
      max_workers: threads used to check files.

    Returns:
      A FolderIndex sorted by (class, file name).

    Raises:
      FileNotFoundError: `root` is missing or holds no images (directly or in class
        subfolders).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    class_names = sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )
    candidates = []
    for label, name in enumerate(class_names):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.lower().endswith(EXTENSIONS):
                    candidates.append((os.path.join(dirpath, f), label))
    if not candidates:  # a flat folder of unlabeled images
        class_names = []
        candidates = [
            (os.path.join(root, f), UNLABELED)
            for f in sorted(os.listdir(root))
            if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(root, f))
        ]
    if not candidates:
        raise FileNotFoundError(
            f"no images ({', '.join(EXTENSIONS)}) in {root} or in class subfolders of it"
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        problems = list(pool.map(check_file, [p for p, _ in candidates]))
    skipped = collections.defaultdict(list)
    paths, labels = [], []
    for (path, label), problem in zip(candidates, problems):
        if problem:
            skipped[problem].append(path)
        else:
            paths.append(path)
            labels.append(label)
    index = FolderIndex(paths, labels, class_names, dict(skipped))
    detail = ", ".join(f"{len(v)} {k}" for k, v in sorted(index.skipped.items())) or "none"
    log = logging.warning if index.num_skipped else logging.info  # skips always show
    log(
        "Image folder %s: %d classes, %d files, %d readable, %d skipped (%s)",
        root,
        len(class_names),
        len(candidates),
        len(paths),
        index.num_skipped,
        detail,
    )
    return index
