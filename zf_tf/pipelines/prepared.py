"""Source 'prepared': shards of S x S squares that `--mode=prepare` wrote once
(zf_tf/pipelines/prepare.py) into `config.data.prepared_dir`; this module reads them.

Training and evaluation read a prepared folder with `config.data.source = "prepared"` and
`config.data.prepared_dir`: the 10-crop geometry is unchanged (a crop of the S x S square),
and a training crop decodes just its s x s window (`crop_of_prepared`; raw squares are
sliced).

Layout of a prepared folder:
  prepared.json                    resize size, encoding, JPEG quality, shard size, source, class
                                   names, and per finished split its examples, per-class
                                   counts, skipped images and shard files, with each shard's
                                   examples, skipped images, class counts and size in bytes
  <split>-00000-of-00040.tfrecord  tf.train.Example {image: JPEG or pixel bytes, label: int64}
  <split>.progress.json            while a split is written: shards done (the resume point)

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

import json
import os
import sys

import tensorflow as tf

from zf_tf.pipelines import DataError, preprocess, sources

METADATA = "prepared.json"
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def read_json(path: str):
    """The JSON in `path`; None if there is no such file.

    Raises:
      DataError: the file is not JSON.
    """
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
    root = data.prepared_dir
    if not root:
        raise DataError(
            "config.data.source='prepared' needs config.data.prepared_dir=DIR (a folder "
            "written by --mode=prepare)"
        )
    meta = read_json(os.path.join(root, METADATA))
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


class PreparedSource(sources.Source):
    """Source 'prepared': the shards of `data.prepared_dir` (module doc)."""

    def records(self, data, split, shuffle_files=False, seed=0):
        ds = records(data, split, shuffle_files, seed=int(seed))
        return sources.select_classes(ds, sources.selected_classes(data))

    def crop(self, encoded, crop_index, resize_size, crop_size, pixels):
        return crop_of_prepared(encoded, crop_index, resize_size, crop_size, pixels)

    def num_examples(self, data, split):
        info = split_info(data, split)
        counts, classes = info["class_counts"], sources.selected_classes(data)
        return sum(counts.get(str(c), 0) for c in classes) if classes else int(info["examples"])

    def class_names(self, data):
        return list(metadata(data)["class_names"])

    def splits(self, data):
        return list(metadata(data)["splits"])

    def check(self, data, splits):
        verify(data, splits)
        for split in dict.fromkeys(splits):
            self.check_split(data, split)
