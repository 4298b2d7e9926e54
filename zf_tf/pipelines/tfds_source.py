"""Source 'tfds': any tfds image-classification dataset by `config.data.name` (its
`image_key` and `label_key` features), for example `imagenet2012` prepared from
`config.data.manual_dir`; prepared by tfds on first use."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from zf_tf.pipelines import sources

_CLASS_COUNTS: dict[tuple, tuple[int, ...]] = {}


class TfdsSource(sources.Source):
    """A dataset read through its tfds builder (images not decoded: `SkipDecoding`)."""

    def _builder(self, data):
        """The dataset's builder, maybe not prepared yet."""
        return tfds.builder(data.name, data_dir=sources.data_dir(data))

    def builder(self, data):
        """The dataset's builder, prepared first if it is not (from `data.manual_dir`)."""
        builder = self._builder(data)
        if not builder.is_prepared():
            logging.info(
                "Preparing tfds dataset %s in %s", builder.info.full_name, builder.data_dir
            )
            download_config = tfds.download.DownloadConfig(manual_dir=data.manual_dir or None)
            builder.download_and_prepare(download_config=download_config)
        return builder

    def _examples(self, data, split: str, shuffle_files: bool = False):
        return self.builder(data).as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={data.image_key: tfds.decode.SkipDecoding()},
        )

    def records(self, data, split, shuffle_files=False, seed=0):
        ds = self._examples(data, split, shuffle_files).map(
            lambda ex: (ex[data.image_key], tf.cast(ex[data.label_key], tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return sources.select_classes(ds, sources.selected_classes(data))

    def _class_counts(self, data, split: str) -> tuple[int, ...]:
        """Examples per label of a split: one pass over its labels (images not decoded),
        remembered per dataset and split."""
        dir_ = sources.data_dir(data)
        key = (data.source, data.name, data.tfds_config, dir_, split, data.label_key)
        if key not in _CLASS_COUNTS:
            ds = self._examples(data, split).map(lambda ex: ex[data.label_key])
            labels = list(ds.batch(4096).as_numpy_iterator())
            labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
            _CLASS_COUNTS[key] = tuple(np.bincount(labels).tolist())
        return _CLASS_COUNTS[key]

    def num_examples(self, data, split):
        classes = sources.selected_classes(data)
        if classes:
            counts = self._class_counts(data, split)
            return sum(counts[c] for c in classes if c < len(counts))
        return int(self.builder(data).info.splits[split].num_examples)

    def class_names(self, data):
        return list(self.builder(data).info.features[data.label_key].names)

    def splits(self, data):
        return list(self.builder(data).info.splits)
