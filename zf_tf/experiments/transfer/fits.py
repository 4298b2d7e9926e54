"""Linear classifiers on fixed features: the one Keras fit used by the transfer softmax,
`bench/linear_probe.py` and the embedded dataset's linear-probe test.

`fit_linear` is a `keras.Sequential([Dense])` (logits) trained full-batch with
`keras.optimizers.Adam` from zero weights, with a softmax cross-entropy, or a per-class
sigmoid cross-entropy for multi-label targets. Zero initialization and full batches make
it deterministic: the same data give the same weights.

Weight decay is an L2 penalty on the kernel in the loss (`keras.regularizers.L2`: loss +
weight_decay * sum(W**2)), not AdamW's decoupled decay. That is the objective the
hand-written fits this replaces minimized, so the transfer numbers stay the same
(measured: logits within 5e-5 relative of the old fit's); with Adam, decoupled decay would
shrink every weight by the same factor whatever its gradient scale, a different (and for
these configs untuned) regularizer. Adam's epsilon is 1e-8 (Keras' default is 1e-7) for
the same reason.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf


def linear_model(dim: int, num_classes: int, weight_decay: float = 0.0) -> keras.Sequential:
    """A (dim,) -> (num_classes,) logits layer with zero kernel and bias."""
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None
    return keras.Sequential(
        [
            keras.Input((dim,)),
            keras.layers.Dense(
                num_classes,
                kernel_initializer="zeros",
                bias_initializer="zeros",
                kernel_regularizer=regularizer,
                dtype="float32",
                name="linear",
            ),
        ]
    )


@functools.lru_cache(maxsize=4)
def _trainer(
    dim: int,
    num_classes: int,
    multi_label: bool,
    learning_rate: float,
    weight_decay: float,
    steps_per_execution: int,
) -> keras.Sequential:
    """A compiled linear model, kept per setting: every fit of the same setting reuses its
    traced train step (measured: 1.4 s per fit with a fresh model, 0.08 s reused)."""
    model = linear_model(dim, num_classes, weight_decay)
    loss = (
        keras.losses.BinaryCrossentropy(from_logits=True)
        if multi_label
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, epsilon=1e-8),
        loss=loss,
        steps_per_execution=steps_per_execution,
    )
    return model


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    multi_label: bool = False,
    steps: int = 300,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-4,
    callbacks=(),
) -> keras.Sequential:
    """A linear classifier fit full-batch with Adam from zero weights.

    Args:
      x: float32 (N, D) features; y: int (N,) labels, or (N, C) 0/1 for multi-label.
      multi_label: per-class sigmoid cross-entropy instead of the softmax.
      steps: Adam steps, each on all N examples.
      weight_decay: L2 penalty on the kernel (loss + weight_decay * sum(W**2)).
      callbacks: Keras callbacks; `on_train_batch_end(step - 1)` then runs after every
        step, and `self.model` is the model being trained (without callbacks all steps
        run in one call, which is faster).

    Returns:
      A new model holding the fitted weights: features (M, D) -> logits (M, C).
    """
    dim = int(x.shape[1])
    trainer = _trainer(
        dim,
        int(num_classes),
        bool(multi_label),
        float(learning_rate),
        float(weight_decay),
        1 if callbacks else int(steps),
    )
    # From zero weights and a fresh optimizer (step count and moments) every time.
    for variable in trainer.weights + trainer.optimizer.variables:
        if variable.name != "learning_rate":
            variable.assign(tf.zeros_like(variable))
    y = np.asarray(y, np.float32 if multi_label else np.int64)
    batch = tf.data.Dataset.from_tensors((np.asarray(x, np.float32), y)).repeat()
    trainer.fit(
        batch,
        epochs=1,
        steps_per_epoch=int(steps),
        callbacks=list(callbacks),
        shuffle=False,
        verbose=0,
    )
    model = linear_model(dim, int(num_classes), weight_decay)
    model.set_weights(trainer.get_weights())
    return model


def train_softmax(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    multi_label: bool,
    steps: int = 300,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-4,
):
    """The transfer classifier: `fit_linear` on features divided by their root mean square
    on the training images (so one learning rate suits every layer's feature scale).

    Args:
      x: float32 (N, D) features; y: int64 (N,) labels, or (N, C) 0/1 for multi-label.
      multi_label: per-class sigmoids instead of the softmax.
      weight_decay: L2 penalty on the weights.

    Returns:
      A function mapping features (M, D) to class scores (M, C) (logits, numpy).
    """
    scale = np.float32(1.0 / max(float(np.sqrt(np.mean(np.square(x)))), 1e-12))
    model = fit_linear(
        np.asarray(x, np.float32) * scale,
        y,
        num_classes,
        multi_label=multi_label,
        steps=steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
    )
    kernel, bias = (v.numpy() for v in model.get_layer("linear").weights)
    return lambda features: (np.asarray(features, np.float32) * scale) @ kernel + bias
