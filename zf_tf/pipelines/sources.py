"""What the pipelines ask of a data source (`config.data.source`): the `Source` protocol.

Each source is one subclass in its own module: 'tfds' (tfds_source.py), 'embedded'
(embedded.py), 'folder' (folder.py) and 'prepared' (prepared.py); `inputs.REGISTRY` maps
the names to them. Adding a source is one new module and one line there. A source is one
object for every config: each method is passed `config.data` (what a source remembers,
such as a folder's index, it keeps per folder or dataset). Records are encoded image
bytes, so decoding can be limited to the crop. Labels are the source's
original ids until `data.classes` (`selected_classes`) keeps some of them and relabels
them 0..k-1 in the listed order; a source applies it wherever it returns labels or counts.
"""

from __future__ import annotations

import abc
import os

import tensorflow as tf

from zf_tf.pipelines import DataError, preprocess


def data_dir(data) -> str | None:
    """The tfds data directory: `data.data_dir`, else $ZF_TF_DATA_DIR, else tfds' own."""
    return data.data_dir or os.environ.get("ZF_TF_DATA_DIR") or None


def selected_classes(data) -> tuple[int, ...]:
    """`data.classes` as a tuple of original label ids; () = every class."""
    return tuple(int(c) for c in data.classes)


def select_classes(ds: tf.data.Dataset, classes) -> tf.data.Dataset:
    """Keeps the tuples (label second) whose label is in `classes`, relabelled by position
    in `classes`; every tuple when `classes` is empty."""
    if not classes:
        return ds
    wanted = tf.constant(classes, tf.int64)
    ds = ds.filter(lambda *r: tf.reduce_any(tf.equal(wanted, r[1])))
    relabel = lambda y: tf.argmax(tf.cast(tf.equal(wanted, y), tf.int32), output_type=tf.int64)
    return ds.map(lambda *r: (r[0], relabel(r[1]), *r[2:]), num_parallel_calls=tf.data.AUTOTUNE)


class Source(abc.ABC):
    """A data source. Every method takes the `config.data` ConfigDict; a split is a split
    name ('train', 'validation', 'test', or a tfds split expression)."""

    # True where `annotated` gives object boxes and masks (the pointing game, Fig. 8's parts).
    has_boxes = False

    @abc.abstractmethod
    def records(self, data, split: str, shuffle_files: bool = False, seed: int = 0):
        """(encoded image bytes, int64 label) pairs of a split, undecoded, as a
        tf.data.Dataset: in split order, or with `shuffle_files` the files in a random
        order (seeded by `seed` where the source orders them itself); with `data.classes`
        only those classes, relabelled 0..k-1."""

    @abc.abstractmethod
    def num_examples(self, data, split: str) -> int:
        """Number of examples in a split; with `data.classes`, of those classes only.

        Raises:
          KeyError, ValueError or tf.errors.OpError for an unknown split (`check_split`
          names the valid ones), DataError where the source says more itself.
        """

    @abc.abstractmethod
    def class_names(self, data) -> list[str]:
        """The names of all the source's classes, by original label id."""

    @abc.abstractmethod
    def splits(self, data) -> list[str]:
        """The names of the splits the source has (named when a split is unknown)."""

    def crop(self, encoded, crop_index, resize_size: int, crop_size: int, pixels):
        """Crop `crop_index` (0..9) of an encoded image, as `preprocess.train_crop`."""
        return preprocess.train_crop(encoded, crop_index, resize_size, crop_size, pixels)

    def annotated(self, data, split: str):
        """(decoded uint8 image, label, normalized [ymin, xmin, ymax, xmax] box, mask)
        tuples of a split, as a tf.data.Dataset, where the source has object annotations
        (labels as `records`'); None where it has none."""
        return None

    def labeled(self, data, split: str) -> bool:
        """False when the split's images carry no labels (a flat folder)."""
        return True

    def num_unreadable(self, data, split: str) -> int:
        """Files left out of a split before any reading (a folder index's skipped files)."""
        return 0

    def check_split(self, data, split: str) -> int:
        """The number of examples of `split`; a one-line DataError naming the valid splits
        when the source has no such split."""
        try:
            return self.num_examples(data, split)
        except DataError:
            raise
        except (KeyError, ValueError, tf.errors.OpError) as e:
            try:
                choices = ", ".join(self.splits(data))
            except Exception:  # noqa: BLE001 - then the original error says what is wrong
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"split {split!r}: {first}") from None
            raise DataError(f"unknown split {split!r}: valid splits: {choices}") from None

    def check(self, data, splits) -> None:
        """Read-only checks of the data a run reads, before it writes anything; none by
        default (a tfds dataset is checked where it is read).

        Raises:
          DataError: one line naming what is wrong and what to change.
        """
        return None

    def check_layout(self, data) -> None:
        """What training needs of the data's layout beyond `check` (a folder's class
        subfolders); nothing by default.

        Raises:
          DataError: one line naming what is wrong and what to change.
        """
        return None
