"""Prepared shards: the paper's preprocessing done once (`--mode=prepare`).

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
Training and evaluation then read it with `config.data.source = "prepared"` and
`config.data.prepared_dir`: the 10-crop geometry is unchanged (a crop of the S x S square),
and a training crop decodes just its s x s window (`crop_of_prepared`).

Layout of a prepared folder:
  prepared.json                    resize size, encoding, JPEG quality, shard size, source, class
                                   names, and per finished split its examples, per-class
                                   counts, skipped images and shard files, with each shard's
                                   examples, skipped images, class counts and size in bytes
  <split>-00000-of-00040.tfrecord  tf.train.Example {image: JPEG or pixel bytes, label: int64}
  <split>.progress.json            while a split is written: shards done (the resume point)

Work is parallel (decode, resize and encode run in tf.data's threads, one image per core),
shows a progress bar, and resumes after a kill: shards are written in order, each to a
temporary file renamed when complete, and the progress file records the finished ones, so
a rerun continues with the unfinished shards; a failure removes the shard's temporary.
Images that fail to decode are skipped and counted.

Every run that reads a prepared folder first checks its shards against prepared.json
(`verify`, through `inputs.check_source`, before anything is written): a missing shard, or
one whose size differs from what was written, is named with the `--mode=prepare` command that
rewrites just the damaged shards (`repair_command`; the intact ones are kept). A shard
altered without a change of size is caught when read, by TFRecord's per-record checksums:
reading that shard stops at the record, and one line names the shard, how many of its
records were lost and the command that rewrites it (`records`); the evaluation also counts
the images it misses as skipped.

Labels are the source's original ids (every class is prepared; `data.classes` selects at
read time, as for the other sources).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys

import ml_collections
import tensorflow as tf
from absl import logging

from zf_tf.pipelines import DataError, preprocess, write_json

METADATA = "prepared.json"
FORMAT = 1
ENCODINGS = ("jpeg", "raw")
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def _slug(split: str) -> str:
    """A split name ('train', 'train[:10%]', 'train+validation') as a file-name prefix."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{_slug(split)}-{index:05d}-of-{count:05d}.tfrecord"


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        raise DataError(f"{path} is damaged (not JSON): delete it and prepare again") from None


def metadata(data) -> dict:
    """The prepared.json of `data.prepared_dir`, checked against the config.

    Raises:
      DataError: no prepared folder there, or it was prepared at another resize size.
    """
    root = data.get("prepared_dir", "")
    if not root:
        raise DataError(
            "config.data.source='prepared' needs config.data.prepared_dir=DIR (a folder "
            "written by --mode=prepare)"
        )
    meta = _read_json(os.path.join(root, METADATA))
    if meta is None or not meta.get("splits"):
        raise DataError(
            f"{root} holds no prepared split: run --mode=prepare with "
            f"--config.data.prepared_dir={root} first"
        )
    if int(meta["resize_size"]) != int(data.resize_size):
        raise DataError(
            f"{root} was prepared at resize size {meta['resize_size']} but "
            f"config.data.resize_size={data.resize_size}: set --config.data.resize_size="
            f"{meta['resize_size']}, or prepare again into another folder"
        )
    return meta


def split_info(data, split: str) -> dict:
    """The prepared.json entry of one split: examples, class_counts, skipped, shards."""
    meta = metadata(data)
    if split not in meta["splits"]:
        raise DataError(
            f"unknown split {split!r} in {data.prepared_dir}: valid splits: "
            f"{', '.join(meta['splits'])}"
        )
    return meta["splits"][split]


def records(data, split: str, shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
    """(encoded S x S square, int64 original label) pairs of a prepared split;
    in split order, or (training) shards in a seeded random order, read interleaved.

    A shard whose record fails its checksum (altered on disk without a change of size, so
    `verify` passed it) ends at that record: the shortfall is counted against the record
    count prepared.json holds and reported on stderr in one line naming the shard and the
    command that rewrites it, each time the shard is read (`_shard_records`)."""
    meta = metadata(data)
    info = split_info(data, split)
    files = [os.path.join(data.prepared_dir, f) for f in info["shards"]]
    written = {e[0]: e[1] for e in info.get("files", ())}  # absent before format 1's sizes
    expected = [written.get(f, -1) for f in info["shards"]]
    repair = repair_command(data.prepared_dir, meta, [split])
    shard = lambda path, n: _shard_records(path, n, repair)  # noqa: E731
    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(expected, tf.int64)))
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed).interleave(
            shard,
            cycle_length=min(8, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
    else:
        ds = ds.flat_map(shard)
    return ds.map(
        lambda r: tuple(tf.io.parse_single_example(r, _FEATURES).values()),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _shard_records(path, expected, repair: str) -> tf.data.Dataset:
    """The records of one shard. TFRecord cannot resynchronize after a record that fails
    its checksum, so reading ends there; when fewer than `expected` (>= 0) records came,
    one line on stderr says how many, which file, and `repair` (in-graph `tf.print`, so
    it also speaks from a tf.data service worker)."""
    ends = tf.data.Dataset.from_tensors((tf.constant(b""), True))  # a marker after the last
    tagged = tf.data.TFRecordDataset(path).ignore_errors().map(lambda r: (r, False))

    def count(n, item):
        def report():
            line = tf.strings.join([
                "WARNING: prepared shard ", path, ": only ", tf.strings.as_string(n), " of ",
                tf.strings.as_string(expected), " records are readable (a record fails its "
                f"checksum; the rest of the shard is skipped): delete it and run {repair}",
            ])  # fmt: skip
            with tf.control_dependencies([tf.print(line, output_stream=sys.stderr)]):
                return tf.identity(n)

        short = tf.logical_and(item[1], n < expected)
        return tf.cond(short, report, lambda: n) + 1, item

    return (
        tagged.concatenate(ends)
        .scan(tf.constant(0, tf.int64), count)
        .filter(lambda record, last: tf.logical_not(last))
        .map(lambda record, last: record)
    )


def crop_of_prepared(encoded, crop_index, resize_size: int, crop_size: int, pixels):
    """Crop `crop_index` (0..9, as `preprocess.train_crop`) of a prepared S x S square: of
    a JPEG only its s x s window is decoded, raw pixels are sliced; no resize (the square
    already is S x S). float32, normalized by `pixels`; uint8 0..255 when `pixels` is None."""
    crop_index = tf.convert_to_tensor(crop_index, tf.int32)

    def raw():  # the square's own pixels (`preprocess.decode_rgb` reads them)
        square = preprocess.decode_rgb(encoded)
        return preprocess.crop_of_square(square, crop_index, resize_size, crop_size, None)

    def jpeg():
        y, x = tf.unstack(preprocess.square_offset(crop_index, resize_size, crop_size))
        window = tf.stack([y, x, crop_size, crop_size])
        crop = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        return preprocess.mirrored(crop, crop_index)

    crop = tf.cond(preprocess.is_pixel_tensor(encoded), raw, jpeg)
    crop.set_shape([crop_size, crop_size, 3])
    return preprocess.finish(crop, pixels)


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
    import tqdm

    from zf_tf.pipelines import inputs

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
    source = ml_collections.ConfigDict(data.to_dict())
    source.classes = ()  # every class, original labels
    for split in splits:  # every split exists before anything is written
        inputs.check_split(source, split)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(stale)  # a shard or JSON cut short by a kill
    meta_path = os.path.join(out_dir, METADATA)
    meta = _with_encoding(_read_json(meta_path) or {})
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
        kept = None
        if split in meta["splits"]:
            info = meta["splits"][split]
            bad = dict(damaged_shards(out_dir, info))
            if not bad:
                print(f"{split}: already prepared in {out_dir} ({info['examples']})")
                continue
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
            kept = [e for e in info["files"] if e[0] not in bad]
        meta["splits"][split] = _prepare_split(
            source, split, out_dir, common, progress and tqdm.tqdm, kept
        )
        write_json(meta_path, meta)
        os.remove(os.path.join(out_dir, f"{_slug(split)}.progress.json"))
    return meta


def _prepare_split(source, split: str, out_dir: str, recipe: dict, bar, kept=None) -> dict:
    """Writes the shards of one split that are not done yet, each through a temporary that
    is renamed when complete (removed on any failure), recording each finished one in the
    split's progress file; returns the split's prepared.json entry.

    Args:
      kept: for a repair, the entries (`files`) of the finished split's shards that are
        intact: only the others are written. None: the progress file says which are done.
    """
    from zf_tf.pipelines import inputs

    total = inputs.num_examples(source, split)
    size = recipe["shard_size"]
    count = max(1, -(-total // size))
    progress_path = os.path.join(out_dir, f"{_slug(split)}.progress.json")
    if kept is not None:
        state = {"recipe": recipe, "total": total, "shards": [list(e) for e in kept]}
    else:
        state = _read_json(progress_path)
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
    if source.source == "folder":  # files the folder's index left out before preparing
        index_skipped = inputs.folder_index(source, split).num_skipped
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


def damaged_shards(root: str, info: dict) -> list[tuple[str, str]]:
    """(shard file, what is wrong) for each shard of a prepared split (its prepared.json
    entry `info`) that is missing or whose size differs from the one recorded when it was
    written (truncated or altered). Splits prepared before sizes were recorded are checked
    for missing shards only."""
    sizes = {e[0]: e[4] for e in info.get("files", ())}
    out = []
    for name in info["shards"]:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            out.append((name, "missing"))
        elif sizes.get(name) is not None and os.path.getsize(path) != sizes[name]:
            out.append((name, f"{os.path.getsize(path)} bytes, written with {sizes[name]}"))
    return out


def repair_command(root: str, meta: dict, splits) -> str:
    """The --mode=prepare command that rewrites the damaged shards of `splits` of the
    prepared folder `root` (only those: the intact ones are kept)."""
    src = meta.get("source", {})
    args = [f"--config.data.source={src.get('source', '')}"]
    for key in ("name", "tfds_config", "folder", "manual_dir"):
        if src.get(key) and (key != "name" or src.get("source") == "tfds"):
            args.append(f"--config.data.{key}={src[key]}")
    args += [
        f"--config.data.resize_size={meta['resize_size']}",
        f"--config.data.crop_size={meta['resize_size']}",  # any crop that fits: not prepared
        f"--config.data.num_classes={meta.get('num_classes', len(meta.get('class_names', [])))}",
        f"--config.prepare.encoding={meta.get('encoding', 'jpeg')}",
        f"--config.prepare.shard_size={meta['shard_size']}",
        f"--config.prepare.splits={','.join(splits)}",
        f"--config.data.prepared_dir={root}",
    ]
    if meta.get("jpeg_quality"):
        args.append(f"--config.prepare.jpeg_quality={meta['jpeg_quality']}")
    return "python main.py --mode=prepare " + " ".join(args)


def verify(data, splits) -> None:
    """Checks the shards of the prepared `splits` (those prepared.json has) against it
    before a run reads them: cheap (file sizes, no reading).

    Raises:
      DataError: naming each missing, truncated or altered shard and the command that
        rewrites just those.
    """
    meta = metadata(data)
    root = data.prepared_dir
    problems, damaged_splits = [], []
    for split in dict.fromkeys(splits):
        if split not in meta["splits"]:
            continue  # split_info names the valid splits when it is read
        bad = damaged_shards(root, meta["splits"][split])
        problems += [f"{name} ({why})" for name, why in bad]
        damaged_splits += [split] if bad else []
    if problems:
        raise DataError(
            f"{root}: {len(problems)} prepared shard(s) damaged: {'; '.join(problems[:5])}"
            f"{'; ...' if len(problems) > 5 else ''}. Rewrite just those with: "
            f"{repair_command(root, meta, damaged_splits)}"
        )
