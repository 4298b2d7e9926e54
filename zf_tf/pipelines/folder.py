"""An image folder in ImageNet layout: `root/<class>/<file>.{jpg,jpeg,png,...}`, or a flat
folder of unlabeled images `root/<file>` (label UNLABELED, for the modes that need no labels).

Classes are the sorted subfolder names. Files are checked when the folder is first indexed,
in two steps, and every unusable file is skipped and counted in one log line (by reason), so
a bad file never crashes a run:
1. cheaply, in parallel threads, from each file's first and last bytes: empty files, files
   that are no known image format ('corrupt'), JPEG/PNG files cut short ('truncated', no
   end marker), image formats TensorFlow cannot decode ('unsupported .tif');
2. by decoding the files that pass with TensorFlow itself (JPEG at 1/8 scale: every
   entropy-coded byte is still read), in parallel with tf.data: 'undecodable'.
Both verdicts are remembered per file (path, size, modification time) in
`cache_dir()/file-checks/`, so a folder's files are opened once, not on every run: a later
run only lists the tree and stats each file (`file_checks`). Within one process the whole
index is kept per folder (`indexed`), so the pipelines, `num_examples` and the analyses of a
run list the tree once.
Files with other extensions are ignored and counted by extension in the same line. The
pipelines still drop a file that fails to decode later (changed since it was indexed).

The pipelines read a folder as the source 'folder' (`FolderSource`, `config.data.folder`):
a split is root/<split>/<class>/ where the folder has split subfolders, else a seeded
1 in 10 of root/<class>/ is held out as 'validation' (`split_files`); `check_layout` checks
the tree before training.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys

import tensorflow as tf
from absl import logging

from zf_tf.pipelines import DataError, sources, write_json

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Image formats tf.io.decode_image cannot read: skipped and counted, never dropped silently.
UNSUPPORTED = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ico", ".psd", ".svg")
UNLABELED = -1  # the label of every image of a flat folder
# Fraction of a folder's images held out as the 'validation' split when the folder has
# no split subfolders (root/train/<class>, root/validation/<class>).
VALIDATION_FRACTION = 0.1
_TAIL = 1024  # bytes at the end of a file searched for the end marker

_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
    b"RIFF": "webp",  # RIFF <size> WEBP
}


@dataclasses.dataclass
class FolderIndex:
    """Readable files of an image folder with their labels, and what was skipped."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    # reason ('empty', 'corrupt', 'truncated', 'undecodable', 'unsupported .tif') -> paths
    skipped: dict[str, list[str]]
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)  # other files by ext

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
    if kind is None or (kind == "webp" and head[8:12] != b"WEBP"):
        return "corrupt"
    # Entropy-coded JPEG data never contains FF D9 (FF is stuffed), so a JPEG whose tail
    # lacks the EOI marker was cut short; likewise a PNG without its IEND chunk.
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated"
    if kind == "png" and b"IEND" not in tail:
        return "truncated"
    return None


def cache_dir() -> str:
    """Where zf_tf remembers what it learned about files: $ZF_TF_CACHE_DIR, else
    $XDG_CACHE_HOME/zf_tf, else ~/.cache/zf_tf."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("ZF_TF_CACHE_DIR") or os.path.join(base, "zf_tf")


def _decodes(paths: list[str]) -> list[bool]:
    """Whether TensorFlow decodes each file (JPEG at 1/8 scale, the rest in full), in
    parallel with tf.data."""

    def probe(i, path):
        data = tf.io.read_file(path)
        is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
        shape = tf.cond(
            is_jpeg,
            lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
            lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False)),
        )
        return i, tf.reduce_prod(shape) > 0

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).enumerate()
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ok = [False] * len(paths)
    with _libjpeg_muted():
        for i, good in ds.batch(1024).as_numpy_iterator() if paths else ():
            for j, g in zip(i, good):
                ok[j] = bool(g)
    return ok


@contextlib.contextmanager
def _libjpeg_muted():
    """libjpeg prints a line per broken file ("Corrupt JPEG data: ...") straight to stderr;
    the index's own line counts those files, so below INFO logging (main.py's quiet console)
    stderr is muted while they are decoded."""
    if logging.level_info():
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_file(root: str) -> str:
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()
    return os.path.join(cache_dir(), "file-checks", digest + ".json")


def file_checks(root: str, paths: list[str], max_workers: int = 16) -> list[str | None]:
    """Why each file is unusable ('empty', 'corrupt', 'truncated', 'undecodable') or None.

    Both checks (`check_file`, then decoding the files that pass, `_decodes`) run only for
    files not seen before: each verdict is remembered with the file's size and modification
    time in one JSON file per folder under `cache_dir()/file-checks/`, so a folder that did
    not change costs one `stat` per file (in parallel threads) and no reads. A cache that
    cannot be read or written only costs time.
    """
    cache = _cache_file(root)
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    base = os.path.abspath(root)
    keys = [os.path.relpath(os.path.abspath(p), base) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        stamps = list(pool.map(_stamp, paths))
        todo = [
            i
            for i, (k, st) in enumerate(zip(keys, stamps))
            if st is None or (known.get(k) or [None])[:2] != st
        ]
        problems = list(pool.map(check_file, [paths[i] for i in todo]))
    passed = [i for i, problem in zip(todo, problems) if not problem]
    decoded = dict(zip(passed, _decodes([paths[i] for i in passed]) if passed else []))
    for i, problem in zip(todo, problems):
        problem = problem or (None if decoded[i] else "undecodable")
        known[keys[i]] = (stamps[i] or [-1, -1]) + [problem]
    if todo:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            write_json(cache, {k: known[k] for k in keys})
        except OSError as e:
            logging.info("File checks of %s not cached (%s)", root, e)
    return [known[k][2] for k in keys]


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "(none)"


def _class_dirs(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def index_folder(root: str, max_workers: int = 16) -> FolderIndex:
    """Lists and checks the images of a class-subfolder tree (or of a flat folder).

    Args:
      root: folder holding one subfolder per class, or the images themselves.
      max_workers: threads that stat and cheaply check the files.

    Returns:
      A FolderIndex sorted by (class, file name).

    Raises:
      FileNotFoundError: `root` is missing or holds no images (directly or in class
        subfolders).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    class_names = _class_dirs(root)
    listed = []  # (path, label) of every file
    for label, name in enumerate(class_names):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            listed.extend((os.path.join(dirpath, f), label) for f in sorted(files))
    if not any(_extension(p) in EXTENSIONS + UNSUPPORTED for p, _ in listed):
        class_names = []  # a flat folder of unlabeled images
        listed = [
            (os.path.join(root, f), UNLABELED)
            for f in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, f))
        ]
    candidates = [(p, y) for p, y in listed if _extension(p) in EXTENSIONS]
    unsupported = [p for p, _ in listed if _extension(p) in UNSUPPORTED]
    if not candidates:
        raise FileNotFoundError(
            f"no images ({', '.join(EXTENSIONS)}) in {root} or in class subfolders of it"
        )
    problems = file_checks(root, [p for p, _ in candidates], max_workers)
    skipped = collections.defaultdict(list)
    paths, labels = [], []
    for (path, label), problem in zip(candidates, problems):
        if problem:
            skipped[problem].append(path)
        else:
            paths.append(path)
            labels.append(label)
    for path in unsupported:
        skipped[f"unsupported {_extension(path)}"].append(path)
    ignored = collections.Counter(
        _extension(p)
        for p, _ in listed
        if _extension(p) not in EXTENSIONS + UNSUPPORTED and not os.path.basename(p).startswith(".")
    )
    index = FolderIndex(paths, labels, class_names, dict(skipped), dict(sorted(ignored.items())))
    detail = ", ".join(f"{len(v)} {k}" for k, v in sorted(index.skipped.items())) or "none"
    others = ", ".join(f"{n} {ext}" for ext, n in index.ignored.items())
    log = logging.warning if index.num_skipped else logging.info  # skips always show
    log(
        "Image folder %s: %d classes, %d image files, %d readable, %d skipped (%s)%s",
        root,
        len(class_names),
        len(candidates) + len(unsupported),
        len(paths),
        index.num_skipped,
        detail,
        f"; other files ignored: {others}" if others else "",
    )
    return index


@functools.lru_cache(maxsize=16)
def indexed(root: str) -> FolderIndex:
    """`index_folder(root)`, once per process per folder: every pipeline build, split count
    and analysis of a run shares it. `indexed.cache_clear()` forgets (a folder changed)."""
    return index_folder(root)


def _indexed_root(root: str, split: str) -> str:
    """The folder a split's index is of: root/<split>/ if present, else root."""
    split_root = os.path.join(root, split)
    return split_root if os.path.isdir(split_root) else root


@functools.lru_cache(maxsize=8)
def split_files(root: str, split: str) -> tuple[list[str], list[int]]:
    """(paths, labels) of a folder split: root/<split>/<class> if present, else a
    deterministic every-Nth hold-out of root/<class> as 'validation'; a flat folder of
    unlabeled images is every split (labels UNLABELED)."""
    indexed_root = _indexed_root(root, split)
    index = indexed(indexed_root)
    if indexed_root != root or not index.labeled:  # a split folder, or a flat folder:
        return index.paths, index.labels  # every image of it
    every = int(round(1 / VALIDATION_FRACTION))
    held_out = [i % every == every - 1 for i in range(len(index.paths))]
    keep = [h == (split != "train") for h in held_out]
    return (
        [p for p, k in zip(index.paths, keep) if k],
        [y for y, k in zip(index.labels, keep) if k],
    )


def forget() -> None:
    """Drops the in-process folder indexes (after files were added, removed or changed)."""
    split_files.cache_clear()
    indexed.cache_clear()


def check_layout(data) -> None:
    """Checks an image folder for training before anything is written: class subfolders
    (root/<class>/ or root/<split>/<class>/ for the train and eval splits), each holding
    images, at least 2 of them, as many as `data.num_classes` (or `data.classes` keeps).

    Raises:
      DataError: one line naming the folder and what to change.
    """
    root = data.folder
    if not os.path.isdir(root):
        raise DataError(f"config.data.folder={root}: no such folder")
    splits = [data.train_split, data.eval_split]
    present = [s for s in splits if os.path.isdir(os.path.join(root, s))]
    if present and len(present) != len(splits):
        missing = next(s for s in splits if s not in present)
        raise DataError(
            f"{root} has {present[0]}/ but no {missing}/: add {os.path.join(root, missing)}/"
            f"<class>/ images, or put the classes directly in {root}/<class>/ (then a seeded "
            f"1 in {int(round(1 / VALIDATION_FRACTION))} of each is held out)"
        )
    roots = [os.path.join(root, s) for s in present] or [root]
    counts = []
    for r in roots:
        classes = _class_dirs(r)
        if not classes:
            raise DataError(f"{r} has no class subfolders: training needs {r}/<class>/ images")
        for c in classes:
            path = os.path.join(r, c)
            if not any(f.lower().endswith(EXTENSIONS) for _, _, fs in os.walk(path) for f in fs):
                raise DataError(f"class folder {path} holds no images ({', '.join(EXTENSIONS)})")
        counts.append(len(classes))
    if len(set(counts)) > 1:
        raise DataError(
            f"{roots[0]} has {counts[0]} class folders but {roots[1]} has {counts[1]}: "
            "the splits must have the same classes"
        )
    if counts[0] < 2:
        raise DataError(f"{roots[0]} has 1 class folder: a classifier needs at least 2")
    selected = sources.selected_classes(data)
    wanted = len(selected) or int(data.num_classes)
    if not selected and counts[0] != wanted:
        raise DataError(
            f"{roots[0]} has {counts[0]} class folders but config.data.num_classes={wanted}: "
            f"set --config.data.num_classes={counts[0]}"
        )


class FolderSource(sources.Source):
    """Source 'folder': the images under `data.folder` (module doc), read as files."""

    def records(self, data, split, shuffle_files=False, seed=0):
        paths, labels = split_files(data.folder, split)
        classes = sources.selected_classes(data)
        if classes:  # selected before any file is read
            keep = [i for i, y in enumerate(labels) if y in classes]
            paths = [paths[i] for i in keep]
            labels = [classes.index(labels[i]) for i in keep]
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int64))
        )
        return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)

    def num_examples(self, data, split):
        """Readable files of the split (of the selected classes)."""
        labels = split_files(data.folder, split)[1]
        classes = sources.selected_classes(data)
        return sum(y in classes for y in labels) if classes else len(labels)

    def class_names(self, data):
        root = data.folder
        if os.path.isdir(os.path.join(root, data.train_split)):
            root = os.path.join(root, data.train_split)
        return _class_dirs(root)

    def splits(self, data):
        return ["train", "validation"]

    def labeled(self, data, split):
        labels = split_files(data.folder, split)[1]
        return not labels or labels[0] != UNLABELED

    def num_unreadable(self, data, split):
        return indexed(_indexed_root(data.folder, split)).num_skipped

    def check(self, data, splits):
        for split in dict.fromkeys(splits):
            self.check_split(data, split)

    def check_layout(self, data):
        check_layout(data)
