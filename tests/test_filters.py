"""--mode=filters (paper Fig. 6): dead layer-1 filters against hand-set kernels and a
brute-force oracle; the mode end to end on two untrained workdirs (ZFNet, AlexNet layer 1)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import load_config, run_analysis, tiny, workdir_with_model
from tests.helpers import events
from tests.tiny_models import named_convnet, saved_bn_net
from zf_tf.analyses import filters, sources
from zf_tf.core import graph
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError
from zf_tf.training import workdirs


def small_model(config, layer1="zfnet"):
    config.model.width = 0.125
    config.model.layer1 = layer1
    return model_lib.build_model(config.model)


def test_dead_filters_by_rms_and_activity(tiny_config):
    model = small_model(tiny_config)
    conv1 = model.get_layer("conv1")
    kernel, bias = conv1.get_weights()
    assert kernel.shape == (7, 7, 3, 12)
    kernel[..., [0, 5]] = 0.0  # zero weights: dead by RMS, and never active (bias 0)
    kernel[..., 9] *= 1e-3  # tiny weights: dead by RMS, yet still active
    bias[[2, 7]] = -1e4  # normal weights, but the ReLU never opens
    conv1.set_weights([kernel, bias])
    rng = np.random.default_rng(0)
    images = rng.uniform(-120, 120, size=(20, 64, 64, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(20, np.int64))).batch(6)
    dead = filters.dead_filters(model, dataset, rms_threshold=0.01, active_epsilon=1e-6)
    rms = np.sqrt((kernel.astype(np.float64) ** 2).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(dead["rms"], rms, rtol=1e-6)
    assert dead["dead_rms"] == [0, 5, 9]
    # Oracle: conv1's maximum over every image and position, computed in one batch.
    tap = keras.Model(model.inputs[0], conv1.output)
    oracle = tap(images, training=False).numpy().max(axis=(0, 1, 2))
    np.testing.assert_allclose(dead["max_activation"], oracle, rtol=1e-5)
    assert oracle[9] > 1e-6  # the tiny filter does respond
    assert dead["never_active"] == [0, 2, 5, 7]


def _split(config):
    from zf_tf.pipelines import inputs

    return np.concatenate([b[0] for b in inputs.build_inputs(config, "validation", mode="center")])


def _check_model(rec, model, split, features):
    """A filters.json model record against brute force over the split."""
    conv1, conv2 = (
        keras.Model(model.inputs, model.get_layer(n).output)([split]).numpy()
        for n in ("conv1", "conv2")
    )
    kernel = model.get_layer("conv1").get_weights()[0]
    rms = np.sqrt((kernel.astype(np.float64) ** 2).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(rec["rms"], rms, rtol=1e-6)
    dead_rms = np.flatnonzero(rms < 0.01 * rms.max()).tolist()
    assert rec["dead"]["rms"] == {"count": len(dead_rms), "indices": dead_rms}
    oracle = conv1.max(axis=(0, 1, 2))
    np.testing.assert_allclose(rec["max_activation"], oracle, rtol=1e-5)
    never = np.flatnonzero(oracle <= 1e-6).tolist()
    assert rec["dead"]["never_active"] == {"count": len(never), "indices": never}
    winners = rec["layer2_winners"]
    assert [w["feature"] for w in winners] == features
    for w in winners:
        f = w["feature"]
        np.testing.assert_allclose(w["activation"], conv2[..., f].max(), rtol=1e-5)
        np.testing.assert_allclose(conv2[w["image"], w["y"], w["x"], f], w["activation"], 1e-5)
        assert tuple(w["box"]) == graph.receptive_field(model, "conv2", w["y"], w["x"])


@pytest.mark.slow
def test_mode_end_to_end(tiny_data_dir, tmp_path, capsys):
    zf_config = tiny(load_config(), tiny_data_dir, width=0.125)
    alex_config = tiny(load_config(), tiny_data_dir, width=0.125, **{"model.layer1": "alexnet"})
    zf, alex = (model_lib.build_model(c.model) for c in (zf_config, alex_config))
    zf_dir = workdir_with_model(zf_config, zf, tmp_path / "zfnet")
    alex_dir = workdir_with_model(alex_config, alex, tmp_path / "alexnet")
    config = workdirs.load_config(zf_dir, zf_config)  # as the command line reads it
    run = run_analysis("filters", config, zf_dir, compare=alex_dir)
    png_path, json_path = (os.path.join(zf_dir, "filters", n) for n in filters.OUTPUTS)
    assert run.paths == {"filters.png": png_path, "filters.json": json_path}
    png = np.asarray(Image.open(png_path))
    assert png.ndim == 3 and min(png.shape[:2]) > 300
    record = json.loads(open(json_path).read())
    assert record == run.report.summary and record["split"] == "validation"
    assert record["num_images"] == 50
    assert list(record["models"]) == ["zfnet (this workdir)", "alexnet (compare workdir)"]
    zf_rec, alex_rec = record["models"].values()
    assert zf_rec["workdir"] == zf_dir and alex_rec["workdir"] == alex_dir
    assert zf_rec["layer1"] == {"kernel": 7, "stride": 2, "filters": 12}
    assert alex_rec["layer1"] == {"kernel": 11, "stride": 4, "filters": 12}
    # 16 of conv2's 32 maps, seeded by config.seed, the same for both models.
    features = sorted(np.random.default_rng([config.seed, 2]).choice(32, 16, replace=False))
    split = _split(config)
    _check_model(zf_rec, zf, split, [int(f) for f in features])
    _check_model(alex_rec, alex, split, [int(f) for f in features])
    tb = events(os.path.join(zf_dir, "logs", "filters"))
    assert list(tb) == ["filters/comparison"]
    assert tb["filters/comparison"][-1][1].shape == png.shape[:2] + (3,)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        "| model | layer 1 | filters | dead (RMS) | never active |",
        "|---|---|---|---|---|",
    ]
    for line, rec, label in zip(printed[2:4], (zf_rec, alex_rec), record["models"]):
        g, dead = rec["layer1"], rec["dead"]
        assert line == (
            f"| {label} | {g['kernel']}x{g['kernel']}/{g['stride']} | 12 | "
            f"{dead['rms']['count']} | {dead['never_active']['count']} |"
        )
    assert printed[4:] == [f"Wrote {png_path}, {json_path}"]
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("filters", config, zf_dir, compare=alex_dir)
    # --num_images: the first images of the split only; --overwrite replaces.
    again = run_analysis("filters", config, zf_dir, compare=alex_dir, num_images=10, overwrite=True)
    assert again.report.summary["num_images"] == 10
    assert json.loads(open(json_path).read()) == again.report.summary


def test_bad_input_is_refused_first(tmp_path, tiny_config):
    workdir = str(tmp_path / "w")
    with pytest.raises(UsageError, match="run --mode=train first"):  # no comparison needed
        run_analysis("filters", tiny_config, workdir)
    expected = "python main.py --mode=train --config.model.layer1=alexnet --workdir=/nowhere"
    with pytest.raises(UsageError) as error:  # an explicit --compare must hold a model
        run_analysis("filters", tiny_config, workdir, compare="/nowhere")
    assert expected in str(error.value) and "\n" not in str(error.value)
    # A comparison model exists, but the split does not.
    compare = workdir_with_model(tiny_config, small_model(tiny_config), tmp_path / "alexnet")
    with pytest.raises(DataError, match="unknown split 'nope'"):
        run_analysis("filters", tiny_config, workdir, compare=compare, split="nope")
    assert not os.path.exists(os.path.join(workdir, "filters"))


# ---------------------------------------------------------------------------------------------
# Any model: layers 1 and 2 follow the model
# ---------------------------------------------------------------------------------------------


def _settings(**fields):
    return filters.Settings(
        workdir="/w",
        compare="/c",
        split="validation",
        num_images=0,
        rms_threshold=0.01,
        active_epsilon=1e-6,
        layer2_features=16,
        seed=0,
        layer1="zfnet",
        **fields,
    )


def test_resolve_picks_the_models_own_layers(tiny_config):
    assert tuple(tiny_config.analysis.filters.layers) == ("", "")
    model = named_convnet()
    brought = sources.Source(model=model, config=tiny_config, own_labels=False)
    r = filters.resolve(_settings(), model, brought)
    assert (r.layers, r.layer1, r.origin) == (("a", "b"), "named_convnet", "--model")
    own = sources.Source(model=None, config=tiny_config)
    r = filters.resolve(_settings(), small_model(tiny_config), own)
    assert (r.layers, r.layer1, r.origin) == (("conv1", "conv2"), "zfnet", "this workdir")
    assert filters.resolve(_settings(layers=("a", "a")), model, brought).layers == ("a", "a")
    with pytest.raises(
        UsageError,
        match=r"layer 1 'b' is not a conv layer on the RGB image .*: "
        r"choose one of a$",
    ):
        filters.resolve(_settings(layers=("b", "")), model, brought)
    with pytest.raises(UsageError, match=r"layer 2 'h' is not valid: choose one of a, b$"):
        filters.resolve(_settings(layers=("", "h")), model, brought)
    one = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(2, 3, name="only")])
    with pytest.raises(UsageError, match="needs a model with 2 conv layers; .* has 1: only$"):
        filters.resolve(_settings(), one, brought)


def test_dead_filters_of_any_model_are_its_first_conv_layers():
    model = named_convnet()
    images = np.random.default_rng(1).uniform(-120, 120, size=(6, 64, 64, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(3)
    dead = filters.dead_filters(model, dataset)
    kernel = model.get_layer("a").get_weights()[0]
    rms = np.sqrt((kernel.astype(np.float64) ** 2).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(dead["rms"], rms, rtol=1e-6)
    oracle = keras.Model(model.input, model.get_layer("a").output)(images).numpy()
    np.testing.assert_allclose(dead["max_activation"], oracle.max(axis=(0, 1, 2)), rtol=1e-5)
    assert filters.layer1_geometry(model) == {"kernel": 5, "stride": 2, "filters": 6}
    assert filters.conv2_features(model, 4, 0) == filters.conv2_features(model, 4, 0, "b")


@pytest.mark.slow
def test_mode_on_a_model_brought_along(tiny_data_dir, tmp_path):
    alex_config = tiny(load_config(), tiny_data_dir, width=0.125, **{"model.layer1": "alexnet"})
    alex = model_lib.build_model(alex_config.model)
    alex_dir = workdir_with_model(alex_config, alex, tmp_path / "alexnet")
    config = tiny(load_config(), tiny_data_dir)
    path = saved_bn_net(tmp_path)
    run = run_analysis(
        "filters", config, tmp_path / "w", model=path, compare=alex_dir, num_images=10
    )
    record = json.loads(open(run.paths["filters.json"]).read())
    assert record == run.report.summary and record["num_images"] == 10
    assert list(record["models"]) == ["bn_net (--model)", "alexnet (compare workdir)"]
    mine, other = record["models"].values()
    assert mine["layers"] == ["c1", "c2"] and other["layers"] == ["conv1", "conv2"]
    assert mine["layer1"] == {"kernel": 5, "stride": 2, "filters": 8}
    assert [w["feature"] for w in mine["layer2_winners"]] == list(range(12))  # all of c2's
    png = np.asarray(Image.open(run.paths["filters.png"]))
    assert png.ndim == 3 and min(png.shape[:2]) > 300
    # Without a comparison workdir: this model's row alone, and one line saying how to add it.
    alone = run_analysis("filters", config, tmp_path / "w2", model=path, num_images=10)
    assert list(alone.report.summary["models"]) == ["bn_net (--model)"]
    assert alone.report.lines[-1].startswith("No AlexNet-style layer-1 model to compare with")
    assert "--config.model.layer1=alexnet" in alone.report.lines[-1]
    png = np.asarray(Image.open(alone.paths["filters.png"]))
    assert png.ndim == 3 and min(png.shape[:2]) > 300
