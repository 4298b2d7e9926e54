"""SavedModel export: encoded image bytes or a uint8 batch in, class probabilities out.

Signatures (see `saved_model_cli show --dir WORKDIR/export --all`):
  serving_default(image_bytes: string[N])            JPEG/PNG/GIF/BMP bytes
  serve_images(images: uint8[N, H, W, 3])            decoded RGB images of one size
Both apply the evaluation preprocessing inside (shorter side to S, center S x S, the 10
crops, the training run's pixel normalization `config.data.preprocessing`) and return
{'probabilities': float32[N, C] averaged over the 10 crops, 'classes': int64[N]}.
"""

from __future__ import annotations

import os
import shutil

import tensorflow as tf

from zf_tf.core import errors
from zf_tf.pipelines import preprocess


class Serving(tf.Module):
    """The model plus its evaluation preprocessing, as a tf.Module to save."""

    def __init__(self, model, resize_size: int, crop_size: int, pixels: preprocess.Pixels):
        super().__init__()
        self.model = model
        self.S, self.s, self.pixels = int(resize_size), int(crop_size), pixels

    def _predict(self, ten_crops_fn, items):
        """Maps `ten_crops_fn` over the batch, then averages the softmax over the crops."""
        spec = tf.TensorSpec((10, self.s, self.s, 3), tf.float32)
        crops = tf.map_fn(
            lambda item: ten_crops_fn(item, self.S, self.s, self.pixels),
            items,
            fn_output_signature=spec,
        )
        flat = tf.reshape(crops, [-1, self.s, self.s, 3])
        n, classes = tf.shape(crops)[0], self.model.output_shape[-1]

        def average():
            probs = tf.nn.softmax(self.model(flat, training=False))
            return tf.reduce_mean(tf.reshape(probs, [n, 10, classes]), axis=1)

        # An empty batch never reaches the model: some CPU kernels (Eigen's, without
        # AVX-512) reject a conv on zero images.
        probs = tf.cond(n > 0, average, lambda: tf.zeros([0, classes]))
        return {"probabilities": probs, "classes": tf.argmax(probs, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def from_bytes(self, image_bytes):
        return self._predict(preprocess.ten_crops, image_bytes)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def from_images(self, images):
        return self._predict(preprocess.ten_crops_of_image, images)


def export(model, config, workdir: str) -> str:
    """Writes `workdir/export` atomically: a temporary dir, then a rename.

    A failed export (a full disk) removes its `.export-tmp` dir; one killed outright leaves
    at most that dir (removed by the next export), never a broken `export/`. The previous
    export is replaced only once the new one is complete.

    Returns:
      The export path.
    """
    final = os.path.join(workdir, "export")
    tmp = os.path.join(workdir, ".export-tmp")
    old = os.path.join(workdir, ".export-old")
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    data = config.data
    module = Serving(model, data.resize_size, data.crop_size, preprocess.pixels(data))
    try:
        tf.saved_model.save(
            module,
            tmp,
            signatures={"serving_default": module.from_bytes, "serve_images": module.from_images},
        )
    except BaseException as e:  # a full disk, a kill signal turned exception: no half export
        shutil.rmtree(tmp, ignore_errors=True)
        if (fault := errors.writing(e, final)) is not e:
            raise fault from e
        raise
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
