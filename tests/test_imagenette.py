"""The real-photos recipe (configs/imagenette.py): its training knobs (scale augmentation,
learning-rate warmup, weight decay, label smoothing, epoch times), the config and its
transfer counterpart, the tfds path on mock data, and a few steps on a subset of the real
Imagenette photos from prepared shards (skipped when ../shared is absent)."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import SHARED_DATA, load_config
from zf_tf import cli
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, inputs, prepare, preprocess
from zf_tf.pipelines import folder as folder_lib
from zf_tf.training import callbacks, train

IMAGENETTE = os.path.join(SHARED_DATA, "imagenette")
CALTECH101 = os.path.join(SHARED_DATA, "caltech101")


def square(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))


# --- scale augmentation --------------------------------------------------------------


def test_scale_crop_of_the_whole_square_is_its_resize():
    """At min_area 1 the only window is the whole square: the crop is the square resized
    (antialiased) to s x s, rounded to uint8, flipped or not."""
    sq = square(0)
    expected = tf.cast(tf.round(tf.image.resize(sq, [24, 24], antialias=True)), tf.uint8)
    flips = set()
    for seed in range(8):
        crop = preprocess.scale_crop_of_square(sq, tf.constant(seed, tf.int64), 24, 1.0)
        assert crop.dtype == tf.uint8 and crop.shape == (24, 24, 3)
        if np.array_equal(crop, expected):
            flips.add(False)
        else:
            np.testing.assert_array_equal(crop, expected[:, ::-1])
            flips.add(True)
    assert flips == {False, True}  # both happen over 8 seeds


def test_scale_crops_are_seeded_and_vary():
    sq = square(1, 64)
    crop = lambda seed: preprocess.scale_crop_of_square(sq, tf.constant(seed, tf.int64), 40, 0.25)  # noqa: E731
    np.testing.assert_array_equal(crop(3), crop(3))
    crops = np.stack([crop(seed).numpy() for seed in range(6)])
    assert len({c.tobytes() for c in crops}) == 6
    # Inside a Dataset.map as eagerly.
    ds = tf.data.Dataset.range(3).map(lambda i: preprocess.scale_crop_of_square(sq, i, 40, 0.25))
    np.testing.assert_array_equal(list(ds.as_numpy_iterator())[2], crop(2))


def test_scale_crop_window_is_a_resized_part_of_the_square():
    """A crop of a square whose pixel value encodes its column: the crop's columns are a
    monotone run of the square's columns, covering at least sqrt(min_area * 3/4) of it."""
    cols = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    for seed in range(10):
        crop = preprocess.scale_crop_of_square(
            tf.constant(cols), tf.constant(seed, tf.int64), 32, 0.5
        )
        row = crop.numpy()[16, :, 0].astype(int)
        if row[0] > row[-1]:
            row = row[::-1]  # flipped
        assert np.all(np.diff(row) >= 0)
        assert (row[-1] - row[0]) / 4 + 1 >= 64 * np.sqrt(0.5 * 3 / 4) - 2


def test_build_inputs_with_scale_augmentation(tiny_config):
    config = tiny_config
    config.data.augment = "scale"
    first = inputs.build_inputs(config, "train", normalize=False)
    x, y = next(iter(first))
    s = config.data.crop_size
    assert x.dtype == tf.uint8 and x.shape == (config.train.batch_size, s, s, 3)
    again, _ = next(iter(inputs.build_inputs(config, "train", normalize=False)))
    np.testing.assert_array_equal(x, again)  # seeded
    ten_crop = tiny_config.copy_and_resolve_references()
    ten_crop.data.augment = "ten_crop"
    x10, _ = next(iter(inputs.build_inputs(ten_crop, "train", normalize=False)))
    assert not np.array_equal(x, x10)
    # Evaluation is the paper's 10 crops whatever the training augmentation.
    e, _ = next(iter(inputs.build_inputs(config, "validation", mode="ten_crop")))
    assert e.shape[1:] == (10, s, s, 3)


# --- optimizer knobs -----------------------------------------------------------------


def test_linear_warmup_ramps_then_leaves_the_rate_alone():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(self.model.optimizer.learning_rate.numpy()))

    x, y = np.ones((6, 3), np.float32), np.zeros((6, 2), np.float32)
    warm = callbacks.LinearWarmup(0.1, 4)
    model.fit(x, y, batch_size=1, epochs=1, callbacks=[warm, Record()], verbose=0)
    np.testing.assert_allclose(seen, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)
    # Annealed later (ReduceLROnPlateau): the warmup leaves it.
    model.optimizer.learning_rate = 0.01
    seen.clear()
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[warm, Record()], verbose=0)
    np.testing.assert_allclose(seen, [0.01] * 3, rtol=1e-6)


def test_resumed_warmup_continues_from_the_optimizer_step():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(2)  # as a restored backup holds it
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(self.model.optimizer.learning_rate.numpy()))

    x, y = np.ones((3, 3), np.float32), np.zeros((3, 2), np.float32)
    model.fit(x, y, batch_size=1, callbacks=[callbacks.LinearWarmup(0.2, 4), Record()], verbose=0)
    np.testing.assert_allclose(seen, [0.15, 0.2, 0.2], rtol=1e-6)


def test_warmup_steps_from_epochs():
    config = load_config("imagenette")
    config.train.warmup_epochs = 1.5
    (warm,) = train.warmup(config, 10)
    assert warm.steps == 15 and warm.base == config.train.learning_rate
    config.train.warmup_epochs = 0.0
    assert train.warmup(config, 10) == []


def test_label_smoothing_loss_is_the_smoothed_cross_entropy():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = tf.constant([0, 1])
    eps = 0.1
    target = np.full((2, 3), eps / 3) + np.eye(3)[[0, 1]] * (1 - eps)
    logp = tf.nn.log_softmax(logits).numpy()
    expected = -(target * logp).sum(axis=1).mean()
    got = train.loss(eps)(labels, logits)
    np.testing.assert_allclose(float(keras.ops.mean(got)), expected, rtol=1e-6)
    plain = keras.ops.mean(train.loss(0.0)(labels, logits))
    np.testing.assert_allclose(float(plain), -logp[[0, 1], [0, 1]].mean(), rtol=1e-6)


def test_weight_decay_reaches_the_optimizer_and_decays_by_lr_times_it():
    config = load_config("imagenette")
    config.model.width = 0.05
    config.train.weight_decay = 0.05
    assert (
        train.compile_model(model_lib.build_model(config.model), config).optimizer.weight_decay
        == 0.05
    )
    config.train.weight_decay = 0.0
    assert (
        train.compile_model(model_lib.build_model(config.model), config).optimizer.weight_decay
        is None
    )
    # Keras' decoupled form, as the config's docstring counts it: a weight whose gradient
    # is zero (zero inputs) shrinks by lr x weight_decay per step.
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, weight_decay=0.05), loss="mse")
    model.fit(np.zeros((1, 2), np.float32), np.zeros((1, 1), np.float32), epochs=2, verbose=0)
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), (1 - 0.1 * 0.05) ** 2, rtol=1e-6)


# --- the configs ---------------------------------------------------------------------


def test_imagenette_config_validates_and_builds():
    config = load_config("imagenette")
    cli.validate_config(config)
    assert config.data.eval_split == "val" and config.analysis.split == "val"
    model = model_lib.build_model(config.model)
    shapes = {name: model.get_layer(name).output.shape[1:] for name in model_lib.CONV_LAYERS}
    assert shapes["conv1"] == (54, 54, 48) and shapes["conv5"] == (6, 6, 128)
    assert model.get_layer("fc7").output.shape[1:] == (2048,)
    assert model.output.shape[1:] == (10,)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "data.augment",
            "mixup",
            "config.data.augment='mixup' is not valid: choose one of ten_crop, scale",
        ),
        (
            "data.min_crop_area",
            0.0,
            "config.data.min_crop_area=0.0 is not valid: it must be in (0, 1]",
        ),
        (
            "train.warmup_epochs",
            -1.0,
            "config.train.warmup_epochs=-1.0 is not valid: it must be >= 0",
        ),
        ("train.label_smoothing", 1.0, "config.train.label_smoothing=1.0 is not valid"),
        (
            "train.weight_decay",
            -0.1,
            "config.train.weight_decay=-0.1 is not valid: it must be >= 0",
        ),
    ],
)
def test_bad_recipe_values_are_refused(key, value, message):
    config = load_config("imagenette")
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(DataError if section == "data" else UsageError) as e:
        cli.validate_config(config)
    assert message in str(e.value)


def test_transfer_config_from_a_folder_validates():
    from zf_tf.experiments import transfer

    config = load_config("transfer_caltech101", "folder")
    assert config.transfer.data.source == "folder"
    assert tuple(config.transfer.per_class) == (5, 10, 15, 20, 30)
    assert config.transfer.draws == 5 and config.transfer.test_per_class == 50
    if os.path.isdir(CALTECH101):
        transfer.check_config(config)
    tfds_config = load_config("transfer_caltech101")
    assert tfds_config.transfer.data.source == "tfds"


# --- tfds (mock data, no network) ----------------------------------------------------


def test_tfds_imagenette_on_mock_data(tmp_path):
    """The config with the tfds name (a user's machine with internet) reads train and
    validation batches; tfds' mock data stands in for the download."""
    import tensorflow_datasets as tfds

    config = load_config("imagenette")
    config.data.source, config.data.name = "tfds", "imagenette/160px-v2"
    config.data.eval_split = "validation"
    config.data.data_dir = str(tmp_path)
    config.data.shuffle_buffer = 16
    config.train.batch_size = config.train.eval_batch_size = 4
    builder = tfds.builder(config.data.name, data_dir=str(tmp_path))
    splits = [
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
        for name, n in (("train", 12), ("validation", 8))
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        assert inputs.num_examples(config.data, "train") == 12
        assert len(inputs.class_names(config.data)) == 10
        x, y = next(iter(inputs.build_inputs(config, "train", normalize=False)))
        assert x.dtype == tf.uint8 and x.shape == (4, 112, 112, 3)
        assert y.dtype == tf.int64 and 0 <= int(tf.reduce_min(y)) <= int(tf.reduce_max(y)) < 10
        e, _ = next(iter(inputs.build_inputs(config, "validation", mode="ten_crop")))
        assert e.shape == (4, 10, 112, 112, 3)


# --- real photos: a subset of ../shared/data/imagenette --------------------------------


def _subset(root, per_class_train=5, per_class_val=2):
    """Symlinks to the first images of each class, plus every grayscale one among the
    first 40 of the first class (Imagenette has 242 grayscale JPEGs)."""
    from PIL import Image

    gray = 0
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for wnid in sorted(os.listdir(os.path.join(IMAGENETTE, split))):
            src = os.path.join(IMAGENETTE, split, wnid)
            names = sorted(os.listdir(src))
            chosen = names[:n]
            if split == "train" and not gray:
                for name in names[:400]:
                    with Image.open(os.path.join(src, name)) as im:
                        if im.mode == "L":
                            chosen.append(name)
                            gray += 1
                    if gray >= 2:
                        break
            os.makedirs(os.path.join(root, split, wnid))
            for name in chosen:
                os.symlink(os.path.join(src, name), os.path.join(root, split, wnid, name))
    return gray


@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="../shared/data/imagenette absent")
def test_imagenette_subset_trains_from_prepared_shards(tmp_path):
    folder, shards, workdir = tmp_path / "photos", tmp_path / "prep", tmp_path / "w"
    gray = _subset(str(folder))
    assert gray >= 1
    folder_lib.forget()
    config = load_config("imagenette")
    config.data.folder = str(folder)
    meta = prepare.prepare(config.data, str(shards), ["train", "val"], encoding="raw")
    assert meta["splits"]["train"]["examples"] == 50 + gray
    assert meta["splits"]["val"]["examples"] == 20
    config.data.source, config.data.prepared_dir = "prepared", str(shards)
    config.train.epochs, config.train.steps_per_epoch = 2, 2
    config.train.batch_size, config.train.eval_batch_size = 16, 16
    config.train.callbacks = ()
    config.data.shuffle_buffer = 64
    train.train_and_evaluate(config, str(workdir), tf.distribute.get_strategy())
    with open(workdir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["epoch_seconds"]) > 0 for r in rows)
    results = json.loads((workdir / "eval.json").read_text())
    assert results["split"] == "val" and results["num_images"] == 20
    assert 0 <= results["ten_crop"]["top1_error"] <= 100


def test_validation_callback_equals_evaluate(tiny_config):
    """`callbacks.Validation` (one persistent iterator, cross-replica) gives fit's
    validation figures: the same loss and accuracies as `model.evaluate`, every epoch, with
    a last partial batch (50 images in batches of 8)."""
    config = tiny_config
    config.model.width = 0.25
    model = train.compile_model(model_lib.build_model(config.model), config)
    val = inputs.build_inputs(config, "validation", None, "center")
    expected = model.evaluate(val, verbose=0, return_dict=True)
    validation = callbacks.Validation(val)
    validation.set_model(model)
    for epoch in range(3):  # counted pass, then the repeated iterator twice
        logs = {}
        validation.on_epoch_end(epoch, logs)
        assert validation.batches == 7
        np.testing.assert_allclose(logs["val_loss"], expected["loss"], rtol=1e-5)
        np.testing.assert_allclose(logs["val_top1"], expected["top1"], atol=1e-6)
        np.testing.assert_allclose(logs["val_top5"], expected["top5"], atol=1e-6)
