"""Writes prepared shards: the paper's preprocessing done once (`--mode=prepare`).

The paper resized every training image to 256 once, before training (Sec. 3); zf-tf otherwise
decodes each original photograph on every epoch. `prepare` reads any source (an image folder,
any tfds dataset, `imagenet2012`, the embedded dataset), and writes for each split every
image's S x S center square (shorter side resized to S = `data.resize_size`, exactly as the
pipelines' `preprocess.center_square_uint8`) in TFRecord shards, in one of ENCODINGS:
  jpeg  re-encoded JPEG (quality a field; 4:4:4): about 28 KB per 256 px square at quality
        90; a training crop decodes just its s x s window;
  raw   the uint8 pixels themselves (`tf.io.serialize_tensor`, read back by
        `preprocess.decode_rgb`): exact, 192 KB per 256 px square (7x the disk), and no
        decoding at all: for hosts whose cores cannot keep up with JPEG decoding.
The source 'prepared' reads them (zf_tf/pipelines/prepared.py, which describes the folder's
layout and how a run checks it).

Work is parallel (decode, resize and encode run in tf.data's threads, one image per core),
shows a progress bar, and resumes after a kill: shards are written in order, each to a
temporary file renamed when complete, and the progress file records the finished ones, so
a rerun continues with the unfinished shards; a failure removes the shard's temporary.
Images that fail to decode are skipped and counted. Damaged shards of a finished split
(`prepared.damaged_shards`) are rewritten alone, the intact ones kept.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re

import ml_collections
import tensorflow as tf
import tqdm
from absl import logging

from zf_tf.configs import check_section
from zf_tf.pipelines import DataError, inputs, prepared, preprocess, write_json

FORMAT = 1
ENCODINGS = ("jpeg", "raw")
# config.prepare fields with a range: (field, what it must be, test), checked by check_config.
RANGES = (
    ("jpeg_quality", "in 1..100", lambda v: 1 <= v <= 100),
    ("shard_size", ">= 1", lambda v: v >= 1),
)


def check_config(prepare_config) -> None:
    """Checks `config.prepare` before anything runs: the encoding and the fields of RANGES.

    Raises:
      DataError: one line naming the first bad field and its valid values.
    """
    check_section(prepare_config, "prepare", DataError, (("encoding", ENCODINGS),), RANGES)


def _slug(split: str) -> str:
    """A split name ('train', 'train[:10%]', 'train+validation') as a file-name prefix."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{_slug(split)}-{index:05d}-of-{count:05d}.tfrecord"


def encoded_square(encoded, resize_size: int, encoding: str, quality: int) -> tf.Tensor:
    """An image's S x S center square (`preprocess.center_square_uint8`) as the bytes a
    prepared shard holds: a JPEG (4:4:4, no chroma subsampling: half the error of 4:2:0 at
    a quarter more bytes), or (`encoding` 'raw') the pixels as a serialized tensor."""
    square = preprocess.center_square_uint8(encoded, resize_size)
    if encoding == "raw":
        return tf.io.serialize_tensor(square)
    return tf.io.encode_jpeg(square, quality=int(quality), chroma_downsampling=False)


def _with_encoding(recipe: dict) -> dict:
    """A recipe (prepared.json or a progress file's) with its encoding: 'jpeg' in those
    written before raw squares existed."""
    return {**recipe, "encoding": recipe.get("encoding", "jpeg")} if recipe else recipe


def _source(data) -> dict:
    """What identifies the images a split is prepared from (resuming checks it)."""
    keys = ("source", "name", "tfds_config", "folder", "manual_dir", "image_key", "label_key")
    return {k: data.get(k, "") for k in keys}


def _example(image: bytes, label: int) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def prepare(
    data,
    out_dir: str,
    splits,
    jpeg_quality: int = 90,
    shard_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    encoding: str = "jpeg",
) -> dict:
    """Writes the prepared shards of `splits` of the source `data` into `out_dir`.

    Args:
      data: the `config.data` of the source (any source but 'prepared'); `resize_size` is S.
      out_dir: the prepared folder (created); a split already finished there with the
        same recipe is kept, an unfinished one is resumed.
      splits: split names of the source.
      jpeg_quality: 1..100, of the re-encoded squares (encoding 'jpeg').
      shard_size: images per shard.
      overwrite: discard a split prepared (or begun) with another recipe, instead of
        refusing.
      progress: show a progress bar per split.
      encoding: one of ENCODINGS (module doc).

    Returns:
      The prepared.json contents.

    Raises:
      DataError: a bad argument, or `out_dir` holds a split prepared another way.
    """
    _check_arguments(data, jpeg_quality, shard_size, encoding)
    source = ml_collections.ConfigDict(data.to_dict())
    source.classes = ()  # every class, original labels
    for split in splits:  # every split exists before anything is written
        inputs.check_split(source, split)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(stale)  # a shard or JSON cut short by a kill
    meta_path = os.path.join(out_dir, prepared.METADATA)
    meta = _with_encoding(prepared.read_json(meta_path) or {})
    common = {
        "format": FORMAT,
        "resize_size": int(data.resize_size),
        "encoding": encoding,
        "jpeg_quality": int(jpeg_quality) if encoding == "jpeg" else None,
        "shard_size": int(shard_size),
        "source": _source(data),
    }
    if meta and {k: meta.get(k) for k in common} != common:
        if not overwrite:
            changed = [k for k in common if meta.get(k) != common[k]]
            raise DataError(
                f"{out_dir} was prepared with another {', '.join(changed)}: use another "
                "config.data.prepared_dir, or --overwrite to prepare it again"
            )
        for f in glob.glob(os.path.join(out_dir, "*.tfrecord")) + glob.glob(
            os.path.join(out_dir, "*.progress.json")
        ):
            os.remove(f)
        meta = {}
    meta = {
        **common,
        "class_names": inputs.class_names(source),
        "num_classes": int(data.num_classes),
        "splits": meta.get("splits", {}),
    }
    for split in splits:
        info = meta["splits"].get(split)
        bad = dict(prepared.damaged_shards(out_dir, info)) if info else {}
        if info and not bad:
            print(f"{split}: already prepared in {out_dir} ({info['examples']})")
            continue
        kept = _intact_shards(source, split, out_dir, info, bad) if info else None
        meta["splits"][split] = _prepare_split(
            source, split, out_dir, common, progress and tqdm.tqdm, kept
        )
        write_json(meta_path, meta)
        os.remove(os.path.join(out_dir, f"{_slug(split)}.progress.json"))
    return meta


def _check_arguments(data, jpeg_quality, shard_size, encoding) -> None:
    """Raises DataError, naming the field, unless `prepare` can write these shards."""
    if data.source == "prepared":
        raise DataError(
            "--mode=prepare reads the original images: set config.data.source to "
            f"{', '.join(s for s in inputs.SOURCES if s != 'prepared')}"
        )
    if encoding not in ENCODINGS:
        raise DataError(
            f"config.prepare.encoding={encoding!r}: choose one of {', '.join(ENCODINGS)}"
        )
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"config.prepare.jpeg_quality={jpeg_quality} must be in 1..100")
    if int(shard_size) < 1:
        raise DataError(f"config.prepare.shard_size={shard_size} must be >= 1")


def _intact_shards(source, split: str, out_dir: str, info: dict, bad: dict) -> list:
    """The entries (`files`) of the intact shards of a finished split (its prepared.json
    entry `info`) whose shards `bad` are damaged: those are rewritten, the others kept.

    Raises:
      DataError: the damaged shards cannot be rewritten alone (sizes not recorded, or the
        source has another number of images now).
    """
    if any(e[4] is None for e in info.get("files", [[None] * 5])):
        raise DataError(
            f"{out_dir}: {split} was prepared before shard sizes were recorded and "
            f"{len(bad)} shard(s) are missing: prepare it again with --overwrite"
        )
    then, now = sum(e[1] + e[2] for e in info["files"]), inputs.num_examples(source, split)
    if then != now:
        raise DataError(
            f"{out_dir}: {split} was prepared from {then} images but its source has "
            f"{now} now, so its damaged shards cannot be rewritten alone: prepare it "
            "again with --overwrite"
        )
    print(f"{split}: rewriting {len(bad)} damaged shard(s): {', '.join(bad)}")
    return [e for e in info["files"] if e[0] not in bad]


def _prepare_split(source, split: str, out_dir: str, recipe: dict, bar, kept=None) -> dict:
    """Writes the shards of one split that are not done yet, each through a temporary that
    is renamed when complete (removed on any failure), recording each finished one in the
    split's progress file; returns the split's prepared.json entry.

    Args:
      kept: for a repair, the entries (`files`) of the finished split's shards that are
        intact: only the others are written. None: the progress file says which are done.
    """
    total = inputs.num_examples(source, split)
    size = recipe["shard_size"]
    count = max(1, -(-total // size))
    progress_path = os.path.join(out_dir, f"{_slug(split)}.progress.json")
    if kept is not None:
        state = {"recipe": recipe, "total": total, "shards": [list(e) for e in kept]}
    else:
        state = prepared.read_json(progress_path)
        if state is not None:
            state["recipe"] = _with_encoding(state.get("recipe") or {})
        if state is None or state.get("recipe") != recipe or state.get("total") != total:
            state = {"recipe": recipe, "total": total, "shards": []}
    # [file, written, skipped, class counts, bytes] of each finished shard
    done = {entry[0] for entry in state["shards"]}
    todo = [k for k in range(count) if shard_name(split, k, count) not in done]
    S, encoding, quality = recipe["resize_size"], recipe["encoding"], recipe["jpeg_quality"]
    progress = None
    if bar:
        initial = total - sum(min(total, (k + 1) * size) - k * size for k in todo)
        progress = bar(total=total, initial=initial, desc=f"prepare {split}", unit="img")
    with progress or contextlib.nullcontext():
        for k in todo:
            span = min(total, (k + 1) * size) - k * size
            ds = inputs.encoded_records(source, split).skip(k * size).take(span)
            ds = ds.map(
                lambda e, y: (encoded_square(e, S, encoding, quality), y),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            ).ignore_errors()  # undecodable images: counted as span - written
            name = shard_name(split, k, count)
            path = os.path.join(out_dir, name)
            counts: dict[str, int] = {}
            try:
                with tf.io.TFRecordWriter(path + ".tmp") as writer:
                    for image, label in ds.prefetch(64).as_numpy_iterator():
                        writer.write(_example(image, label))
                        counts[str(int(label))] = counts.get(str(int(label)), 0) + 1
                        if progress:
                            progress.update(1)
                os.replace(path + ".tmp", path)
            except BaseException:  # a full disk, a kill turned exception: no temporary stays
                with contextlib.suppress(OSError):
                    os.remove(path + ".tmp")
                raise
            written = sum(counts.values())
            if progress:
                progress.update(span - written)
            state["shards"].append([name, written, span - written, counts, os.path.getsize(path)])
            write_json(progress_path, state)
    shards = sorted(state["shards"])
    class_counts: dict[str, int] = {}
    for entry in shards:
        for label, n in entry[3].items():
            class_counts[label] = class_counts.get(label, 0) + n
    written, skipped = sum(e[1] for e in shards), sum(e[2] for e in shards)
    unreadable = ""
    index_skipped = inputs.source(source).num_unreadable(source, split)  # before preparing
    if index_skipped:
        unreadable = f"; the folder's index skipped {index_skipped} unreadable file(s)"
    message = f"{split}: {written} images in {count} shard(s), {skipped} undecodable{unreadable}"
    (logging.warning if skipped else logging.info)("Prepared %s", message)
    print(message)
    return {
        "examples": written,
        "skipped": skipped,
        "class_counts": class_counts,
        "shards": [e[0] for e in shards],
        "files": [e if len(e) == 5 else [*e[:4], None] for e in shards],
    }
