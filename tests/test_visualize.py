"""--mode=deconv: top-k panels against a brute-force scan, the index JSON, TensorBoard,
--image against the model's own maxima, the refusals, and the command line's one line."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_config, run_analysis, tiny, workdir_with_model
from tests.helpers import error_lines, events, main_py
from tests.images import encode, random_rgb, write
from zf_tf import outputs
from zf_tf.analyses import deconv as visualize
from zf_tf.core import graph
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, inputs, preprocess

WIDTH = 0.125  # conv2: 32 maps, conv5: 32 maps


@pytest.fixture
def config(tiny_data_dir):
    return tiny(load_config(), tiny_data_dir, width=WIDTH, batch_size=16)


def test_top_k_panels_index_and_tensorboard(config, tmp_path):
    model = model_lib.build_model(config.model)
    workdir = workdir_with_model(config, model, tmp_path / "w")
    out = run_analysis("deconv", config, workdir, layer="conv2", num_features=3).paths
    png = tmp_path / "w" / "deconv" / "conv2" / "top9_validation.png"
    assert out == {
        "top9_validation.png": str(png),
        "top9_validation.json": str(png.with_suffix(".json")),
    }
    index = json.loads(png.with_suffix(".json").read_text())
    expected = sorted(np.random.default_rng(config.seed).choice(32, 3, replace=False).tolist())
    assert index["features"] == expected
    assert index["num_images"] == 50 and index["k"] == 9 and index["split"] == "validation"
    assert index["receptive_field"] == graph.receptive_field_size(model, "conv2")
    paper = "ReLU of the signal (the paper's rule)"
    assert index["form"] == "explicit" and index["way_down"] == [
        {"layer": layer, "activation": "relu", "rule": paper} for layer in ("conv1", "conv2")
    ]
    # Brute force: conv2 over the whole split; each map's 9 images with the highest maximum.
    split = np.concatenate([b[0] for b in inputs.build_inputs(config, "validation", mode="center")])
    maps = keras.Model(model.inputs, model.get_layer("conv2").output)([split]).numpy()
    winners = index["winners"]
    assert [w["feature"] for w in winners] == [f for f in expected for _ in range(9)]
    for f in expected:
        rows = [w for w in winners if w["feature"] == f]
        assert [w["rank"] for w in rows] == list(range(9))
        per_image = maps[..., f].max(axis=(1, 2))
        top = np.sort(per_image)[::-1][:9]
        np.testing.assert_allclose([w["activation"] for w in rows], top, rtol=1e-5)
        assert len({w["image"] for w in rows}) == 9  # one entry per image (ties: any of them)
        for w in rows:
            np.testing.assert_allclose(per_image[w["image"]], w["activation"], rtol=1e-5)
            np.testing.assert_allclose(maps[w["image"], w["y"], w["x"], f], w["activation"], 1e-5)
            assert tuple(w["box"]) == graph.receptive_field(model, "conv2", w["y"], w["x"])
    with Image.open(png) as image:
        shape = (image.size[1], image.size[0], 3)
    tb = events(tmp_path / "w" / "logs" / "deconv")
    assert list(tb) == ["deconv/conv2/top9_validation"]
    assert tb["deconv/conv2/top9_validation"][0][1].shape == shape
    # Same request again: refused, nothing replaced.
    stamp = png.stat().st_mtime_ns
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("deconv", config, workdir, layer="conv2", num_features=3)
    assert png.stat().st_mtime_ns == stamp


def test_single_image_of_any_size(config, tmp_path):
    photo = write(str(tmp_path / "photo.jpg"), encode(random_rgb(150, 230), "JPEG", mode="L"))
    workdir = tmp_path / "w"  # no checkpoint: --untrained builds the config's model
    result = run_analysis(
        "deconv", config, workdir, layer="conv5", image=photo, num_features=4, untrained=True
    )
    base = workdir / "deconv" / "conv5" / "image_photo"
    assert sorted(result.paths.values()) == [f"{base}.json", f"{base}.png"]
    out = json.loads(base.with_suffix(".json").read_text())
    assert out["image"] == photo and out["layer"] == "conv5"
    # The model's own conv5 maxima on the center crop: the 4 strongest maps, in order.
    data = config.data
    pixels = preprocess.pixels(data)
    image = visualize.load_image(photo, data.resize_size, data.crop_size, pixels)
    assert image.shape == (64, 64, 3)
    model = model_lib.build_model(config.model)
    act = keras.Model(model.inputs, model.get_layer("conv5").output)([image[None]]).numpy()[0]
    strength = act.max(axis=(0, 1))
    order = np.argsort(-strength)[:4]
    assert [r["feature"] for r in out["strongest"]] == order.tolist()
    np.testing.assert_allclose([r["activation"] for r in out["strongest"]], strength[order], 1e-5)
    for r in out["strongest"]:
        np.testing.assert_allclose(act[r["y"], r["x"], r["feature"]], r["activation"], 1e-5)
    with Image.open(f"{base}.png") as png:
        assert png.size[0] > 300
    assert list(events(workdir / "logs" / "deconv")) == ["deconv/conv5/image_photo"]


def test_bad_input_is_refused_before_the_model_loads(config, tmp_path):
    # The workdir has no checkpoint: each error must come from the settings, before the
    # model loads (which would fail with "run --mode=train first").
    cases = [
        ({"image": "/nonexistent/photo.jpg"}, UsageError, "cannot read image /nonexistent/"),
        ({"split": "nope"}, DataError, "unknown split 'nope': valid splits: "),
        ({"features": "1,x"}, UsageError, "comma-separated integers"),
        ({"top_k": 0}, UsageError, "--top_k must be at least 1"),
    ]
    for request, error, message in cases:
        with pytest.raises(error, match=message):
            run_analysis("deconv", config, tmp_path, **request)
    # Layers and features are checked against the model (here a fresh one), before any
    # output is written.
    valid = "choose one of conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5$"
    with pytest.raises(UsageError, match=valid):
        run_analysis("deconv", config, tmp_path, layer="fc6", untrained=True)
    with pytest.raises(UsageError, match=r"\[32\] out of range: the layer has maps 0..31"):
        run_analysis("deconv", config, tmp_path, features="3,32", untrained=True)
    removed = config.copy_and_resolve_references()
    removed.model.remove = ("conv3", "conv4")
    with pytest.raises(UsageError, match="choose one of conv1, pool1, conv2, pool2, conv5, pool5$"):
        run_analysis("deconv", removed, tmp_path, layer="conv3", untrained=True)
    assert not (tmp_path / "deconv").exists()
    with pytest.raises(UsageError, match="run --mode=train first"):
        run_analysis("deconv", config, tmp_path)


@pytest.mark.slow
def test_main_py_error_is_one_line(tiny_data_dir, tmp_path):
    proc = main_py(
        "--mode=deconv",
        "--untrained",
        f"--workdir={tmp_path}/w",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.data.tfds_config=tiny",
        "--image=/nonexistent/photo.jpg",
    )
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image /nonexistent/"), lines


def test_field_patch_keeps_geometry():
    image = np.arange(10 * 10, dtype=np.float32).reshape(10, 10, 1)
    inside = outputs.field_patch(image, (2, 3, 6, 7), 4)
    np.testing.assert_array_equal(inside, image[2:6, 3:7])
    top_left = outputs.field_patch(image, (0, 0, 2, 3), 4, fill=-1)
    np.testing.assert_array_equal(top_left[2:, 1:], image[:2, :3])
    assert (top_left[:2] == -1).all() and (top_left[:, :1] == -1).all()


def test_select_features():
    assert visualize.select_features(10, "3,1", 16, 0) == [3, 1]
    assert visualize.select_features(10, "", 0, 0) == list(range(10))
    assert visualize.select_features(10, "", 10, 0) == list(range(10))
    expected = sorted(np.random.default_rng(7).choice(100, 5, replace=False).tolist())
    assert visualize.select_features(100, "", 5, 7) == expected
    with pytest.raises(UsageError, match="0..9"):
        visualize.select_features(10, "12", 16, 0)
