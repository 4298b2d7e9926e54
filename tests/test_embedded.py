"""Tests for the embedded ``zf_shapes`` TFDS dataset (zf_tf/pipelines/embedded.py).

Everything is generated offline into temporary directories with the ``tiny`` config.
"""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zf_tf.experiments.transfer import fits
from zf_tf.pipelines import embedded

SPLIT_SIZES = {"train": 200, "validation": 50, "test": 50}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared ``tiny`` dataset, generated once for the module."""
    path = str(tmp_path_factory.mktemp("tfds"))
    embedded.load("train", data_dir=path, config_name="tiny")
    return path


@pytest.fixture(scope="module")
def examples(data_dir):
    """All tiny examples, decoded to numpy, per split (in TFDS order)."""
    return {
        split: list(tfds.as_numpy(embedded.load(split, data_dir=data_dir, config_name="tiny")))
        for split in SPLIT_SIZES
    }


@pytest.fixture(scope="module")
def rendered():
    """``rendered(split, n)``: the first ``n`` examples of ``split``, rendered without TFDS.

    Returns (images uint8 (n, H, W, 3), labels (n,), mean object RGB (n, 3)); prefixes are
    cached so the colour test and the (slow) linear-probe test share the rendering.
    """
    cache = {}

    def render(split, n):
        done = cache.setdefault(split, [])
        for i in range(len(done), n):
            ex = embedded.render_example(embedded.example_rng(split, i), i % 10)
            done.append((ex["image"], ex["label"], ex["image"][ex["mask"][..., 0] > 0].mean(0)))
        images, labels, obj_rgb = zip(*done[:n])
        return np.stack(images), np.array(labels), np.stack(obj_rgb)

    return render


def test_builder_is_registered_tfds_builder(data_dir):
    b = tfds.builder("zf_shapes/tiny", data_dir=data_dir)
    assert isinstance(b, embedded.ZfShapes)
    assert isinstance(b, tfds.core.GeneratorBasedBuilder)
    assert b.name == "zf_shapes"
    assert str(b.version) == "1.0.0"
    assert b.is_prepared()
    assert b.info.supervised_keys == ("image", "label")
    assert b.info.features["label"].names == embedded.CLASS_NAMES
    assert {c.name for c in embedded.ZfShapes.BUILDER_CONFIGS} >= {"default", "tiny"}
    default = embedded.builder(data_dir, "default").builder_config
    assert (default.num_train, default.num_validation, default.num_test) == (12000, 1000, 1000)


def test_split_sizes_exact(data_dir, examples):
    info = embedded.builder(data_dir, "tiny").info
    for split, n in SPLIT_SIZES.items():
        assert info.splits[split].num_examples == n
        assert len(examples[split]) == n


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ZF_TF_DATA_DIR", str(tmp_path))
    b = embedded.builder(config_name="tiny")
    assert str(b.data_dir).startswith(str(tmp_path))
    assert not b.is_prepared()


def test_features_dtype_and_shape(examples):
    size = embedded.IMAGE_SIZE
    for ex in examples["validation"]:
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (size, size, 3)
        assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (size, size, 1)
        assert set(np.unique(ex["mask"])) <= {0, 255}
        assert ex["bbox"].dtype == np.float32 and ex["bbox"].shape == (4,)
        assert 0 <= ex["label"] < 10


def test_every_class_appears(examples):
    for split, exs in examples.items():
        counts = np.bincount([ex["label"] for ex in exs], minlength=10)
        # Labels cycle over the index, so splits are exactly balanced.
        assert (counts == SPLIT_SIZES[split] // 10).all(), (split, counts)


def test_bbox_tightly_contains_nonempty_mask(examples):
    size = embedded.IMAGE_SIZE
    for exs in examples.values():
        for ex in exs:
            mask = ex["mask"][..., 0] > 0
            ymin, xmin, ymax, xmax = ex["bbox"]
            assert 0.0 <= ymin < ymax <= 1.0 and 0.0 <= xmin < xmax <= 1.0
            assert mask.sum() >= 20  # an object, not a speck
            y0, x0 = int(round(ymin * size)), int(round(xmin * size))
            y1, x1 = int(round(ymax * size)), int(round(xmax * size))
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not mask[~inside].any()
            # Tight: the mask touches all four sides of the box.
            assert mask[y0].any() and mask[y1 - 1].any()
            assert mask[:, x0].any() and mask[:, x1 - 1].any()
            # Object-sized: neither a speck nor filling the frame.
            h, w = ymax - ymin, xmax - xmin
            assert min(h, w) >= 0.1 and 0.25 <= max(h, w) <= 0.85, (h, w)


def test_render_example_deterministic():
    a = embedded.render_example(np.random.default_rng([7, 3]), 4)
    b = embedded.render_example(np.random.default_rng([7, 3]), 4)
    c = embedded.render_example(np.random.default_rng([7, 4]), 4)
    for key in ("image", "bbox", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["label"] == b["label"] == 4
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.uint8 and a["mask"].dtype == np.uint8
    assert a["bbox"].dtype == np.float32


def test_tfds_examples_match_render_example(examples):
    """Stored examples are exactly render_example(example_rng(split, i), i % 10)."""
    for split in ("validation", "test"):
        stored = {_digest(ex["image"]) for ex in examples[split]}
        direct = {
            _digest(embedded.render_example(embedded.example_rng(split, i), i % 10)["image"])
            for i in range(SPLIT_SIZES[split])
        }
        assert stored == direct
    assert not {_digest(ex["image"]) for ex in examples["validation"]} & {
        _digest(ex["image"]) for ex in examples["test"]
    }


def test_second_build_is_identical_and_logs_once(examples, tmp_path, capsys):
    other = str(tmp_path / "other")
    ds = embedded.load("train", data_dir=other, config_name="tiny")
    assert "generating" in capsys.readouterr().err
    again = list(tfds.as_numpy(ds))
    assert len(again) == len(examples["train"])
    np.testing.assert_array_equal(again[0]["image"], examples["train"][0]["image"])
    assert [_digest(e["image"]) for e in again] == [_digest(e["image"]) for e in examples["train"]]
    embedded.load("train", data_dir=other, config_name="tiny")
    assert "generating" not in capsys.readouterr().err


def test_color_is_not_predictive(rendered):
    """Nearest-class-centroid on the mean object RGB is near chance."""
    _, y, f = rendered("train", 500)
    tr, te = slice(0, 250), slice(250, 500)
    centroids = np.stack([f[tr][y[tr] == c].mean(axis=0) for c in range(10)])
    pred = np.argmin(((f[te][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == y[te]) < 0.25


@pytest.mark.slow
def test_linear_probe_on_raw_pixels_is_weak(rendered):
    """Softmax regression on raw pixels (2x downsampled for speed) stays below 40%."""
    x_tr, y_tr, _ = rendered("train", 2000)
    x_te, y_te, _ = rendered("test", 500)

    def features(images):
        n, h, w, c = images.shape
        small = images.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return small.reshape(n, -1).astype(np.float32)

    f_tr, f_te = features(x_tr), features(x_te)
    mean, std = f_tr.mean(0), f_tr.std(0) + 1e-3
    f_tr, f_te = (f_tr - mean) / std, (f_te - mean) / std
    # The transfer experiment's linear classifier: full-batch Adam from zero weights.
    model = fits.fit_linear(f_tr, y_tr, 10, steps=100, learning_rate=3e-3, weight_decay=5e-4)
    train_acc = np.mean(np.argmax(model.predict_on_batch(f_tr), axis=1) == y_tr)
    test_acc = np.mean(np.argmax(model.predict_on_batch(f_te), axis=1) == y_te)
    print(f"linear probe: train {train_acc:.3f} test {test_acc:.3f}")
    # The probe must actually fit (else a low test score would prove nothing).
    assert train_acc > 0.5, train_acc
    assert test_acc < 0.40, (train_acc, test_acc)
