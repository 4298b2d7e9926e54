"""Feature visualization (zf_tf/core/featvis.py, --mode=featvis): an oracle (a hand-set
oriented grating filter gets an image whose spectrum peaks at its orientation and
frequency), batched == one unit at a time, seeds, the colour decorrelation, the optimized
image against every image of the split, the mode's outputs, cache and refusals."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, run_analysis, tiny, workdir_with_model
from tests.helpers import run_workers
from tests.tiny_models import named_convnet
from zf_tf.core import featvis, graph, rules
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples, preprocess

L = keras.layers
TO_INPUT = lambda x: x * 2.0 - 1.0  # noqa: E731 - RGB [0, 1] -> [-1, 1]


@pytest.fixture(scope="module")
def small():
    return named_convnet(size=32)  # conv 'a' (6 units) -> pool -> conv 'b' (8 units) -> ...


def test_batched_equals_one_unit_at_a_time_and_seeds_decide(small):
    """Each image depends on its own unit and seed only: a batch of three gives the images
    of three single runs (to 1e-5: the batched convolutions may add in another order)."""
    params = featvis.Params(steps=24)
    opt = featvis.Optimizer(small, "b", TO_INPUT, params)
    batch = opt.run([0, 3, 5])
    for i, unit in enumerate([0, 3, 5]):
        alone = opt.run([unit])
        np.testing.assert_allclose(alone["image"][0], batch["image"][i], atol=1e-5)
        np.testing.assert_allclose(alone["value"][0], batch["value"][i], rtol=1e-4)
    again = featvis.Optimizer(small, "b", TO_INPUT, params).run([3])
    np.testing.assert_allclose(again["image"], opt.run([3])["image"], atol=1e-6)
    other = featvis.Optimizer(small, "b", TO_INPUT, featvis.Params(steps=24, seed=1)).run([3])
    assert np.abs(other["image"] - again["image"]).max() > 0.05


def test_a_diverse_sets_first_image_is_the_single_image(small):
    """diversity=k: each unit's set of k images, its first image from the unit's single
    image's seeds (equal to it without the penalty, to 1e-5), the others from their own;
    sets batched == one set at a time."""
    plain = featvis.Optimizer(small, "b", TO_INPUT, featvis.Params(steps=16)).run([0, 3])
    params = featvis.Params(steps=16, diversity=3, diversity_weight=1e-9)
    opt = featvis.Optimizer(small, "b", TO_INPUT, params)
    sets = opt.run([0, 3])
    assert sets["image"].shape == (6, 32, 32, 3) and sets["similarity"].shape == (2,)
    np.testing.assert_allclose(sets["image"][[0, 3]], plain["image"], atol=1e-5)
    assert np.abs(sets["image"][1] - sets["image"][0]).max() > 0.05
    np.testing.assert_allclose(opt.run([3])["image"], sets["image"][3:], atol=1e-5)


@pytest.mark.slow
def test_the_diversity_penalty_pushes_a_units_images_apart(trained_default):
    """On the trained default model, 4 images for each of 3 conv5 units: with the penalty
    (weight 1, the default) each set's Gram similarity (0 .. 3) is below 3/4 of what the
    same starts reach without it, their sum below half (measured: 0.51, 1.40, 0.43 against
    1.45, 2.52, 1.33), and each set's best image reaches 3/4 of the best without it
    (measured: 1.04, 0.97, 1.56 of it). Some starts stay dead either way (end at 0)."""
    config, path = trained_default
    model = keras.models.load_model(os.path.join(path, "checkpoints", "model.keras"))
    pixels = preprocess.pixels(config.data)
    to_input = lambda x: pixels.normalize(x * 255.0)  # noqa: E731
    runs = {
        weight: featvis.Optimizer(
            model, "conv5", to_input, featvis.Params(diversity=4, diversity_weight=weight)
        ).run([0, 1, 2])
        for weight in (1e-9, 1.0)
    }
    pushed, free = runs[1.0]["similarity"], runs[1e-9]["similarity"]
    assert (pushed < 0.75 * free).all() and pushed.sum() < 0.5 * free.sum(), (pushed, free)
    best = {weight: run["value"].reshape(3, 4).max(axis=1) for weight, run in runs.items()}
    assert (best[1.0] > 0.75 * best[1e-9]).all(), best


def test_images_stay_in_range_and_beat_their_start(small):
    """Every unit gets beyond its start, also two made dead on it (a bias of -0.05: zero on
    the gray start, reached through the redirected ReLU gradient)."""
    model = keras.models.clone_model(small)
    model.set_weights(small.get_weights())
    kernel, bias = model.get_layer("b").get_weights()
    bias[:2] = -0.05
    model.get_layer("b").set_weights([kernel, bias])
    out = featvis.Optimizer(model, "b", TO_INPUT, featvis.Params(steps=48)).run(range(8))
    assert out["image"].shape == (8, 32, 32, 3) and out["image"].dtype == np.float32
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    # every unit, also those dead on the start (the redirected ReLU gradient reaches them)
    assert (out["start"][:2] == 0).all() and (out["value"] > 2 * out["start"]).all()
    assert (out["value"] > 0).all()
    # negative: 'b' ends in a ReLU, so its map before the ReLU is minimized (after it, any
    # image that silences the unit would be a minimum, 0)
    negative = featvis.Optimizer(model, "b", TO_INPUT, featvis.Params(steps=48, negative=True))
    least = negative.run(range(8))
    assert negative.before_rectifier
    assert (least["value"] < least["start"]).all() and (least["value"] < 0).sum() >= 6


def test_before_the_rectifier_is_the_layers_pre_activation(small):
    """The negative objective's map: a fused-ReLU conv's own convolution plus bias, before
    the ReLU (negative values kept); a layer without a rectifier is left as it is."""
    tap = rules.rule_tap(small, "b", "redirected", before_rectifier=True)
    x = tf.random.uniform((2, 32, 32, 3), seed=1)
    below = graph.tap(small, ["p"])(x)
    b = small.get_layer("b")
    expected = tf.nn.conv2d(below, b.kernel, 1, "SAME") + b.bias
    np.testing.assert_allclose(tap(x), expected, atol=1e-5)
    assert (expected.numpy() < 0).mean() > 0.2
    assert rules.rectified(small, "b") and not rules.rectified(small, "p")
    assert featvis.before_rectifier(small, "b", negative=True)
    assert not featvis.before_rectifier(small, "b", negative=False)
    assert not featvis.before_rectifier(small, "p", negative=True)
    assert not featvis.Optimizer(
        small, "p", TO_INPUT, featvis.Params(negative=True)
    ).before_rectifier


def test_a_grating_filter_gets_its_own_orientation_and_frequency():
    """Oracle: one ReLU unit whose 9x9 filter is a grating of 0.2 cycles/px at 30 degrees
    (the same in the three colours, in a Gaussian window): the spectrum (gray, mean
    removed) of its image, optimized for the default 256 steps, peaks within 0.04
    cycles/px and 12 degrees of it. (At 96 steps the start's low frequencies still win.)"""
    f0, theta = 0.2, np.deg2rad(30)
    y, x = np.mgrid[-4:5, -4:5].astype(np.float32)
    grating = np.cos(2 * np.pi * f0 * (x * np.cos(theta) + y * np.sin(theta)))
    kernel = (grating * np.exp(-(x * x + y * y) / 18))[:, :, None, None] * np.ones((1, 1, 3, 1))
    model = keras.Sequential(
        [keras.Input((48, 48, 3)), L.Conv2D(1, 9, activation="relu", use_bias=False, name="c")]
    )
    model.get_layer("c").set_weights([kernel.astype(np.float32)])
    out = featvis.Optimizer(model, "c", TO_INPUT, featvis.Params(steps=256)).run([0])
    gray = out["image"][0].mean(-1)
    power = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(48), np.fft.fftfreq(48), indexing="ij")
    peak = np.unravel_index(power.argmax(), power.shape)
    frequency = np.hypot(fy[peak], fx[peak])
    angle = np.rad2deg(np.arctan2(fy[peak], fx[peak])) % 180
    assert abs(frequency - f0) <= 0.04, frequency
    assert min(abs(angle - 30), 180 - abs(angle - 30)) <= 12, angle


def test_the_colour_decorrelation_reproduces_the_measured_covariance():
    rng = np.random.default_rng(0)
    mix = np.array([[0.2, 0.05, 0.0], [0.15, 0.1, 0.02], [0.1, 0.12, 0.08]])
    pixels = np.clip(0.5 + rng.normal(size=(5000, 3)) @ mix.T, 0, 1).reshape(50, 10, 10, 3)
    covariance = featvis.color_covariance(pixels)
    np.testing.assert_allclose(covariance, np.cov(pixels.reshape(-1, 3).T), rtol=1e-12)
    root = featvis.color_sqrt(covariance)
    np.testing.assert_allclose(root @ root.T, covariance, rtol=1e-5, atol=1e-7)
    # Lucid's ImageNet matrix is such a root (U sqrt(S): orthogonal columns, to its 2
    # printed decimals): color_sqrt of its own covariance gives it back, up to column signs
    m = featvis.IMAGENET_COLOR_SQRT.astype(np.float64)
    np.testing.assert_allclose(np.abs(featvis.color_sqrt(m @ m.T)), np.abs(m), atol=0.01)


def test_transforms_are_in_graph_affine_maps_about_the_centre():
    """A transform with no rotation, scale 1 and no shift leaves the image as it is; the
    drawn ones stay within the stated ranges (`Params`)."""
    params = featvis.Params(steps=200, jitter=16.0)
    t = featvis.transforms([4], 224, params)[:, 0]
    scale = 1 / np.hypot(t[:, 0], t[:, 1])
    angle = np.rad2deg(np.arctan2(t[:, 1], t[:, 0]))
    assert (scale >= 0.9 - 1e-5).all() and (scale <= 1.1 + 1e-5).all()
    assert np.abs(angle).max() <= 10 + 1e-4 and np.abs(angle).max() > 8
    image = tf.random.uniform((1, 16, 16, 3), seed=0)
    identity = tf.constant([[1, 0, 0, 0, 1, 0, 0, 0]], tf.float32)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=image,
        transforms=identity,
        output_shape=[16, 16],
        fill_value=featvis.FILL,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    np.testing.assert_allclose(moved, image, atol=1e-6)


@pytest.fixture
def workdir(tiny_config, tmp_path):
    config = tiny(tiny_config, tiny_config.data.data_dir, width=0.125)
    keras.utils.set_random_seed(0)
    return config, workdir_with_model(config, model_lib.build_model(config.model), tmp_path / "w")


@pytest.mark.slow
def test_optimized_images_beat_every_image_of_the_split(trained_default, tmp_path):
    """On the trained default model, for 4 units each of conv3 and conv5: the objective on
    the optimized image exceeds its value on every validation image (the center crops the
    scans use) and on the random start."""
    config, original = trained_default
    path = shutil.copytree(original, tmp_path / "w")
    config = copy.deepcopy(config)
    config.analysis.featvis.steps = 256
    config.analysis.featvis.color_images = 0
    model = keras.models.load_model(os.path.join(path, "checkpoints", "model.keras"))
    crops = examples.load_examples(config, "validation", 1000).images
    assert len(crops) == 50
    for layer in ("conv3", "conv5"):
        units = [0, 1, 2, 3]
        result = run_analysis("featvis", config, path, layer=layer, features="0,1,2,3").result
        maps = graph.tap(model, [layer])(crops).numpy()
        best_image = maps.mean(axis=(1, 2))[:, units].max(axis=0)
        assert (result["value"] > best_image).all(), (layer, result["value"], best_image)
        assert (result["value"] > result["start"]).all()


def test_mode_writes_its_outputs_and_a_rerun_reads_the_cache(workdir):
    config, path = workdir
    config.analysis.featvis.steps = 8
    config.analysis.featvis.batch_size = 3
    config.analysis.featvis.color_images = 16
    out = run_analysis("featvis", config, path, layer="conv2", num_features=5)
    folder = os.path.join(path, "featvis", "conv2")
    assert sorted(os.listdir(folder)) == ["channel.json", "channel.npz", "channel.png"]
    saved = np.load(os.path.join(folder, "channel.npz"))
    assert saved["image"].shape == (5, 64, 64, 3) and saved["image"].dtype == np.uint8
    assert saved["units"].tolist() == out.result["units"].tolist()
    summary = json.load(open(os.path.join(folder, "channel.json")))
    assert [u["unit"] for u in summary["units"]] == saved["units"].tolist()
    assert summary["color"] == "16 images"
    cache = sorted(os.listdir(os.path.join(path, "featvis", "cache")))
    assert len(cache) == 2  # batches of 3 and 2 units
    stamps = [os.stat(os.path.join(path, "featvis", "cache", c)).st_mtime_ns for c in cache]
    again = run_analysis("featvis", config, path, layer="conv2", num_features=5, overwrite=True)
    np.testing.assert_array_equal(again.result["image"], out.result["image"])
    assert stamps == [os.stat(os.path.join(path, "featvis", "cache", c)).st_mtime_ns for c in cache]


def _distributed_run(workdir, tmp_path, strategy):
    """--mode=featvis of 5 conv2 units in batches of 3 under `strategy` ('mirrored': 2 CPU
    replicas in one process; 'multi_worker': 2 local worker processes) in a copy of
    `workdir`; (that copy, [(returncode, stdout, stderr)] of each process)."""

    copy_ = shutil.copytree(workdir, tmp_path / strategy)
    command = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--mode=featvis",
        f"--strategy={strategy}",
        f"--workdir={copy_}",
        "--layer=conv2",
        "--num_features=5",
        "--config.analysis.featvis.steps=8",
        "--config.analysis.featvis.batch_size=3",
        "--config.analysis.featvis.color_images=0",
    ]
    if strategy == "multi_worker":
        return copy_, run_workers(tmp_path, command, timeout=300)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return copy_, [(proc.returncode, proc.stdout, proc.stderr)]


def test_a_batch_one_worker_lacks_is_computed_by_all():
    """`_any_worker`: each batch's flag or-ed over the workers in one all-reduce
    (`strategies.sum_over_replicas`); here a second worker faked in the reduce, and the real
    reduce of the default strategy (one replica: the values themselves)."""
    import types

    from zf_tf.analyses import featvis as mode
    from zf_tf.training import strategies

    def worker_beside(*flags):
        other = tf.constant(flags, tf.float64)
        return types.SimpleNamespace(run=lambda fn: fn(), reduce=lambda op, v, axis: v + other)

    assert mode._any_worker(worker_beside(0, 0, 1), [True, False, False]) == [True, False, True]
    assert mode._any_worker(worker_beside(0, 0, 0), [False, True, False]) == [False, True, False]
    assert mode._any_worker(worker_beside(0), []) == []
    one = tf.distribute.get_strategy()
    assert strategies.sum_over_replicas(one, [2, 3.5]).tolist() == [2.0, 3.5]
    assert strategies.sum_over_replicas(one, []).tolist() == []


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mirrored", "multi_worker"])
def test_replicas_and_workers_share_the_units(workdir, tmp_path, strategy):
    """Under --strategy=mirrored (2 CPU replicas) and multi_worker (2 processes) each batch's
    units are split over the replicas (3 units on 2: one repeated, then dropped) and the
    images gathered: the chief writes the same images and values as one device does, once
    per batch in the cache; the other worker writes nothing."""
    config, path = workdir
    copy_, outs = _distributed_run(path, tmp_path, strategy)
    for returncode, _, err in outs:
        assert returncode == 0, err[-3000:]
    assert "Strategy " + strategy + " with 2 replica(s)" in outs[0][1]
    if strategy == "multi_worker":
        assert "Optimized as a non-chief worker" in outs[1][1]
    for _, _, err in outs:  # each process's progress bar counts the whole layer
        assert re.search(r"featvis conv2 on 2 replicas: 100%\S* 40/40 ", err), err[-2000:]
    config.analysis.featvis.steps = 8
    config.analysis.featvis.batch_size = 3
    config.analysis.featvis.color_images = 0
    one = run_analysis("featvis", config, path, layer="conv2", num_features=5).result
    saved = np.load(os.path.join(copy_, "featvis", "conv2", "channel.npz"))
    assert saved["units"].tolist() == one["units"].tolist()
    assert np.abs(saved["image"].astype(int) - one["image"]).max() <= 1  # uint8 rounding
    np.testing.assert_allclose(saved["value"], one["value"], rtol=1e-4, atol=1e-6)
    assert sorted(os.listdir(os.path.join(copy_, "featvis", "cache"))) == sorted(
        os.listdir(os.path.join(path, "featvis", "cache"))
    )


def test_diverse_sets_are_written_a_row_per_unit(workdir):
    config, path = workdir
    config.analysis.featvis.steps = 4
    config.analysis.featvis.diversity = 2
    config.analysis.featvis.color_images = 0
    out = run_analysis("featvis", config, path, layer="conv2", features="1,4,6")
    folder = os.path.join(path, "featvis", "conv2")
    names = ["channel_diverse2.json", "channel_diverse2.npz", "channel_diverse2.png"]
    assert sorted(os.listdir(folder)) == names
    saved = np.load(os.path.join(folder, "channel_diverse2.npz"))
    assert saved["image"].shape == (3, 2, 64, 64, 3) and saved["value"].shape == (3, 2)
    assert saved["units"].tolist() == [1, 4, 6] and saved["similarity"].shape == (3,)
    np.testing.assert_array_equal(saved["image"].reshape(6, 64, 64, 3), out.result["image"])
    rows = json.load(open(os.path.join(folder, "channel_diverse2.json")))["units"]
    assert [len(r["value"]) for r in rows] == [2, 2, 2] and "similarity" in rows[0]
    assert "Diverse sets of 2: Gram similarity" in out.report.lines[1]


@pytest.mark.parametrize(
    "field, value, request_fields, says",
    [
        ("steps", 0, {}, "config.analysis.featvis.steps=0: give an integer of at least 1"),
        ("diversity", 0, {}, "config.analysis.featvis.diversity=0: give an integer of at least"),
        ("diversity_weight", -1.0, {}, "config.analysis.featvis.diversity_weight=-1.0: give a"),
        ("objective", "pixel", {}, "config.analysis.featvis.objective='pixel': choose one of"),
        ("steps", 8, {"layer": "conv9"}, "--layer='conv9' is not valid: choose one of"),
        ("objective", "neuron", {"layer": "fc7"}, "--layer=fc7: the neuron objective needs"),
        ("steps", 8, {"layer": "conv2", "features": "99"}, "--features [99] out of range"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workdir, field, value, request_fields, says):
    config, path = workdir
    config.analysis.featvis[field] = value
    before = sorted(os.listdir(path))
    with pytest.raises(UsageError) as e:
        run_analysis("featvis", config, path, **request_fields)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert sorted(os.listdir(path)) == before


def test_existing_outputs_need_overwrite(workdir):
    config, path = workdir
    config.analysis.featvis.steps = 2
    config.analysis.featvis.color_images = 0
    run_analysis("featvis", config, path, layer="conv1", features="0")
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("featvis", config, path, layer="conv1", features="0")


def test_pixels_map_the_unit_range_into_the_models_input_range():
    """The optimizer's images are RGB in [0, 1]; `Pixels.normalize(255 x)` makes them model
    inputs: exactly the range of real crops under that normalization."""
    pixels = preprocess.Pixels("tf", (0.0, 0.0, 0.0))
    inputs = pixels.normalize(tf.constant([[[[0.0, 0.5, 1.0]]]]) * 255.0).numpy()
    np.testing.assert_allclose(inputs.ravel(), [-1.0, 0.0, 1.0])
