"""Per-replica tf.data input pipelines for every data source.

    build_inputs(config, split, input_context, mode)

is a pure function of (config, split) meant for
`strategy.distribute_datasets_from_function`. Order: read encoded records ->
shard by input context -> shuffle -> decode + crop/flip -> batch (drop_remainder for
training) -> normalize -> prefetch; training leaves normalizing to its device
(`normalize=False`). With `config.data.cache` (small datasets) each
image is decoded once into its S x S center square, cached, and only sliced afterwards.
Pixels are normalized as `config.data.preprocessing` says (`preprocess.Pixels`).

Sources (`config.data.source`):
- 'embedded': the generated `zf_shapes` tfds dataset (zf_tf/pipelines/embedded.py), no download;
- 'tfds': any tfds image-classification dataset by `config.data.name`, for example
  `imagenet2012` prepared from `config.data.manual_dir`;
- 'folder': class subfolders of JPEG/PNG files under `config.data.folder`;
- 'prepared': shards written once by `--mode=prepare` from any of the above into
  `config.data.prepared_dir` (zf_tf/pipelines/prepared.py): S x S center squares, re-encoded.
Images always arrive as encoded bytes so that decoding can be limited to the crop.
`config.data.classes` (original label ids; empty = all) keeps only those classes and
relabels them 0..k-1 in the listed order, e.g. to pretrain on some classes and transfer
to the others (`configs/pretrain_shapes.py`).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf
from absl import logging

from zf_tf.pipelines import DataError, preprocess
from zf_tf.pipelines import folder as folder_lib
from zf_tf.pipelines import prepared as prepared_lib

SOURCES = ("embedded", "tfds", "folder", "prepared")
MODES = ("train", "ten_crop", "center")
# Fraction of a folder's images held out as the 'validation' split when the folder has
# no split subfolders (root/train/<class>, root/validation/<class>).
FOLDER_VALIDATION_FRACTION = 0.1


def _data_dir(data) -> str | None:
    return data.data_dir or os.environ.get("ZF_TF_DATA_DIR") or None


def _tfds_builder(data):
    import tensorflow_datasets as tfds

    if data.source == "embedded":
        from zf_tf.pipelines import embedded

        builder = embedded.builder(_data_dir(data), data.tfds_config)
    else:
        builder = tfds.builder(data.name, data_dir=_data_dir(data))
    if not builder.is_prepared():
        logging.info("Preparing tfds dataset %s in %s", builder.info.full_name, builder.data_dir)
        download_config = tfds.download.DownloadConfig(manual_dir=data.manual_dir or None)
        builder.download_and_prepare(download_config=download_config)
    return builder


def _indexed_root(root: str, split: str) -> str:
    """The folder a split's index is of: root/<split>/ if present, else root."""
    split_root = os.path.join(root, split)
    return split_root if os.path.isdir(split_root) else root


def folder_index(data, split: str) -> folder_lib.FolderIndex:
    """The index (with its skipped files) that a folder split is drawn from: of
    folder/<split>/ when the folder has split subfolders, else of the whole folder."""
    return folder_lib.indexed(_indexed_root(data.folder, split))


@functools.lru_cache(maxsize=8)
def _folder_split(root: str, split: str):
    """(paths, labels) of a folder split: root/<split>/<class> if present, else a
    deterministic every-Nth hold-out of root/<class> as 'validation'; a flat folder of
    unlabeled images is every split (labels folder.UNLABELED)."""
    indexed_root = _indexed_root(root, split)
    index = folder_lib.indexed(indexed_root)
    if indexed_root != root or not index.labeled:  # a split folder, or a flat folder:
        return index.paths, index.labels  # every image of it
    every = int(round(1 / FOLDER_VALIDATION_FRACTION))
    held_out = [i % every == every - 1 for i in range(len(index.paths))]
    keep = [h == (split != "train") for h in held_out]
    return (
        [p for p, k in zip(index.paths, keep) if k],
        [y for y, k in zip(index.labels, keep) if k],
    )


def forget_folders() -> None:
    """Drops the in-process folder indexes (after files were added, removed or changed)."""
    _folder_split.cache_clear()
    folder_lib.indexed.cache_clear()


def _class_dirs(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def check_folder_layout(data) -> None:
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
            f"1 in {int(round(1 / FOLDER_VALIDATION_FRACTION))} of each is held out)"
        )
    roots = [os.path.join(root, s) for s in present] or [root]
    counts = []
    for r in roots:
        classes = _class_dirs(r)
        if not classes:
            raise DataError(f"{r} has no class subfolders: training needs {r}/<class>/ images")
        for c in classes:
            path = os.path.join(r, c)
            if not any(
                f.lower().endswith(folder_lib.EXTENSIONS) for _, _, fs in os.walk(path) for f in fs
            ):
                raise DataError(
                    f"class folder {path} holds no images ({', '.join(folder_lib.EXTENSIONS)})"
                )
        counts.append(len(classes))
    if len(set(counts)) > 1:
        raise DataError(
            f"{roots[0]} has {counts[0]} class folders but {roots[1]} has {counts[1]}: "
            "the splits must have the same classes"
        )
    if counts[0] < 2:
        raise DataError(f"{roots[0]} has 1 class folder: a classifier needs at least 2")
    wanted = len(selected_classes(data)) or int(data.num_classes)
    if not selected_classes(data) and counts[0] != wanted:
        raise DataError(
            f"{roots[0]} has {counts[0]} class folders but config.data.num_classes={wanted}: "
            f"set --config.data.num_classes={counts[0]}"
        )


def is_labeled(data, split: str) -> bool:
    """False when `split` is a flat folder of unlabeled images (labels folder.UNLABELED)."""
    if data.source != "folder":
        return True
    labels = _folder_split(data.folder, split)[1]
    return not labels or labels[0] != folder_lib.UNLABELED


def selected_classes(data) -> tuple[int, ...]:
    """`data.classes` as a tuple of original label ids; () = every class (also for
    configs written before the option existed)."""
    return tuple(int(c) for c in (data.get("classes") or ()))


def _select_classes(ds: tf.data.Dataset, classes) -> tf.data.Dataset:
    """Keeps (encoded, label) pairs whose label is in `classes`, relabelled by position."""
    wanted = tf.constant(classes, tf.int64)
    ds = ds.filter(lambda e, y: tf.reduce_any(tf.equal(wanted, y)))
    return ds.map(
        lambda e, y: (e, tf.argmax(tf.cast(tf.equal(wanted, y), tf.int32), output_type=tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


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
    classes = selected_classes(data)
    if data.source == "folder":
        paths, labels = _folder_split(data.folder, split)
        if classes:
            keep = [i for i, y in enumerate(labels) if y in classes]
            paths = [paths[i] for i in keep]
            labels = [classes.index(labels[i]) for i in keep]
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int64))
        )
        return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)
    if data.source == "prepared":
        ds = prepared_lib.records(data, split, shuffle_files, seed=int(seed))
        return _select_classes(ds, classes) if classes else ds
    if data.source in ("embedded", "tfds"):
        import tensorflow_datasets as tfds

        builder = _tfds_builder(data)
        ds = builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={data.image_key: tfds.decode.SkipDecoding()},
        )
        ds = ds.map(
            lambda ex: (ex[data.image_key], tf.cast(ex[data.label_key], tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return _select_classes(ds, classes) if classes else ds
    raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {data.source!r}")


def class_names(data) -> list[str]:
    """Names of the model's classes, in label order (after `data.classes`).

    The embedded dataset's shape names, a tfds dataset's label names, a folder's class
    subfolders; 'class <i>' where no name is known.
    """
    names: list[str] = []
    try:
        if data.source == "embedded":
            from zf_tf.pipelines import embedded

            names = list(embedded.CLASS_NAMES)
        elif data.source == "folder":
            root = data.folder
            if os.path.isdir(os.path.join(root, data.train_split)):
                root = os.path.join(root, data.train_split)
            names = _class_dirs(root)
        elif data.source == "prepared":
            names = list(prepared_lib.metadata(data)["class_names"])
        else:
            names = list(_tfds_builder(data).info.features[data.label_key].names)
    except Exception:  # noqa: BLE001 - names are decoration; fall back to numbers
        names = []
    ids = selected_classes(data) or range(int(data.num_classes))
    return [names[i] if i < len(names) else f"class {i}" for i in ids]


_CLASS_COUNTS: dict[tuple, tuple[int, ...]] = {}


def _tfds_class_counts(data, split: str) -> tuple[int, ...]:
    """Examples per label of a tfds split: one pass over its labels (images not decoded),
    remembered per dataset and split."""
    key = (data.source, data.name, data.tfds_config, _data_dir(data), split, data.label_key)
    if key not in _CLASS_COUNTS:
        import tensorflow_datasets as tfds

        ds = _tfds_builder(data).as_dataset(
            split=split, decoders={data.image_key: tfds.decode.SkipDecoding()}
        )
        labels = list(ds.map(lambda ex: ex[data.label_key]).batch(4096).as_numpy_iterator())
        labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        _CLASS_COUNTS[key] = tuple(np.bincount(labels).tolist())
    return _CLASS_COUNTS[key]


def num_examples(data, split: str) -> int:
    """Number of examples in a split (readable files for a folder); with `data.classes`,
    of those classes only."""
    classes = selected_classes(data)
    if data.source == "folder":
        labels = _folder_split(data.folder, split)[1]
        return sum(y in classes for y in labels) if classes else len(labels)
    if data.source == "prepared":
        info = prepared_lib.split_info(data, split)
        counts = info["class_counts"]
        return sum(counts.get(str(c), 0) for c in classes) if classes else int(info["examples"])
    if classes:
        counts = _tfds_class_counts(data, split)
        return sum(counts[c] for c in classes if c < len(counts))
    return int(_tfds_builder(data).info.splits[split].num_examples)


def check_split(data, split: str) -> int:
    """The number of examples of `split`; a one-line DataError naming the valid splits
    when the data has no such split."""

    try:
        return num_examples(data, split)
    except DataError:
        raise
    except (KeyError, ValueError, tf.errors.OpError) as e:
        if data.source == "folder":
            choices = "train, validation"
        elif data.source == "prepared":
            choices = ", ".join(prepared_lib.metadata(data)["splits"])
        else:
            try:
                choices = ", ".join(_tfds_builder(data).info.splits)
            except Exception:  # noqa: BLE001 - then the original error says what is wrong
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"split {split!r}: {first}") from None
        raise DataError(f"unknown split {split!r}: valid splits: {choices}") from None


def check_source(data, splits) -> None:
    """Read-only checks of the data a run reads, before it writes anything: a prepared
    folder's shards against its prepared.json (`prepared.verify`), and that each split
    exists (folders and prepared folders; tfds datasets are checked where they are read).

    Raises:
      DataError: one line naming the damaged shards (and the command that rewrites them)
        or the unknown split and the valid ones.
    """
    if data.source == "prepared":
        prepared_lib.verify(data, splits)
    if data.source in ("prepared", "folder"):
        for split in dict.fromkeys(splits):
            check_split(data, split)


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
    data = config.data
    training = mode == "train"
    ds = encoded_records(data, split, shuffle_files=training, seed=config.seed)
    if indexed:  # the label travels with the index: (label, index) until batched
        if training:
            raise ValueError("indexed batches are for evaluation modes, not 'train'")
        ds = ds.enumerate().map(lambda i, r: (r[0], (r[1], i)))
    if training and data.get("random_labels_seed", -1) >= 0:
        ds = ds.map(lambda e, y: (e, random_label(e, data.random_labels_seed, data.num_classes)))
    # Through the tf.data service (zf_tf/pipelines/service.py) the workers run one epoch per job
    # (so each example is produced exactly once per epoch); the trainer repeats and rebatches.
    service_address = data.get("service_address", "") if training else ""
    pipelines = input_context.num_input_pipelines if input_context else 1
    if pipelines > 1 and not service_address:  # the service splits the data itself
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    # Crops stay 0..255 (uint8 where the source allows) until batched; `pixels` then
    # normalizes the whole batch in one op.
    S, s, pixels = data.resize_size, data.crop_size, preprocess.pixels(data)
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
        # Prepared S x S JPEGs: a crop decodes only its window, with no resize.
        one = prepared_lib.crop_of_prepared if data.source == "prepared" else preprocess.train_crop
        crop = lambda e, i: one(e, i, S, s, None)
        ten = lambda e: preprocess.ten_crops(e, S, s, None)
    batch_size = config.train.batch_size if training else config.train.eval_batch_size
    if input_context:
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    if training:
        seed = config.seed + (input_context.input_pipeline_id if input_context else 0)
        ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds if service_address else ds.repeat()
        # A seeded random stream picks the crop: reproducible for a given seed.
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))

        if data.get("augment", "ten_crop") == "scale":
            square = (
                (lambda sq: sq) if data.cache else (lambda e: preprocess.center_square_uint8(e, S))
            )
            area = float(data.get("min_crop_area", 0.25))
            crop_index = lambda r: r  # noqa: E731
            crop = lambda e, r: preprocess.scale_crop_of_square(square(e), r, s, area)  # noqa: E731
        else:  # the paper's: one of the 10 crops
            crop_index = lambda r: tf.cast(r % 10, tf.int32)  # noqa: E731

        def prepare(record, r):
            image, label = record
            return crop(image, crop_index(r)), label

    elif mode == "ten_crop":

        def prepare(image, label):
            return ten(image), label

    else:

        def prepare(image, label):  # the same crop as preprocess.center_crop
            return crop(image, preprocess.CENTER_CROP), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    # Files that passed the folder check but still fail to decode are dropped, not fatal.
    ds = ds.ignore_errors(log_warning=True)
    drop = training and not service_address
    ds = ds.batch(batch_size, drop_remainder=drop, num_parallel_calls=tf.data.AUTOTUNE)
    normalized = lambda x, y: (pixels.normalize(x), y)  # noqa: E731
    if normalize and not service_address:
        ds = ds.map(normalized, num_parallel_calls=tf.data.AUTOTUNE)
    if indexed:
        ds = ds.map(lambda x, yi: (x, *yi))
    options = tf.data.Options()
    # The model's ops already use every core; input ops that split themselves over threads
    # too would oversubscribe the CPU (measured: a slower step on 2 cores).
    options.threading.max_intra_op_parallelism = 1
    if data.input_threads:
        options.threading.private_threadpool_size = data.input_threads
    ds = ds.with_options(options)
    if service_address:
        from zf_tf.pipelines import service

        # Several input pipelines (multi-worker training) share one job: its epoch is
        # split between them, as `shard` would.
        job = f"zf_tf_train_{config.seed}" if pipelines > 1 else None
        ds = service.distribute(ds, service_address, job_name=job)
        # Batches travel as uint8 where the crops are (a quarter of float32's bytes).
        ds = ds.repeat().rebatch(batch_size, drop_remainder=True)
        if normalize:
            ds = ds.map(normalized, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
