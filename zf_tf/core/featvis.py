"""Feature visualization: for each unit, an input image optimized to excite it (Olah,
Mordvintsev & Schubert, Distill 2017), made as Lucid's `param.image(fft=True,
decorrelate=True)` with its standard transformation robustness, for many units at once.

The image of one unit:
  spectrum (3, S, S//2+1) complex, learned  ->  scaled by 1/f (each frequency's amplitude
  divided by its frequency, so that no frequency is preferred by the parameterization)
  ->  inverse real FFT: (S, S, 3) decorrelated colour  ->  x @ C^T, C the square root of
  the colour covariance (normalized)  ->  sigmoid: RGB in [0, 1]  ->  the model's input.
At each step the image is moved by a random affine map (jitter, scale, rotation, borders
filled with gray) before the model sees it, and Adam follows the gradient of the unit's
objective (the mean of its map: 'channel'; its value at one position: 'neuron'; minimized
for the negative image). ReLUs pass that gradient down even where a unit is dead on the
image (`activations`, the 'redirected' rule, as Lucid does), so that units silent on the
gray start are optimized too.

Batched: image b optimizes unit b (the loss sums each image's own unit), so a layer's units
take a few calls. Each unit's random start and random transforms come from its own seed
(seed, unit), so a unit's image does not depend on the others in its batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from zf_tf.core import graph, rules

OBJECTIVES = ("channel", "neuron")
# Lucid's colour decorrelation for ImageNet: the square root (SVD: U sqrt(S)) of ImageNet's
# RGB colour covariance, for images in [0, 1]. Used where no data is given to measure it.
IMAGENET_COLOR_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32
)
FILL = 0.5  # the gray that fills what a transform uncovers
STEPS_PER_CALL = 16  # optimizer steps per graph call (the progress bar moves between calls)
# Names this recipe in the mode's cache keys: change it when the images it makes change.
RECIPE = (
    "fft-1/f, decorrelated, affine robustness, redirected ReLU, Adam, negative before the "
    "rectifier; 2026-12-07"
)


@dataclasses.dataclass(frozen=True)
class Params:
    """How the images are optimized.

    Attributes:
      steps: Adam steps.
      learning_rate: Adam's.
      objective: 'channel' (the mean of the unit's map) or 'neuron' (its value at `position`).
        For a negative image of a rectified layer (a ReLU's output), the map before the
        rectifier (`before_rectifier`).
      position: (y, x) in the layer's maps for 'neuron'; None = the centre.
      negative: minimize instead (the pattern that most inhibits the unit).
      seed: the same seed (and unit) gives the same image.
      decay_power: the spectrum's 1/f^decay_power scaling (Lucid: 1).
      jitter: the largest translation, in pixels at 224 px (scaled with the image size).
      scales: the random scale range (min, max).
      degrees: the largest rotation either way.
      init_sd: the standard deviation of the random start spectrum.
      diversity: images per unit (> 1: a diverse set, as Lucid's `objectives.diversity`:
        each unit's images are pushed apart by the cosine similarity of their Gram
        matrices of the layer's maps, weighted by `diversity_weight`). Image 0 of a set
        starts where the unit's single image does.
      diversity_weight: the weight of that penalty against the objective.
    """

    steps: int = 256
    learning_rate: float = 0.05
    objective: str = "channel"
    position: tuple | None = None
    negative: bool = False
    seed: int = 0
    decay_power: float = 1.0
    jitter: float = 16.0
    scales: tuple = (0.9, 1.1)
    degrees: float = 10.0
    init_sd: float = 0.01
    diversity: int = 1
    diversity_weight: float = 1.0


def valid_layers(model) -> list[str]:
    """The layers whose units can have a picture: outputs (N, h, w, F) or (N, F)."""
    inputs = {i.name for i in model.inputs}
    return [
        op.name
        for op in graph.ops_of(model)
        if len(op.output.shape) in (2, 4) and op.name not in inputs
    ]


def color_sqrt(covariance) -> np.ndarray:
    """A square root C of a 3 x 3 colour covariance (C C^T = covariance), as Lucid makes
    it: U sqrt(S) of its SVD."""
    u, s, _ = np.linalg.svd(np.asarray(covariance, np.float64))
    return (u * np.sqrt(s)).astype(np.float32)


def color_covariance(images) -> np.ndarray:
    """The 3 x 3 covariance of the pixel colours of RGB `images` in [0, 1] (..., 3)."""
    pixels = np.asarray(images, np.float64).reshape(-1, 3)
    return np.cov(pixels, rowvar=False)


def _frequency_scale(size: int, decay_power: float) -> np.ndarray:
    """(S, S//2+1): 1 / max(f, 1/S)^decay_power times S (Lucid's spectrum scaling)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return (size / np.maximum(freqs, 1.0 / size) ** decay_power).astype(np.float32)


def _seed(params: Params, unit, copy: int, stream: int) -> tuple:
    """The seed of one image's random start (stream 0) or transforms (stream 1): (seed,
    unit[, stream]) for a unit's first image, (seed, unit, stream, 2, copy) for the other
    images of a diverse set."""
    head = (params.seed, int(unit)) + ((stream,) if stream else ())
    return head if copy == 0 else (params.seed, int(unit), stream, 2, int(copy))


def initial_spectra(units, size: int, params: Params, copies=None) -> np.ndarray:
    """float32 (U, 2, 3, S, S//2+1): each image's random start (real and imaginary parts),
    drawn from its own seed (params.seed, unit; and its copy in a diverse set)."""
    shape = (2, 3, size, size // 2 + 1)
    copies = np.zeros(len(units), int) if copies is None else copies
    return np.stack(
        [
            np.random.default_rng(_seed(params, u, c, 0)).normal(0, params.init_sd, shape)
            for u, c in zip(units, copies)
        ]
    ).astype(np.float32)


def transforms(units, size: int, params: Params, copies=None) -> np.ndarray:
    """float32 (steps, U, 8): each step's random affine map of each unit's image, as
    `tf.raw_ops.ImageProjectiveTransformV3` reads it (output pixel -> input pixel): a
    rotation and scale about the centre and a translation, drawn from the unit's own seed."""
    out = np.zeros((params.steps, len(units), 8), np.float32)
    jitter = params.jitter * size / 224
    c = (size - 1) / 2
    copies = np.zeros(len(units), int) if copies is None else copies
    for j, (u, copy) in enumerate(zip(units, copies)):
        rng = np.random.default_rng(_seed(params, u, copy, 1))
        angle = np.deg2rad(rng.uniform(-params.degrees, params.degrees, params.steps))
        scale = rng.uniform(*params.scales, params.steps)
        ty, tx = rng.uniform(-jitter, jitter, (2, params.steps))
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        # input = M (output - c - t) + c, M = R(-angle) / scale
        ox, oy = -c - tx, -c - ty
        out[:, j] = np.stack(
            [cos, sin, cos * ox + sin * oy + c, -sin, cos, -sin * ox + cos * oy + c]
            + [np.zeros(params.steps)] * 2,
            axis=1,
        )
    return out


def images_from_spectra(spectra, scale, color) -> tf.Tensor:
    """(U, S, S, 3) RGB in [0, 1] from (U, 2, 3, S, S//2+1) spectra."""
    size = spectra.shape[3]
    complex_spectrum = tf.complex(spectra[:, 0], spectra[:, 1]) * tf.cast(scale, tf.complex64)
    decorrelated = tf.signal.irfft2d(complex_spectrum, fft_length=[size, size])  # (U, 3, S, S)
    decorrelated = tf.transpose(decorrelated, [0, 2, 3, 1]) / 4.0
    return tf.sigmoid(tf.einsum("bhwc,dc->bhwd", decorrelated, color))


def before_rectifier(model, layer: str, negative: bool) -> bool:
    """Whether the objective reads `layer`'s map before its rectifier: for a negative image
    of a rectified layer (`rules.rectified`). After the rectifier any image that silences
    the unit is a minimum (0), and the optimization would stop there."""
    return bool(negative) and rules.rectified(model, layer)


class Optimizer:
    """Optimizes images for units of one layer of `model`, `batch` units per call.

    Args:
      model: the convnet (a fixed, square input size).
      layer: the layer whose units are visualized (its output: (N, h, w, F) or (N, F)).
      to_input: RGB in [0, 1] (a tensor (N, S, S, 3)) -> the model's input.
      params: Params.
      color: the colour covariance's square root (3, 3) (`color_sqrt`); None = ImageNet's.
    """

    def __init__(self, model, layer: str, to_input, params: Params, color=None):
        self.params = params
        self.size = graph.static_shape(model)[0]
        # ReLUs pass the gradient down even where a unit is dead on an image (activations:
        # 'redirected'), so that a unit silent on the random start is still optimized. A
        # negative image minimizes a rectified layer's value before its rectifier.
        self.before_rectifier = before_rectifier(model, layer, params.negative)
        self.tap = rules.rule_tap(model, layer, "redirected", self.before_rectifier)
        shape = tuple(self.tap.outputs[0].shape[1:])
        self.spatial = len(shape) == 3
        if params.objective == "neuron" and self.spatial:
            y, x = params.position or (shape[0] // 2, shape[1] // 2)
            self.position = (int(y), int(x))
        else:
            self.position = None
        color = IMAGENET_COLOR_SQRT if color is None else np.asarray(color, np.float32)
        self.color = tf.constant(color / np.linalg.norm(color, axis=0).max())
        self.scale = tf.constant(_frequency_scale(self.size, params.decay_power))
        self.to_input = to_input
        self._steps = tf.function(self._steps_fn, reduce_retracing=True)
        self._on = {}  # strategy -> its traced `_steps_fn` on every replica

    def images(self, spectra) -> tf.Tensor:
        return images_from_spectra(spectra, self.scale, self.color)

    def objective(self, images, units) -> tf.Tensor:
        """(U,): each image's objective for its own unit (larger is better)."""
        return self._evaluate(images, units)[0]

    def _evaluate(self, images, units):
        """(objective (B,), the layer's maps (B, ..., F)) of each image for its own unit."""
        acts = self.tap(self.to_input(images), training=False)
        acts = acts[0] if isinstance(acts, (list, tuple)) else acts
        maps = tf.gather(acts, units[:, None], axis=-1, batch_dims=1)[..., 0]
        if not self.spatial:
            value = maps
        elif self.position is None:
            value = tf.reduce_mean(maps, axis=[1, 2])
        else:
            value = maps[:, self.position[0], self.position[1]]
        return (-value if self.params.negative else value), acts

    def similarity(self, acts) -> tf.Tensor:
        """(G,): for each group of `params.diversity` consecutive images (a unit's diverse
        set), the cosine similarity of the Gram matrices of their maps `acts` (B, ..., F),
        summed over the ordered pairs of different images and divided by the set's size
        (Lucid's `objectives.diversity`): 0 for orthogonal Grams, k - 1 for equal ones."""
        k = self.params.diversity
        flat = tf.reshape(acts, [tf.shape(acts)[0], -1, acts.shape[-1]])
        grams = tf.matmul(flat, flat, transpose_a=True)  # (B, F, F)
        grams = tf.nn.l2_normalize(grams, axis=[1, 2], epsilon=1e-10)
        grams = tf.reshape(grams, [-1, k, acts.shape[-1] ** 2])  # (G, k, F * F)
        cosines = tf.matmul(grams, grams, transpose_b=True)  # (G, k, k)
        return (tf.reduce_sum(cosines, axis=[1, 2]) - tf.linalg.trace(cosines)) / k

    def _step(self, state, units, transform):
        """One Adam step (beta 0.9, 0.999, epsilon 1e-8) of every image on its unit. Adam's
        state travels with the spectra as tensors (spectra, m, v, t), so one traced graph
        serves every batch of the same size, on one device or on each replica; a Keras
        optimizer, an object per batch, would be traced anew each time."""
        spectra, m, v, t = state
        with tf.GradientTape() as tape:
            tape.watch(spectra)
            moved = tf.raw_ops.ImageProjectiveTransformV3(
                images=self.images(spectra),
                transforms=transform,
                output_shape=[self.size, self.size],
                fill_value=FILL,
                interpolation="BILINEAR",
                fill_mode="CONSTANT",
            )
            value, acts = self._evaluate(moved, units)
            loss = -tf.reduce_sum(value)
            if self.params.diversity > 1:  # in units of the set's own objective
                k = self.params.diversity
                scale = tf.stop_gradient(tf.reduce_mean(tf.reshape(tf.abs(value), [-1, k]), 1))
                similarity = self.similarity(acts)
                loss += self.params.diversity_weight * tf.reduce_sum(scale * similarity)
        grad = tape.gradient(loss, spectra)
        t = t + 1.0
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        rate = self.params.learning_rate * tf.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        return spectra - rate * m / (tf.sqrt(v) + 1e-8), m, v, t

    def _steps_fn(self, state, units, transforms, first):
        """The steps `first` .. first + STEPS_PER_CALL of `transforms` (steps, U, 8), in one
        graph (no Python between steps)."""
        chunk = transforms[first : first + STEPS_PER_CALL]
        for i in tf.range(tf.shape(chunk)[0]):
            state = self._step(state, units, chunk[i])
        return state

    def run(self, units, progress=None, steps: int | None = None, strategy=None) -> dict:
        """Optimizes `params.diversity` images per unit of `units` (in one batch), for
        `steps` (default: params.steps) steps.

        Args:
          units: the units (channels of the layer), one image (or diverse set) each.
          progress: called with the number of steps after each graph call.
          steps: overrides params.steps.
          strategy: a tf.distribute strategy whose replicas (on every worker) share the
            units, each optimizing its slice; every worker gets every image back. Each
            unit's images are the ones it gets alone (its own seeds). Under a multi-worker
            strategy every worker must call this with the same units.

        Returns:
          dict: 'image' float32 (U * k, S, S, 3) RGB in [0, 1], k = params.diversity, a
          unit's k images together; 'value' (U * k,) the unit's objective (map mean or
          neuron value, not negated) on each final image, as it is (no transform); 'start'
          (U * k,) the same on the random starts; with k > 1, 'similarity' (U,) of each
          set's final images (`similarity`).
        """
        units = np.asarray(units, np.int32)
        k = self.params.diversity
        steps = self.params.steps if steps is None else steps
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        # Each replica takes an equal slice of whole sets: the last unit is repeated to fill
        # the batch (the same seeds, the same images; the copies are dropped).
        padded = np.concatenate([units, np.repeat(units[-1:], -len(units) % replicas)])
        rows, copies = np.repeat(padded, k), np.tile(np.arange(k), len(padded))
        params = dataclasses.replace(self.params, steps=steps)
        spectra = initial_spectra(rows, self.size, params, copies)
        state = (spectra, np.zeros_like(spectra), np.zeros_like(spectra), np.float32(0))
        moves = transforms(rows, self.size, params, copies)
        sign = -1.0 if self.params.negative else 1.0
        n = len(units) * k
        start = sign * self.objective(self.images(spectra[:n]), rows[:n]).numpy()
        if strategy is None:
            state, rows_t, moves = tf.nest.map_structure(tf.constant, (state, rows, moves))
            call = self._steps
        else:
            state, rows_t, moves = _per_replica(strategy, (state, rows, moves), (0, 0, 1))
            call = self._distributed(strategy)
        for first in range(0, steps, STEPS_PER_CALL):
            state = call(state, rows_t, moves, tf.constant(first))
            if progress is not None:
                progress(min(STEPS_PER_CALL, steps - first))
        spectra = state[0] if strategy is None else strategy.gather(state[0], axis=0)
        images = self.images(spectra[:n])
        final, acts = self._evaluate(images, rows[:n])
        out = {"image": images.numpy(), "value": sign * final.numpy(), "start": start}
        if k > 1:
            out["similarity"] = self.similarity(acts).numpy()
        return out

    def _distributed(self, strategy):
        """`_steps_fn` on every replica of `strategy` (one traced function per strategy)."""
        if strategy not in self._on:
            self._on[strategy] = tf.function(
                lambda *args: strategy.run(self._steps_fn, args=args), reduce_retracing=True
            )
        return self._on[strategy]


def _per_replica(strategy, arrays, axes):
    """Per-replica values of `strategy`: replica r (of all workers) gets the r-th equal
    slice of each array along its axis in `axes` (a scalar: a copy)."""
    replicas = strategy.num_replicas_in_sync

    def part(context):
        r = context.replica_id_in_sync_group

        def cut(array, axis):
            array = np.asarray(array)
            if array.ndim == 0:
                return tf.constant(array)
            n = array.shape[axis] // replicas
            return tf.constant(np.take(array, range(r * n, (r + 1) * n), axis=axis))

        return tuple(
            tf.nest.map_structure(lambda a, axis=axis: cut(a, axis), value)
            for value, axis in zip(arrays, axes)
        )

    return strategy.experimental_distribute_values_from_function(part)
