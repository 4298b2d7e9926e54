"""Per-replica tf.data input pipelines for every data source.

    build_inputs(config, split, input_context, mode)

is a pure function of (config, split) meant for
`strategy.distribute_datasets_from_function`. Order: read encoded records ->
shard by input context -> shuffle -> decode + crop/flip -> batch (drop_remainder for
training) -> normalize -> prefetch; training leaves normalizing to its device
(`normalize=False`). With `config.data.cache` (small datasets) each
image is decoded once into its S x S center square, cached, and only sliced afterwards.
Pixels are normalized as `config.data.preprocessing` says (`preprocess.Pixels`).

Sources (`config.data.source`), each a `sources.Source` in its own module, named in REGISTRY:
- 'embedded': the generated `zf_shapes` tfds dataset (zf_tf/pipelines/embedded.py), no download;
- 'tfds': any tfds image-classification dataset by `config.data.name`, for example
  `imagenet2012` prepared from `config.data.manual_dir` (zf_tf/pipelines/tfds_source.py);
- 'folder': class subfolders of JPEG/PNG files under `config.data.folder`
  (zf_tf/pipelines/folder.py);
- 'prepared': shards written once by `--mode=prepare` (zf_tf/pipelines/prepare.py) from any
  of the above into `config.data.prepared_dir` (zf_tf/pipelines/prepared.py): S x S center
  squares, re-encoded.
Images always arrive as encoded bytes so that decoding can be limited to the crop.
`config.data.classes` (original label ids; empty = all) keeps only those classes and
relabels them 0..k-1 in the listed order, e.g. to pretrain on some classes and transfer
to the others (`configs/pretrain_shapes.py`). The functions below the registry ask the
source; none of them knows one source from another.
"""

from __future__ import annotations

import tensorflow as tf

from zf_tf.configs import check_section
from zf_tf.pipelines import (
    DataError,
    embedded,
    folder,
    prepared,
    preprocess,
    service,
    sources,
    tfds_source,
)

# config.data.source -> the Source that reads it: a new source is its module and a line here.
REGISTRY: dict[str, sources.Source] = {
    "embedded": embedded.EmbeddedSource(),
    "tfds": tfds_source.TfdsSource(),
    "folder": folder.FolderSource(),
    "prepared": prepared.PreparedSource(),
}
SOURCES = tuple(REGISTRY)
MODES = ("train", "ten_crop", "center")
# config.data fields with a range: (field, what it must be, test), checked by check_config.
RANGES = (
    ("service_timeout", "> 0", lambda v: v > 0),
    ("min_crop_area", "in (0, 1]", lambda v: 0 < v <= 1),
    ("crop_size", ">= 1", lambda v: v >= 1),
    ("resize_size", ">= 1", lambda v: v >= 1),
    ("shuffle_buffer", ">= 1", lambda v: v >= 1),
    ("num_classes", ">= 2", lambda v: v >= 2),
)


def source(data) -> sources.Source:
    """The Source of `data.source`.

    Raises:
      ValueError: one line naming the valid sources.
    """
    if data.source not in REGISTRY:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {data.source!r}")
    return REGISTRY[data.source]


def encoded_records(
    data, split: str, shuffle_files: bool = False, seed: int = 0
) -> tf.data.Dataset:
    """(encoded image bytes, int64 label) pairs of a split, undecoded.

    Args:
      data: the `config.data` ConfigDict.
      split: split name ('train', 'validation', 'test', or a tfds split expression).
      shuffle_files: let tfds (or prepared shards) interleave files in random order.
      seed: of the prepared shards' file order.

    Returns:
      The pairs in split order; with `data.classes`, only those classes, relabelled 0..k-1.

    Raises:
      ValueError: unknown `data.source`.
    """
    return source(data).records(data, split, shuffle_files, seed)


def num_examples(data, split: str) -> int:
    """Number of examples in a split (readable files for a folder); with `data.classes`,
    of those classes only."""
    return source(data).num_examples(data, split)


def class_names(data) -> list[str]:
    """Names of the model's classes, in label order (after `data.classes`).

    The embedded dataset's shape names, a tfds dataset's label names, a folder's class
    subfolders; 'class <i>' where no name is known.
    """
    try:
        names = source(data).class_names(data)
    except Exception:  # noqa: BLE001 - names are decoration; fall back to numbers
        names = []
    ids = sources.selected_classes(data) or range(int(data.num_classes))
    return [names[i] if i < len(names) else f"class {i}" for i in ids]


def is_labeled(data, split: str) -> bool:
    """False when `split` is a flat folder of unlabeled images (labels folder.UNLABELED)."""
    return source(data).labeled(data, split)


def check_split(data, split: str) -> int:
    """The number of examples of `split`; a one-line DataError naming the valid splits
    when the data has no such split."""
    return source(data).check_split(data, split)


def check_source(data, splits) -> None:
    """Read-only checks of the data a run reads, before it writes anything: a prepared
    folder's shards against its prepared.json (`prepared.verify`), and that each split
    exists (folders and prepared folders; tfds datasets are checked where they are read).

    Raises:
      DataError: one line naming the damaged shards (and the command that rewrites them)
        or the unknown split and the valid ones.
    """
    source(data).check(data, splits)


def check_layout(data) -> None:
    """What training needs of the data's layout, before anything is written: an image
    folder's class subfolders (`folder.check_layout`); nothing for the other sources.

    Raises:
      DataError: one line naming the folder and what to change.
    """
    source(data).check_layout(data)


def check_config(data) -> None:
    """Checks `config.data` before anything runs: the source, preprocessing and augmentation
    named, the folder a 'prepared' or 'folder' source needs, `classes` against
    `num_classes`, the fields of RANGES, and a crop that fits the resized image.

    Raises:
      DataError: one line naming the first bad field and its valid values.
    """
    choices = (
        ("source", SOURCES),
        ("preprocessing", preprocess.PREPROCESSING),
        ("augment", preprocess.AUGMENTATIONS),
    )
    check_section(data, "data", DataError, choices=choices)
    if data.source == "prepared" and not data.prepared_dir:
        raise DataError(
            "config.data.source='prepared' needs config.data.prepared_dir=DIR (a folder "
            "written by --mode=prepare)"
        )
    if data.source == "folder" and not data.folder:
        raise DataError("config.data.source='folder' needs config.data.folder=/path/to/images")
    classes = sources.selected_classes(data)
    if classes and (len(set(classes)) != len(classes) or min(classes) < 0):
        raise DataError(f"config.data.classes={classes} must be distinct label ids >= 0")
    if classes and len(classes) != data.num_classes:
        raise DataError(
            f"config.data.classes keeps {len(classes)} classes but config.data.num_classes="
            f"{data.num_classes}: set --config.data.num_classes={len(classes)}"
        )
    check_section(data, "data", DataError, ranges=RANGES)
    if data.crop_size > data.resize_size:
        raise DataError(
            f"config.data.crop_size ({data.crop_size}) must not exceed "
            f"config.data.resize_size ({data.resize_size})"
        )


def random_label(encoded, seed: int, num_classes: int):
    """A label drawn uniformly from a keyed hash of an image's encoded bytes: random, but the
    same for the same image in every epoch, file order and input pipeline."""
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, 0x5A17]  # the seed keys the hash
    return tf.strings.to_hash_bucket_strong(encoded, int(num_classes), key)


def build_inputs(
    config,
    split: str,
    input_context: tf.distribute.InputContext | None = None,
    mode: str = "train",
    normalize: bool = True,
    indexed: bool = False,
) -> tf.data.Dataset:
    """The input pipeline of one replica (or of all, without an input context).

    Args:
      config: the experiment ConfigDict (uses `config.data`, `config.train`, `config.seed`).
      split: split to read.
      input_context: from `strategy.distribute_datasets_from_function`; shards the data
        by input pipeline and turns the global batch size into the per-replica one.
      mode: 'train' (shuffled, repeated, one random crop of 10, drop_remainder),
        'ten_crop' (all 10 crops per image: images are (B, 10, s, s, 3)) or 'center'
        (the center crop only).
      normalize: False: the batches stay 0..255 pixels (uint8 where the crops are: from
        prepared shards, cached squares and the tf.data service) and the consumer
        normalizes them (`preprocess.pixels(config.data).normalize`). Training does so on
        its device, in the train step (`training.train.normalized_in_train_step`): the host
        then neither casts nor normalizes, and a quarter of the bytes cross to the device.
      indexed: (not for 'train') batches carry each image's position in the split, counted
        before sharding and decoding: what a scan split over input pipelines records, and
        the same whichever pipeline read the image or whether another failed to decode.

    Returns:
      A dataset of (images, labels int64) batches, or (images, labels, indices int64) with
      `indexed`; images float32 model inputs, or 0..255 pixels without `normalize`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    data, training = config.data, mode == "train"
    ds = _records(config, split, training, indexed)
    # Through the tf.data service (zf_tf/pipelines/service.py) the workers run one epoch per job
    # (so each example is produced exactly once per epoch); the trainer repeats and rebatches.
    service_address = data.service_address if training else ""
    pipelines = input_context.num_input_pipelines if input_context else 1
    if pipelines > 1 and not service_address:  # the service splits the data itself
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    # Crops stay 0..255 (uint8 where the source allows) until batched; `pixels` then
    # normalizes the whole batch in one op.
    pixels = preprocess.pixels(data)
    ds, crop, ten = _croppers(ds, data)
    batch_size = config.train.batch_size if training else config.train.eval_batch_size
    if input_context:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if training:
        seed = config.seed + (input_context.input_pipeline_id if input_context else 0)
        ds = _training_crops(ds, data, crop, seed, repeat=not service_address)
    else:
        center = lambda e: crop(e, preprocess.CENTER_CROP)  # as preprocess.center_crop
        one = ten if mode == "ten_crop" else center
        ds = ds.map(
            lambda e, y: (one(e), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    # Files that passed the folder check but still fail to decode are dropped, not fatal.
    ds = ds.ignore_errors(log_warning=True)
    drop = training and not service_address
    ds = ds.batch(batch_size, drop_remainder=drop, num_parallel_calls=tf.data.AUTOTUNE)
    normalized = lambda x, y: (pixels.normalize(x), y)
    if normalize and not service_address:
        ds = ds.map(normalized, num_parallel_calls=tf.data.AUTOTUNE)
    if indexed:
        ds = ds.map(lambda x, yi: (x, *yi))
    ds = ds.with_options(_options(data))
    if service_address:
        # Several input pipelines (multi-worker training) share one job: its epoch is
        # split between them, as `shard` would.
        job = f"zf_tf_train_{config.seed}" if pipelines > 1 else None
        ds = service.distribute(ds, service_address, job_name=job)
        # Batches travel as uint8 where the crops are (a quarter of float32's bytes).
        ds = ds.repeat().rebatch(batch_size, drop_remainder=True)
        if normalize:
            ds = ds.map(normalized, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _records(config, split: str, training: bool, indexed: bool) -> tf.data.Dataset:
    """(encoded image, label) records of a split, or (encoded image, (label, index)) with
    `indexed`; for training, labels drawn by `random_label` when
    `config.data.random_labels_seed` >= 0."""
    data = config.data
    ds = encoded_records(data, split, shuffle_files=training, seed=config.seed)
    if indexed:  # the label travels with the index: (label, index) until batched
        if training:
            raise ValueError("indexed batches are for evaluation modes, not 'train'")
        ds = ds.enumerate().map(lambda i, r: (r[0], (r[1], i)))
    if training and data.random_labels_seed >= 0:
        ds = ds.map(lambda e, y: (e, random_label(e, data.random_labels_seed, data.num_classes)))
    return ds


def _croppers(ds: tf.data.Dataset, data):
    """(ds, crop, ten): the records, `crop(image, i)` their crop i of 10 and `ten(image)` all
    10 crops, as 0..255 pixels (uint8 where the source allows)."""
    S, s = data.resize_size, data.crop_size
    if data.cache:
        # Small datasets: decode and resize each image once and keep its S x S center
        # square (uint8) in memory; every epoch then only slices crops.
        ds = ds.map(
            lambda e, y: (preprocess.center_square_uint8(e, S), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.ignore_errors(log_warning=True).cache()
        crop = lambda sq, i: preprocess.crop_of_square(sq, i, S, s, None)
        ten = lambda sq: preprocess.ten_crops_of_square(sq, S, s, None)
    else:
        # The source decodes (prepared S x S JPEGs: a crop decodes only its window, with
        # no resize).
        one = source(data).crop
        crop = lambda e, i: one(e, i, S, s, None)
        ten = lambda e: preprocess.ten_crops(e, S, s, None)
    return ds, crop, ten


def _training_crops(ds: tf.data.Dataset, data, crop, seed: int, repeat: bool):
    """The records shuffled (repeated unless not `repeat`), each image replaced by its
    training crop: one of the 10 (`crop`: the paper's) or, with `data.augment` 'scale', a
    random crop of at least `data.min_crop_area` of the square, resized. A seeded random
    stream picks the crop: reproducible for a given seed."""
    ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat() if repeat else ds
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))
    if data.augment == "scale":
        S, s, area = data.resize_size, data.crop_size, float(data.min_crop_area)
        square = (lambda sq: sq) if data.cache else (lambda e: preprocess.center_square_uint8(e, S))
        pick = lambda e, r: preprocess.scale_crop_of_square(square(e), r, s, area)
    else:  # the paper's: one of the 10 crops
        pick = lambda e, r: crop(e, tf.cast(r % 10, tf.int32))
    return ds.map(
        lambda record, r: (pick(record[0], r), record[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )


def _options(data) -> tf.data.Options:
    options = tf.data.Options()
    # The model's ops already use every core; input ops that split themselves over threads
    # too would oversubscribe the CPU (measured: a slower step on 2 cores).
    options.threading.max_intra_op_parallelism = 1
    if data.input_threads:
        options.threading.private_threadpool_size = data.input_threads
    return options
