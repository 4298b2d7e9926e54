"""Work-arounds for two Keras bugs in `fit` under tf.distribute (TF backend).

Both patch private Keras code, so each is applied only on the Keras versions it was
checked against (TESTED_KERAS; pyproject.toml pins keras to them), only under the
strategies that need it, and only inside `with fit_workarounds(...)`: everything is
restored when the block ends. On another Keras version the patch is skipped with a logged
warning (Keras may have fixed the bug; if not, `fit` fails with the error quoted below).
tests/test_keras_fixes.py reproduces each bug without its patch and fails, saying "remove
the patch", once Keras no longer has it.

1. `prebuilt_from_shapes`. `fit` and `evaluate` build the model's metric, loss and
   optimizer state from their first distributed batch MEAN-reduced across replicas
   (`TensorFlowTrainer._maybe_symbolic_build`). That fails under MultiWorkerMirroredStrategy
   ("Attempt to convert a value (PerReplica ...) with an unsupported type") and for uneven
   per-replica batches, e.g. a global batch of 3 split 2 + 1 over 2 replicas ("Inputs to
   operation AddN of type AddN must have the same size and shape"). The patch builds the
   same state from an example batch's shapes first and makes `_maybe_symbolic_build` a
   no-op on that model. Needed with more than one replica (a last partial validation
   batch can be uneven); with one replica Keras builds the state itself, correctly.
2. `scalar_safe_multi_worker_reduce`. Under MultiWorkerMirroredStrategy, the module
   function `reduce_per_replica` of `keras.src.backend.tensorflow.trainer` reduces every
   log value with `strategy.reduce("MEAN", v, axis=0)`, which is invalid for a scalar
   ("Invalid reduction dimension 0 for input with 0 dimensions"). The patch reduces scalars
   with axis=None: the same cross-worker mean. Needed with several workers; it must be in
   place when `fit` traces its train function.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf
from absl import logging

# Keras versions on which each patch was checked (with TensorFlow 2.21): the bug is there
# and the patch fixes it (tests/test_keras_fixes.py).
TESTED_KERAS = ("3.15.1",)
PATCH_FILE = "zf_tf/training/keras_fixes.py"

BUGS = {
    "prebuild": "fit's symbolic build from a MEAN-reduced distributed batch",
    "scalar_reduce": "reduce_per_replica's axis=0 MEAN of scalars under multi-worker",
}


def version_is_tested(bug: str) -> bool:
    """True if this Keras is one the `bug` patch was checked on; else logs why it is skipped."""
    if keras.__version__ in TESTED_KERAS:
        return True
    logging.warning(
        "keras %s is not a version the work-around for %s was tested on (%s): running "
        "without it. If fit fails under tf.distribute, install a tested keras "
        "(pyproject.toml).",
        keras.__version__,
        BUGS[bug],
        ", ".join(TESTED_KERAS),
    )
    return False


def is_multi_worker(strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy with more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for job, tasks in spec.items() if job in ("chief", "worker")) > 1


def _no_symbolic_build(iterator=None, data_batch=None):
    return None


def _prebuild(model: keras.Model, strategy, example_batch):
    with strategy.scope():
        model._symbolic_build(data_batch=example_batch)
    object.__setattr__(model, "_maybe_symbolic_build", _no_symbolic_build)


@contextlib.contextmanager
def prebuilt_from_shapes(model: keras.Model, strategy, example_batch):
    """Builds a compiled model's training state from `example_batch`'s shapes (any batch
    size) and turns its `_maybe_symbolic_build` off for the block (module doc, 1)."""
    if not version_is_tested("prebuild"):
        yield
        return
    saved = vars(model).get("_maybe_symbolic_build")
    _prebuild(model, strategy, example_batch)
    try:
        yield
    finally:
        if saved is None:
            object.__delattr__(model, "_maybe_symbolic_build")
        else:
            object.__setattr__(model, "_maybe_symbolic_build", saved)


@contextlib.contextmanager
def scalar_safe_multi_worker_reduce():
    """Rebinds Keras' `reduce_per_replica` to a scalar-safe one for the block (module doc,
    2); functions traced inside keep it."""
    if not version_is_tested("scalar_reduce"):
        yield
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not tf_trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            return original(values, strategy, reduction)

        def reduce(v):
            if isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v):
                rank = v.values[0].shape.rank if hasattr(v, "values") else v.shape.rank
                if rank == 0:
                    return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original


@contextlib.contextmanager
def fit_workarounds(model: keras.Model, strategy, example_batch):
    """The patches `model.fit` needs under `strategy`, for the block; none with one replica.

    Args:
      model: a compiled model, created in `strategy.scope()`.
      strategy: the model's tf.distribute strategy.
      example_batch: (x, y) arrays with the shapes and dtypes of a batch (any batch size).
    """
    with contextlib.ExitStack() as stack:
        if strategy.num_replicas_in_sync > 1:
            stack.enter_context(prebuilt_from_shapes(model, strategy, example_batch))
        if is_multi_worker(strategy):
            stack.enter_context(scalar_safe_multi_worker_reduce())
        yield


def image_batch(crop_size: int):
    """An example (images, labels) batch of the training pipeline, for `fit_workarounds`."""
    return np.zeros((1, crop_size, crop_size, 3), np.float32), np.zeros((1,), np.int64)
