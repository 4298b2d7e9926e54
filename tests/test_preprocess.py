"""10-crop geometry, pixel-exact against numpy slicing, eagerly and inside Dataset.map; the
pixel normalizations (`config.data.preprocessing`) against keras.applications."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import load_config
from tests.images import encode, random_rgb
from zf_tf.pipelines import preprocess

S, s = 72, 64
MEAN = (10.0, 20.0, 30.0)
PIXELS = preprocess.Pixels("zfnet", MEAN)


def numpy_crops(square):
    """The paper's 10 crops of an S x S array by plain slicing."""
    e, c = S - s, (S - s) // 2
    windows = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
    crops = [square[y : y + s, x : x + s] for y, x in windows]
    return np.stack(crops + [c[:, ::-1] for c in crops]).astype(np.float32) - np.float32(MEAN)


def run(fn, encoded, *args, in_map):
    if not in_map:
        return fn(tf.constant(encoded), *args).numpy()
    ds = tf.data.Dataset.from_tensors(tf.constant(encoded)).map(lambda e: fn(e, *args))
    return next(iter(ds)).numpy()


def test_crop_offsets():
    assert preprocess.crop_offsets(256, 224) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    with pytest.raises(ValueError):
        preprocess.crop_offsets(64, 72)


# Inside Dataset.map (graph mode) the crops take ~8 s each: slow; the eager ones and
# test_train_crop_of_large_image_matches_resize_then_slice cover Dataset.map in the fast set.
@pytest.mark.parametrize("in_map", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("hw", [(S, 100), (90, S)])
def test_crops_pixel_exact_when_short_side_is_S(in_map, fmt, hw):
    array = random_rgb(*hw)
    encoded = encode(array, fmt, quality=95) if fmt == "JPEG" else encode(array, fmt)
    decoded = tf.io.decode_image(encoded, channels=3).numpy()  # JPEG is lossy: compare to it
    h, w = hw
    y0, x0 = (h - S) // 2, (w - S) // 2
    expected = numpy_crops(decoded[y0 : y0 + S, x0 : x0 + S])

    def check(got, want, what):
        if fmt == "PNG":
            np.testing.assert_array_equal(got, want, err_msg=what)
        else:
            # Decoding only a window of a JPEG upsamples chroma differently at the window's
            # edge (libjpeg), so a few edge pixels differ by a few levels.
            assert got.shape == want.shape and np.abs(got - want).mean() < 0.5, what

    for i in range(10):
        got = run(lambda e, i: preprocess.train_crop(e, i, S, s, PIXELS), encoded, i, in_map=in_map)
        check(got, expected[i], f"train crop {i}")
    got = run(lambda e: preprocess.ten_crops(e, S, s, PIXELS), encoded, in_map=in_map)
    check(got, expected, "ten crops")
    got = run(lambda e: preprocess.center_crop(e, S, s, PIXELS), encoded, in_map=in_map)
    check(got, expected[preprocess.CENTER_CROP], "center crop")
    # The cached path: decode once to a uint8 S x S square, then slice.
    for i in range(10):
        got = run(
            lambda e, i: preprocess.crop_of_square(
                preprocess.center_square_uint8(e, S), i, S, s, PIXELS
            ),
            encoded,
            i,
            in_map=in_map,
        )
        check(got, expected[i], f"cached square crop {i}")


@pytest.mark.parametrize("in_map", [False, True])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])  # JPEG: windows decoded at 1/2 in the DCT
def test_train_crop_of_large_image_matches_resize_then_slice(in_map, fmt):
    array = random_rgb(2 * S, 3 * S, seed=3)  # shorter side 2S: every window halves
    encoded = encode(array, fmt, quality=95) if fmt == "JPEG" else encode(array, fmt)
    array = tf.io.decode_image(encoded, channels=3).numpy()
    resized = tf.image.resize(array, (S, 3 * S // 2), antialias=True).numpy()
    x0 = (resized.shape[1] - S) // 2
    expected = numpy_crops(resized[:, x0 : x0 + S])
    for i in range(10):
        got = run(lambda e, i: preprocess.train_crop(e, i, S, s, PIXELS), encoded, i, in_map=in_map)
        assert got.shape == (s, s, 3)
        # Same windows; only interpolation (and DCT scaling for JPEG) differs.
        assert np.abs(got - expected[i]).mean() < (2.0 if fmt == "PNG" else 4.0), i


def test_small_images_are_upscaled():
    encoded = encode(random_rgb(20, 30), "PNG")
    assert preprocess.train_crop(encoded, 7, S, s, PIXELS).shape == (s, s, 3)
    assert preprocess.ten_crops(encoded, S, s, PIXELS).shape == (10, s, s, 3)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA"])
def test_odd_color_modes_decode_to_rgb(mode):
    array = random_rgb(80, 80, seed=4)
    fmt = "PNG" if mode == "RGBA" else "JPEG"
    rgb = preprocess.decode_rgb(encode(array, fmt, mode=mode)).numpy()
    assert rgb.shape == (80, 80, 3) and rgb.dtype == np.uint8
    if mode == "L":
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    else:
        # CMYK and RGBA keep the colors (JPEG within compression error).
        assert np.abs(rgb.astype(float) - array).mean() < 8


def test_png_bytes_in_jpeg_named_file_decode():
    array = random_rgb(S, S, seed=5)
    got = preprocess.center_crop(encode(array, "PNG"), S, s, preprocess.Pixels("raw", MEAN)).numpy()
    e = (S - s) // 2
    np.testing.assert_array_equal(got, array[e : e + s, e : e + s])


# ---------------------------------------------------------------------------------------------
# Pixel normalization (config.data.preprocessing)
# ---------------------------------------------------------------------------------------------


def _uint8_batch(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["caffe", "tf", "torch"])
def test_normalization_equals_keras_applications(kind):
    from keras.applications import imagenet_utils

    x = _uint8_batch()
    want = imagenet_utils.preprocess_input(x.astype(np.float32), mode=kind)
    pixels = preprocess.Pixels(kind, MEAN)
    np.testing.assert_allclose(pixels.normalize(x).numpy(), want, atol=1e-4)
    # The same op inside Dataset.map, on float input.
    ds = tf.data.Dataset.from_tensors(x.astype(np.float32)).map(pixels.normalize)
    np.testing.assert_allclose(next(iter(ds)).numpy(), want, atol=1e-4)


def test_zfnet_subtracts_the_mean_exactly_and_raw_is_the_identity():
    x = _uint8_batch(1).astype(np.float32)
    got = preprocess.Pixels("zfnet", MEAN).normalize(x).numpy()
    np.testing.assert_array_equal(got, x - np.asarray(MEAN, np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(preprocess.Pixels("raw", MEAN).normalize(x).numpy(), x)


@pytest.mark.parametrize("kind", preprocess.PREPROCESSING)
def test_display_inverts_normalization_and_fill_is_the_mean_colour(kind):
    rgb = np.random.default_rng(2).uniform(0, 1, (3, 4, 3)).astype(np.float32)
    pixels = preprocess.Pixels(kind, MEAN)
    np.testing.assert_allclose(pixels.display(pixels.normalize(255 * rgb)), rgb, atol=1e-5)
    assert pixels.display(np.full(3, 1e4, np.float32)).max() <= 1  # clipped
    fill = pixels.fill
    assert fill.shape == (3,) and fill.dtype == np.float32
    np.testing.assert_allclose(pixels.display(fill), np.asarray(MEAN) / 255, atol=1e-6)


def test_zfnet_fill_is_exactly_zero():
    fill = preprocess.pixels(load_config().data).fill
    np.testing.assert_array_equal(fill, 0.0)
    assert not np.signbit(fill).any()


def test_pixels_from_config_and_from_an_older_config():
    data = load_config().data
    assert data.preprocessing == "zfnet"
    assert preprocess.pixels(data) == preprocess.Pixels("zfnet", tuple(data.mean))
    data.preprocessing = "torch"
    assert preprocess.pixels(data).kind == "torch"
    # A workdir's config.json written before the field existed, made current on loading.
    from zf_tf.training import workdirs

    old = workdirs.upgrade({"data": {"mean": [1, 2, 3]}})["data"]
    assert preprocess.pixels(old) == preprocess.Pixels("zfnet", (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="choose one of zfnet, caffe, tf, torch, raw"):
        preprocess.Pixels("imagenet", MEAN)


def test_validate_config_refuses_an_unknown_preprocessing():
    from zf_tf import cli
    from zf_tf.pipelines import DataError

    config = cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.data.preprocessing=caffe"])
    cli.validate_config(config)
    config = cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.data.preprocessing=vgg"])
    with pytest.raises(DataError) as e:
        cli.validate_config(config)
    assert str(e.value) == (
        "config.data.preprocessing='vgg' is not valid: choose one of zfnet, caffe, tf, torch, raw"
    )
