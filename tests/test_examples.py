"""zf_tf/pipelines/examples.py: the analyses' examples are the model's center crops, with the
embedded dataset's boxes and masks mapped into crop pixels."""

import numpy as np
import pytest
import tensorflow as tf

from zf_tf.pipelines import DataError, examples, inputs, preprocess


def test_crop_geometry_maps_the_center_crop():
    # 100 x 80 image: center square rows 10..90, resized 80 -> 72, center 64 crop at 4.
    scale, dy, dx = examples.crop_geometry(100, 80, 72, 64)
    assert scale == pytest.approx(0.9)
    assert dy == pytest.approx(10 * 0.9 + 4)
    assert dx == pytest.approx(4)


def test_box_to_crop_clips_to_the_crop():
    box = examples.box_to_crop([0.0, 0.5, 1.0, 1.0], 80, 80, 72, 64)
    np.testing.assert_array_equal(box, [0, 32, 64, 64])


def test_examples_match_the_pipeline_and_annotations(tiny_config):
    ex = examples.load_examples(tiny_config, "validation", 6)
    assert ex.images.shape == (6, 64, 64, 3) and ex.images.dtype == np.float32
    assert ex.boxes.shape == (6, 4) and ex.masks.shape == (6, 64, 64)
    np.testing.assert_array_equal(ex.indices, np.arange(6))
    images, labels = next(iter(inputs.build_inputs(tiny_config, "validation", mode="center")))
    np.testing.assert_array_equal(ex.labels, labels.numpy()[:6])
    # The pipeline caches uint8-rounded squares: the same crops up to rounding.
    assert np.abs(images.numpy()[:6] - ex.images).max() <= 0.5 + 1e-4
    for box, mask in zip(ex.boxes, ex.masks):
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0
        # The mask lies inside its box, and the box is tight to within a pixel.
        assert box[0] <= ys.min() <= box[0] + 1 and ys.max() < box[2] <= ys.max() + 2
        assert box[1] <= xs.min() <= box[1] + 1 and xs.max() < box[3] <= xs.max() + 2


def test_examples_of_one_class(tiny_config):
    ex = examples.load_examples(tiny_config, "validation", 3, label=2)
    assert (ex.labels == 2).all() and len(ex) == 3
    assert np.all(np.diff(ex.indices) > 0)


def test_examples_without_annotations(tmp_path, tiny_config):
    from tests.images import encode, random_rgb, write

    for c in ("a", "b"):
        for i in range(3):
            write(tmp_path / c / f"{i}.png", encode(random_rgb(50, 70, seed=i)))
    tiny_config.data.source = "folder"
    tiny_config.data.folder = str(tmp_path)
    ex = examples.load_examples(tiny_config, "train", 10)
    assert ex.boxes is None and ex.masks is None
    assert ex.images.shape[1:] == (64, 64, 3)
    encoded = tf.io.read_file(str(tmp_path / "a" / "0.png"))
    expected = preprocess.ten_crops(encoded, 72, 64, preprocess.pixels(tiny_config.data))[4]
    np.testing.assert_allclose(ex.images[0], expected.numpy(), atol=1e-3)


def test_examples_and_class_names_follow_data_classes(tiny_config):
    all_classes = examples.load_examples(tiny_config, "validation", 50)
    tiny_config.data.classes = (7, 2)
    tiny_config.data.num_classes = 2
    ex = examples.load_examples(tiny_config, "validation", 50)
    # Only classes 7 and 2, relabelled 0 and 1 in that order, in split order.
    kept = np.isin(all_classes.labels, [7, 2])
    np.testing.assert_array_equal(ex.labels, (all_classes.labels[kept] == 2).astype(int))
    np.testing.assert_array_equal(ex.images, all_classes.images[kept])
    assert inputs.class_names(tiny_config.data) == ["crescent", "triangle"]
    one = examples.load_examples(tiny_config, "validation", 50, label=1)
    assert (one.labels == 1).all() and len(one) == kept.sum() - (ex.labels == 0).sum()


def test_unknown_split_is_a_data_error(tiny_config):
    with pytest.raises(DataError, match="unknown split 'bogus': valid splits: .*validation"):
        examples.load_examples(tiny_config, "bogus", 2)
