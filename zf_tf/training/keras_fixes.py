"""Work-arounds for Keras 3.15 bugs in `fit` under tf.distribute (TF backend).

Both are narrow and leave single-device training untouched:
1. `fit` builds the model's metric, loss and optimizer state from its first distributed
   batch MEAN-reduced across replicas. That fails under MultiWorkerMirroredStrategy
   ("Attempt to convert a value (PerReplica ...)") and for uneven per-replica batches.
   `build_for_fit` builds the same state from the input shapes instead.
2. Under MultiWorkerMirroredStrategy, `reduce_per_replica` reduces every scalar log value
   with `strategy.reduce("MEAN", v, axis=0)`, which is invalid for a scalar ("Invalid
   reduction dimension 0 for input with 0 dimensions"). `patch_multi_worker_reduce` makes
   scalars reduce with axis=None: the same cross-worker mean.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as _tf_trainer


def build_for_fit(model: keras.Model, strategy, crop_size: int):
    """Builds a compiled model's training state from input shapes (see module doc, 1)."""
    batch = (np.zeros((1, crop_size, crop_size, 3), np.float32), np.zeros((1,), np.int64))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


_original_reduce_per_replica = _tf_trainer.reduce_per_replica


def _reduce_per_replica(values, strategy, reduction):
    if reduction in ("auto", "mean") and _tf_trainer._collective_all_reduce_multi_worker(strategy):

        def reduce(v):
            if isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v):
                rank = v.values[0].shape.rank if hasattr(v, "values") else v.shape.rank
                if rank == 0:
                    return strategy.reduce("MEAN", v, axis=None)
            return _original_reduce_per_replica(v, strategy, reduction)

        return tf.nest.map_structure(reduce, values)
    return _original_reduce_per_replica(values, strategy, reduction)


def patch_multi_worker_reduce():
    """Installs the scalar-safe reduction (see module doc, 2); idempotent."""
    _tf_trainer.reduce_per_replica = _reduce_per_replica
