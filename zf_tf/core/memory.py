"""Training many models in one process without keeping every finished one's memory.

Measured (TF 2.21, Keras 3.15, 2-core CPU): a Keras model that has been trained keeps its
weights and optimizer slots in memory after `del model`, `keras.utils.clear_session()` and
`gc.collect()`, for the life of the process: 224-px ZFNet models trained one after another
in one process grow RSS 2.08, 2.66, 3.28 GB (with this release: 2.10, 2.18, 2.19 GB). The
chain: Keras's optimizer sums the gradients with `ReplicaContext.all_reduce`, which is a
`tf.custom_gradient`; traced in graph mode (every `model.fit` train step) that registers its
gradient function in TensorFlow's process-wide gradient registry as "CustomGradient-<uid>",
never unregistered. The function's closure holds the traced train-step FuncGraph, whose
captured resource handles keep every variable's buffer alive (the Python variables and the
model are collected; the buffers are not).

It does not make later models slower: their steps cost the same CPU time, minor page faults
and threads as the first model's (bench/ablate.py). The wall-clock slowdown of the third
and later models seen on these shared 2-core machines tracks other processes' CPU use,
not this state; glibc malloc settings changed neither (BUILD.md).

`released_custom_gradients()` drops the registrations made inside its block when the block
ends: wrap the life of a model that will not be trained (or differentiated) again after it.
"""

from __future__ import annotations

import contextlib

PREFIX = "CustomGradient-"  # tensorflow/python/ops/custom_gradient.py generate_name()


def _gradient_registry() -> dict | None:
    """TensorFlow's gradient registry (op type -> gradient function entry), or None where
    this TensorFlow keeps it elsewhere."""
    try:
        from tensorflow.python.framework import ops
    except ImportError:  # pragma: no cover - TensorFlow is a dependency
        return None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def custom_gradient_names() -> set[str]:
    """The custom-gradient registrations this process holds now."""
    registry = _gradient_registry()
    return {k for k in registry if k.startswith(PREFIX)} if registry is not None else set()


@contextlib.contextmanager
def released_custom_gradients():
    """Unregisters, on leaving the block, the custom gradients registered inside it.

    Graphs traced inside the block lose their custom gradients: only leave it once the
    models trained inside are finished with (scoring, saving and predicting still work;
    they need no gradient). Registrations made before the block are kept. Yields the set
    of names released (filled in on exit). A no-op where TensorFlow keeps no such registry.
    """
    before = custom_gradient_names()
    released: set[str] = set()
    try:
        yield released
    finally:
        registry = _gradient_registry()
        if registry is not None:
            for name in custom_gradient_names() - before:
                registry.pop(name, None)
                released.add(name)
