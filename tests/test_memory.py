"""zf_tf/core/memory.py: a trained Keras model outlives `del` + `clear_session` + `gc` through
TensorFlow's gradient registry, and `released_custom_gradients` lets it go."""

import gc
import weakref

import keras
import numpy as np
import tensorflow as tf

from zf_tf.core import memory


def _trained_model_ref() -> weakref.ref:
    """A weak reference to the resource handle of a small model's kernel (which keeps its
    buffer alive) after one `fit` step, the model itself dropped."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 3), np.float32)
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
    ref = weakref.ref(model.trainable_variables[0].handle)  # what the traced graph captures
    del model
    return ref


def _drop_everything():
    keras.utils.clear_session()
    gc.collect()


def test_fit_leaks_the_model_through_the_gradient_registry():
    # The reason for memory.py: if this starts failing, TensorFlow no longer keeps trained
    # models alive and released_custom_gradients can go.
    before = memory.custom_gradient_names()
    try:
        variable = _trained_model_ref()
        _drop_everything()
        assert memory.custom_gradient_names() - before, "fit registered no custom gradient"
        assert variable() is not None, "the trained model's variables were freed anyway"
    finally:  # do not leave the leak to later tests
        registry = memory._gradient_registry()
        for name in memory.custom_gradient_names() - before:
            registry.pop(name)


def test_released_custom_gradients_frees_the_trained_model():
    before = memory.custom_gradient_names()
    with memory.released_custom_gradients() as released:
        variable = _trained_model_ref()
    _drop_everything()
    assert released, "nothing was released"
    assert all(name.startswith(memory.PREFIX) for name in released)
    assert memory.custom_gradient_names() == before
    assert variable() is None, "the trained model's variables are still alive"


def test_registrations_made_before_the_block_are_kept():
    @tf.custom_gradient
    def double(x):
        return 2 * x, lambda dy: 2 * dy

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = double(x)
        return tape.gradient(y, x)

    assert float(grad(tf.constant(1.0))) == 2.0  # traced: one registration, outside
    outside = memory.custom_gradient_names()
    with memory.released_custom_gradients() as released:
        _trained_model_ref()
    assert outside <= memory.custom_gradient_names()
    assert not released & outside
    assert float(grad(tf.constant(3.0))) == 2.0  # the outside graph still differentiates
