"""Robust decoding and the paper's 10-crop geometry (Sec. 3), as TF ops.

Semantics (paper): resize the shorter side to S, take the center S x S, then one of 10
sub-crops of size s: the 4 corners and the center, each with and without a horizontal
flip. Crop index i in [0, 10): window `CORNERS[i % 5]`, flipped when i >= 5.

Speed: training decodes only the window that the chosen sub-crop covers in the original
image (`tf.io.decode_and_crop_jpeg`) and resizes only that window to s x s, instead of
decoding and resizing the whole photograph. This equals resize-then-crop up to the
interpolation at the window's border, and exactly when the shorter side already is S.
Evaluation decodes the center square once, resizes it to S x S and slices all 10 crops.

Pixel values (`config.data.preprocessing`, `Pixels`): the crops are float 0..255 RGB until
the last step, which normalizes them the way the model expects: 'zfnet' (the paper: minus
the per-channel data mean), or one of the keras.applications modes for models brought from
there ('caffe', 'tf', 'torch'), or 'raw' (unchanged, for models that rescale inside).

Every op here works eagerly and inside `tf.data.Dataset.map` (tests run both).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

NUM_CROPS = 10
# config.data.augment: the paper's one-of-10 crops, or random-resized crops ('scale').
AUGMENTATIONS = ("ten_crop", "scale")
CENTER_CROP = 4  # index of the unflipped center crop

# config.data.preprocessing choices; the last three as keras.applications.imagenet_utils.
PREPROCESSING = ("zfnet", "caffe", "tf", "torch", "raw")
DEFAULT_PREPROCESSING = "zfnet"  # what a config without data.preprocessing (older workdirs) means
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # ImageNet, BGR (keras 'caffe' mode)
_TORCH_MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB in [0, 1] (keras 'torch' mode)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Pixels:
    """How float 0..255 RGB pixels become model inputs, and back for display.

    Every kind is one affine map per channel, `(x[..., order] - offset) / scale`:
      zfnet: RGB, x - mean (the paper's mean subtraction; `mean` is config.data.mean);
      caffe: RGB -> BGR, minus the ImageNet BGR means (keras 'caffe' mode);
      tf:    x / 127.5 - 1, written (x - 127.5) / 127.5 (keras 'tf' mode);
      torch: (x / 255 - ImageNet mean) / ImageNet std, written with 255 folded into both
             (keras 'torch' mode);
      raw:   x unchanged (models that rescale inside).

    Attributes:
      kind: one of PREPROCESSING.
      mean: the data's per-channel RGB mean (3 floats, 0..255): subtracted by 'zfnet'; for
        every kind, the colour of `fill` (the gray of occluders and transform borders).
    """

    kind: str
    mean: tuple

    def __post_init__(self):
        if self.kind not in PREPROCESSING:
            choices = ", ".join(PREPROCESSING)
            raise ValueError(f"preprocessing {self.kind!r} is not valid: choose one of {choices}")
        if len(self.mean) != 3:
            raise ValueError(f"the data mean must be 3 floats (RGB); got {self.mean!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))

    def _affine(self):
        """(bgr, offset, scale): float32 (3,) offset and scale, in the output's channel order."""
        ones = np.ones(3, np.float32)
        bgr, offset, scale = {
            "zfnet": (False, self.mean, ones),
            "caffe": (True, _CAFFE_BGR_MEAN, ones),
            "tf": (False, (127.5,) * 3, 127.5 * ones),
            "torch": (False, 255.0 * np.asarray(_TORCH_MEAN), 255.0 * np.asarray(_TORCH_STD)),
            "raw": (False, (0.0,) * 3, ones),
        }[self.kind]
        return bgr, np.asarray(offset, np.float32), np.asarray(scale, np.float32)

    def _forward(self, x):
        """The one normalization formula; `x` a float32 tensor or numpy array, RGB last.
        A division by ones is skipped (exact, and on the CPU the broadcast division costs
        more than decoding a crop: measured 0.46 ms per 224 px image)."""
        bgr, offset, scale = self._affine()
        x = (x[..., ::-1] if bgr else x) - offset
        return x if (scale == 1).all() else x / scale

    def normalize(self, images) -> tf.Tensor:
        """Float (or uint8) 0..255 RGB image(s) (..., 3) as float32 model inputs (a TF op:
        eager or inside Dataset.map). 'zfnet' is exactly `images - mean` in float32."""
        images = tf.cast(images, tf.float32)
        bgr, offset, scale = self._affine()
        if not bgr and (scale == 1).all():  # x + (-m) == x - m exactly; bias_add is fused
            return tf.nn.bias_add(images, -offset)
        return self._forward(images)

    def display(self, inputs) -> np.ndarray:
        """Model inputs (..., 3) back to float32 RGB in [0, 1] (clipped), for figures."""
        bgr, offset, scale = self._affine()
        rgb = np.asarray(inputs, np.float32) * scale + offset
        return np.clip((rgb[..., ::-1] if bgr else rgb) / 255.0, 0, 1)

    @property
    def fill(self) -> np.ndarray:
        """float32 (3,): the model input of a pixel of the mean colour (`mean` normalized),
        what occluders and uncovered borders are filled with; exactly +0.0 for 'zfnet'."""
        return self._forward(np.asarray(self.mean, np.float32))


def pixels(data) -> Pixels:
    """The `Pixels` of a config's `data` section (a ConfigDict or a dict).

    A workdir trained before `data.preprocessing` existed has no such field: 'zfnet'.

    Raises:
      ValueError: an unknown preprocessing.
    """
    return Pixels(str(data["preprocessing"]), tuple(data["mean"]))


def crop_offsets(resize_size: int, crop_size: int) -> list[tuple[int, int]]:
    """(y, x) offsets of the 5 sub-crops inside the S x S center square.

    Args:
      resize_size: S.
      crop_size: s (<= S).

    Returns:
      [top_left, top_right, bottom_left, bottom_right, center] as (y, x) pairs.
    """
    if crop_size > resize_size:
        raise ValueError(f"crop size {crop_size} is larger than resize size {resize_size}")
    e = resize_size - crop_size
    c = e // 2
    return [(0, 0), (0, e), (e, 0), (e, e), (c, c)]


# How `tf.io.serialize_tensor` of a uint8 tensor begins (TensorProto field 1, dtype =
# DT_UINT8, then field 2, the shape): no image format starts so (JPEG ff d8, PNG 89 'P',
# GIF 'GIF8', BMP 'BM').
PIXEL_TENSOR_PREFIX = b"\x08\x04\x12"


def is_pixel_tensor(encoded: tf.Tensor) -> tf.Tensor:
    """True for bytes that hold uint8 (H, W, 3) pixels as `tf.io.serialize_tensor` wrote
    them (prepared shards with encoding 'raw'): decoding them is a copy."""
    return tf.equal(tf.strings.substr(encoded, 0, 3), PIXEL_TENSOR_PREFIX)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 RGB (grayscale and CMYK become RGB), and
    uint8 pixels serialized as a tensor (`is_pixel_tensor`) to themselves.

    The format is sniffed from the bytes, not the file name, so PNG bytes in a '.JPEG'
    file decode too.
    """
    image = tf.cond(
        is_pixel_tensor(encoded),
        lambda: tf.io.parse_tensor(encoded, tf.uint8),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def _window(height, width, resize_size: int, crop_size: int, crop_index):
    """Window (y, x, size, size) in original pixels that crop `crop_index` covers."""
    side = tf.minimum(height, width)
    scale = tf.cast(side, tf.float32) / float(resize_size)
    offsets = tf.constant(crop_offsets(resize_size, crop_size), tf.float32)
    oy, ox = tf.unstack(offsets[crop_index % 5] * scale)
    size = tf.maximum(1, tf.cast(tf.round(crop_size * scale), tf.int32))
    y = (height - side) // 2 + tf.cast(tf.round(oy), tf.int32)
    x = (width - side) // 2 + tf.cast(tf.round(ox), tf.int32)
    # Rounding can push the window one pixel past the border.
    y = tf.clip_by_value(y, 0, height - size)
    x = tf.clip_by_value(x, 0, width - size)
    return tf.stack([y, x, size, size])


def _resize_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes uint8 HxWx3 to float32 size x size; exact copy when already that size.

    Plain bilinear below 2x downscaling (JPEG windows arrive pre-shrunk in the DCT to less
    than that); antialiased bilinear, about 4x as costly, only for larger factors.
    """
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    big = tf.greater_equal(tf.minimum(shape[0], shape[1]), 2 * size)
    out = tf.switch_case(
        tf.where(same, 0, tf.where(big, 2, 1)),
        [
            lambda: tf.cast(image, tf.float32),
            lambda: tf.image.resize(image, (size, size), method="bilinear"),
            lambda: tf.image.resize(image, (size, size), method="bilinear", antialias=True),
        ],
    )
    out.set_shape([size, size, 3])
    return out


def _decode_window(encoded: tf.Tensor, window_fn, min_size: int) -> tf.Tensor:
    """Decodes only the window `window_fn(height, width)` -> [y, x, h, w] of an image.

    JPEG windows are decoded at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's `ratio`; the
    window is then given in scaled pixels) while their shorter side stays >= `min_size`.
    """

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        window = window_fn(shape[0], shape[1])
        side = tf.minimum(window[2], window[3])
        halvings = tf.reduce_sum(tf.cast(side >= min_size * tf.constant([2, 4, 8]), tf.int32))

        def at(ratio):
            return lambda: tf.io.decode_and_crop_jpeg(
                encoded, window // ratio, channels=3, ratio=ratio
            )

        return tf.switch_case(halvings, [at(1), at(2), at(4), at(8)])

    def other():
        image = decode_rgb(encoded)
        shape = tf.shape(image)
        y, x, h, w = tf.unstack(window_fn(shape[0], shape[1]))
        return image[y : y + h, x : x + w]

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def square_offset(crop_index, resize_size: int, crop_size: int) -> tf.Tensor:
    """int32 (y, x) of crop `crop_index` (0..9) in the S x S square (`crop_offsets`)."""
    return tf.constant(crop_offsets(resize_size, crop_size), tf.int32)[crop_index % 5]


def mirrored(image, crop_index) -> tf.Tensor:
    """`image` flipped left-right for the crop indices 5..9, as is for 0..4."""
    return tf.cond(crop_index >= 5, lambda: tf.reverse(image, axis=[1]), lambda: image)


def finish(pixels_, pixels: Pixels | None):
    """`pixels.normalize(pixels_)`, or the 0..255 pixels as they are when `pixels` is None
    (`build_inputs` normalizes whole batches instead: one op per batch, uint8 until then)."""
    return pixels_ if pixels is None else pixels.normalize(pixels_)


def train_crop(
    encoded, crop_index, resize_size: int, crop_size: int, pixels: Pixels | None
) -> tf.Tensor:
    """One training crop: sub-crop `crop_index` (0..9) of the S-resized center square.

    Args:
      encoded: scalar string tensor of JPEG/PNG bytes.
      crop_index: int32 scalar in [0, 10): window `crop_index % 5`, flipped if >= 5.
      resize_size: S.
      crop_size: s.
      pixels: the normalization (`pixels(config.data)`); None: 0..255, not normalized.

    Returns:
      float32 (s, s, 3), normalized by `pixels`.
    """
    crop_index = tf.convert_to_tensor(crop_index, tf.int32)
    image = _decode_window(
        encoded, lambda h, w: _window(h, w, resize_size, crop_size, crop_index), crop_size
    )
    image = _resize_to(image, crop_size)
    image = mirrored(image, crop_index)
    return finish(image, pixels)


def _square_window(h, w):
    side = tf.minimum(h, w)
    return tf.stack([(h - side) // 2, (w - side) // 2, side, side])


def center_square(encoded, resize_size: int) -> tf.Tensor:
    """Decodes the center square of an image and resizes it to float32 (S, S, 3)."""
    return _resize_to(_decode_window(encoded, _square_window, resize_size), resize_size)


def ten_crops_of_image(
    image: tf.Tensor, resize_size: int, crop_size: int, pixels: Pixels
) -> tf.Tensor:
    """`ten_crops` of an already decoded uint8 (H, W, 3) image."""
    shape = tf.shape(image)
    y, x, h, w = tf.unstack(_square_window(shape[0], shape[1]))
    square = _resize_to(image[y : y + h, x : x + w], resize_size)
    return _crops_of_square(square, resize_size, crop_size, pixels)


def ten_crops(encoded, resize_size: int, crop_size: int, pixels: Pixels) -> tf.Tensor:
    """All 10 crops of an image for test-time averaging.

    Returns:
      float32 (10, s, s, 3), normalized by `pixels`; index i as in `train_crop`.
    """
    return _crops_of_square(center_square(encoded, resize_size), resize_size, crop_size, pixels)


def _crops_of_square(square, resize_size: int, crop_size: int, pixels: Pixels) -> tf.Tensor:
    offsets = crop_offsets(resize_size, crop_size)
    crops = [square[y : y + crop_size, x : x + crop_size] for y, x in offsets]
    crops += [tf.reverse(c, axis=[1]) for c in crops]
    return finish(tf.stack(crops), pixels)


def center_square_uint8(encoded, resize_size: int) -> tf.Tensor:
    """`center_square` rounded to uint8: a compact form to cache in memory."""
    square = tf.round(tf.clip_by_value(center_square(encoded, resize_size), 0.0, 255.0))
    return tf.cast(square, tf.uint8)


def crop_of_square(
    square, crop_index, resize_size: int, crop_size: int, pixels: Pixels
) -> tf.Tensor:
    """Crop `crop_index` (0..9, as in `train_crop`) of an S x S square: float32, normalized
    (`pixels` None: the square's dtype, not normalized)."""
    crop_index = tf.convert_to_tensor(crop_index, tf.int32)
    offset = square_offset(crop_index, resize_size, crop_size)
    crop = tf.slice(square, [offset[0], offset[1], 0], [crop_size, crop_size, 3])
    return finish(mirrored(crop, crop_index), pixels)


def scale_crop_of_square(square, seed, crop_size: int, min_area: float) -> tf.Tensor:
    """A random-resized crop of a square (the scale augmentation of Szegedy et al. 2015):
    a window covering `min_area`..1 of the square's area, aspect ratio 3/4..4/3, at a
    random place, resized (antialiased) to s x s and flipped left-right with probability
    1/2. Stateless: the same int64 `seed` gives the same crop.

    Returns:
      (s, s, 3) of the square's dtype (uint8 squares give uint8 crops), 0..255.
    """
    seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5CA1E, tf.int64)])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(square),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(float(min_area), 1.0),
        max_attempts=10,
    )
    window = tf.slice(square, begin, size)
    crop = tf.image.resize(window, [crop_size, crop_size], antialias=True)
    flip = tf.random.stateless_uniform([], seed + 1) < 0.5
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    if square.dtype == tf.uint8:
        crop = tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8)
    crop.set_shape([crop_size, crop_size, 3])
    return crop


def ten_crops_of_square(square, resize_size: int, crop_size: int, pixels: Pixels) -> tf.Tensor:
    """All 10 crops of an S x S square: float32 (10, s, s, 3), normalized (`pixels` None:
    the square's dtype, not normalized)."""
    return _crops_of_square(square, resize_size, crop_size, pixels)


def center_crop(encoded, resize_size: int, crop_size: int, pixels: Pixels) -> tf.Tensor:
    """The single unflipped center crop (index 4): float32 (s, s, 3), normalized."""
    return train_crop(encoded, CENTER_CROP, resize_size, crop_size, pixels)
