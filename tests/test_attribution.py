"""--mode=attribution (zf_tf.analyses.attribution): every method's maps, the deconvnet and
guided rules against oracles, saliency against a plain gradient, the pointing game, the
settings' refusals, and the mode end to end."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy.ndimage import zoom

from tests.conftest import load_config, run_analysis, workdir_with_model
from tests.helpers import events, with_aliases
from tests.tiny_models import named_convnet, saved_bn_net
from zf_tf.analyses import attribution, base, sources
from zf_tf.core import deconv, graph, rules
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError
from zf_tf.pipelines import examples as examples_lib


def small_config():
    config = load_config()
    config.model.width = 0.125
    return config


def assert_close(actual, expected, rtol=1e-4):
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.fixture(scope="module")
def model(config):
    return model_lib.build_model(config.model)


@pytest.fixture(scope="module")
def images():
    return (np.random.default_rng(0).normal(size=(2, 64, 64, 3)) * 50).astype(np.float32)


def tape_gradient(model, images, classes):
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        score = tf.gather(logits, tf.constant(classes, tf.int32), axis=1, batch_dims=1)
    return tape.gradient(score, x).numpy()


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def test_every_method_gives_finite_maps(model, images, config):
    settings = dataclasses.replace(
        attribution.map_settings(config),
        smoothgrad_samples=2,
        occluder_stride=0.25,  # 4 x 4 occluder positions: enough for shapes
    )
    maps = attribution.attribution_maps(model, images, [3, 7], attribution.METHODS, settings)
    assert list(maps) == list(attribution.METHODS)
    for method, m in maps.items():
        assert m.shape == (2, 64, 64) and m.dtype == np.float32, method
        assert np.isfinite(m).all(), method
    for method in ("deconvnet", "guided_backprop", "saliency", "smoothgrad", "gradcam"):
        assert (maps[method] >= 0).all(), method
    assert maps["saliency"].max() > 0 and maps["deconvnet"].max() > 0
    with pytest.raises(ValueError, match="valid methods: deconvnet"):
        attribution.method_maps(model, images, [0, 0], "lime", settings)


def test_saliency_is_max_abs_of_the_logit_gradient(model, images):
    grads = tape_gradient(model, images, [1, 4])
    expected = np.abs(grads).max(axis=-1)
    assert_close(attribution.saliency_maps(model, images, [1, 4]), expected)
    # The plain-gradient rule runs the same network (same forward values, same gradient).
    assert_close(attribution.rule_gradients(model, images, [1, 4], "gradient"), grads)
    x = tf.constant(images)
    assert_close(rules.rule_forward(model, x, "logits", "gradient").numpy(), model(x).numpy())
    # SmoothGrad with the same seed is reproducible; with noise it differs from saliency.
    a = attribution.saliency_maps(model, images, [1, 4], 3, 0.2, seed=5)
    b = attribution.saliency_maps(model, images, [1, 4], 3, 0.2, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, expected)


@pytest.mark.parametrize("layer, unit", [("conv2", (3, 2, 1)), ("conv5", (5, 1, 2))])
def test_deconvnet_rule_matches_the_deconvnet_oracle(model, images, layer, unit):
    feature, y, x = unit
    xt = tf.constant(images[:1])
    with tf.GradientTape() as tape:
        tape.watch(xt)
        fmap = rules.rule_forward(model, xt, layer, "deconvnet")
        act = fmap[0, y, x, feature]
    grad = tape.gradient(act, xt).numpy()
    oracle = deconv.gradient_projection(
        model, layer, images, [0], feature, y, x, scale_by_activation=False
    )
    assert_close(grad, oracle)
    # And the deconvnet itself (unpool / rectify / transposed filter) projects a * gradient.
    projection = deconv.project(deconv.build_deconvnet(model, layer), images, [0], feature, y, x)
    assert_close(projection["projection"], float(act) * grad)


def tiny_dense_model(seed=0):
    """input 4 -> dense 5 (relu) -> dense 3 (logits), with non-trivial weights."""
    inputs = keras.Input((4,), name="image")
    h = keras.layers.Dense(5, activation="relu", name="fc6")(inputs)
    logits = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inputs, logits)
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(4, 5)), rng.normal(size=5) * 0.5
    w2, b2 = rng.normal(size=(5, 3)), rng.normal(size=3)
    model.set_weights([w.astype(np.float32) for w in (w1, b1, w2, b2)])
    return model, w1, b1, w2


def test_guided_and_deconvnet_rules_by_hand():
    model, w1, b1, w2 = tiny_dense_model()
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    classes = np.array([0, 1, 2, 0, 1, 2])
    z = x.astype(np.float64) @ w1 + b1  # fc6 pre-activation
    upstream = w2[:, classes].T  # d logit_c / d fc6 output, per example (6, 5)
    assert ((z > 0) != (upstream > 0)).any() and (z < 0).any()  # the rules differ here
    guided = (upstream * (z > 0) * (upstream > 0)) @ w1.T
    deconvnet = np.maximum(upstream, 0) @ w1.T
    plain = (upstream * (z > 0)) @ w1.T
    assert_close(attribution.rule_gradients(model, x, classes, "guided"), guided)
    assert_close(attribution.rule_gradients(model, x, classes, "deconvnet"), deconvnet)
    assert_close(attribution.rule_gradients(model, x, classes, "gradient"), plain)
    with pytest.raises(ValueError, match="valid rules: deconvnet, guided, gradient"):
        rules.rule_forward(model, tf.constant(x), "logits", "lrp")


def test_gradcam_by_hand(model, images):
    classes = [2, 6]
    tap = keras.Model(model.inputs, [model.get_layer("conv5").output, model.output])
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        fmap, logits = tap(x)
        score = tf.gather(logits, tf.constant(classes), axis=1, batch_dims=1)
    grads = tape.gradient(score, fmap).numpy()
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((fmap.numpy() * weights).sum(-1), 0)  # (2, 3, 3)
    expected = zoom(cam, (1, 64 / cam.shape[1], 64 / cam.shape[2]), order=1)
    assert_close(attribution.cam_maps(model, images, classes, "gradcam"), expected)


def test_occlusion_against_brute_force(model, images, config):
    # Squares of half the crop at stride half: four disjoint squares, each pixel under one.
    classes = [1, 8]
    got = attribution.occlusion_maps(model, images, classes, 0.5, 0.5)
    probs = lambda x: tf.nn.softmax(model(x)).numpy()
    clean = probs(images)
    for n, c in enumerate(classes):
        for y0 in (0, 32):
            for x0 in (0, 32):
                occluded = images[n : n + 1].copy()
                occluded[:, y0 : y0 + 32, x0 : x0 + 32] = 0.0
                drop = clean[n, c] - probs(occluded)[0, c]
                block = got[n, y0 : y0 + 32, x0 : x0 + 32]
                np.testing.assert_allclose(block, drop, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pointing game
# ---------------------------------------------------------------------------------------------


def test_pointing_game_hand_made():
    maps = np.zeros((4, 4, 4))
    maps[0, 1, 2] = 5.0  # inside box 0 -> hit
    maps[1] += 1.0  # constant: ties -> (0, 0), outside box 1 -> miss
    maps[2, 3, 0] = maps[2, 2, 3] = 2.0  # tie: row-major first is (2, 3), inside box 2 -> hit
    maps[3] = np.nan
    maps[3, 3, 3] = -1.0  # NaN is lowest: the max is (3, 3), on box 3's exclusive end -> miss
    boxes = np.array([[0, 0, 2, 3], [1, 1, 3, 3], [2, 3, 3, 4], [2, 2, 3, 3]])
    np.testing.assert_array_equal(
        attribution.pointing_points(maps), [[1, 2], [0, 0], [2, 3], [3, 3]]
    )
    game = attribution.pointing_game({"a": maps, "b": maps[[1, 1, 1, 1]]}, boxes, 4)
    assert game["methods"]["a"] == {"hits": 2, "images": 4, "score": 0.5}
    np.testing.assert_array_equal(game["hit"]["a"], [True, False, True, False])
    # "b": every point (0, 0); only box 0 contains it.
    assert game["methods"]["b"]["hits"] == 1
    # Center pixel (2, 2): inside boxes 1 and 3 only.
    assert game["center"] == {"hits": 2, "images": 4, "score": 0.5, "point": [2, 2]}
    # Box areas 6, 4, 1, 1 of 16.
    assert game["chance"]["score"] == pytest.approx((6 + 4 + 1 + 1) / 4 / 16)
    table = attribution.pointing_table(game)
    assert "| a | 2 | 4 | 0.500 |" in table
    assert "| center pixel (baseline) | 2 | 4 | 0.500 |" in table
    assert "| chance (mean box area) | - | 4 | 0.188 |" in table


def test_pointing_game_tolerance_is_15_px_at_224_scaled():
    assert [attribution.tolerance_px(s) for s in (224, 64, 448)] == [15, 4, 30]
    box = np.array([[100, 100, 120, 120]])  # pixels 100..119
    points = [[100 - 15, 110], [100 - 16, 110], [119 + 9, 119 + 12], [100 - 11, 100 - 11]]
    hits = [attribution.in_box([p], box, 15)[0] for p in points]
    assert hits == [True, False, True, False]  # distances 15, 16, 15, 15.56
    assert not attribution.in_box([[85, 110]], box)[0]  # strict: outside
    # Chance with a tolerance: the box dilated by a disk, counted on the crop.
    assert attribution.chance_level(np.array([[0, 0, 1, 1]]), 4, 1) == pytest.approx(3 / 16)
    assert attribution.chance_level(np.array([[0, 0, 1, 1]]), 4, 0) == pytest.approx(1 / 16)
    maps = np.zeros((1, 224, 224))
    maps[0, 85, 110] = 1.0
    game = attribution.pointing_game({"m": maps}, box, 224)
    assert game["methods"]["m"]["hits"] == 0 and game["tolerant"]["methods"]["m"]["hits"] == 1
    assert "| m | 0 | 1 | 0.000 | 1 | 1.000 |" in attribution.pointing_table(game)


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


def test_settings_refuse_bad_configs_before_anything_loads(tiny_config):
    request = base.Request(workdir="/nowhere")
    att = tiny_config.analysis.attribution
    s = attribution.settings(tiny_config, request)
    assert s.methods == attribution.METHODS and s.annotated and s.split == "validation"
    assert (s.num_images, s.total_images) == (6, 200)
    more = with_aliases(tiny_config, "attribution", num_images=300)
    assert attribution.settings(more, request).total_images == 300
    with pytest.raises(DataError, match="valid splits"):
        attribution.settings(with_aliases(tiny_config, "attribution", split="nope"), request)
    for field, value, message in [
        ("methods", ("saliency", "lime"), "'lime' is not a method: choose from deconvnet, "),
        ("methods", (), "'empty' is not a method"),
        ("target", "best", "target='best' is not valid: choose one of true, predicted"),
        ("smoothgrad_samples", 0, "smoothgrad_samples must be >= 1"),
    ]:
        bad = tiny_config.copy_and_resolve_references()
        bad.analysis.attribution[field] = value
        with pytest.raises(UsageError, match=message):
            attribution.settings(bad, request)
    bad = tiny_config.copy_and_resolve_references()
    bad.analysis.occlusion.size = 0.0
    with pytest.raises(UsageError, match="config.analysis.occlusion: occluder size"):
        attribution.settings(bad, request)
    # The CAM layer must be a conv layer the model has (an ablation may remove conv3, conv4):
    # checked against the model itself (`resolve`).
    att.cam_layer = "conv4"
    tiny_config.model.width, tiny_config.model.remove = 0.125, ("conv3", "conv4")
    ablated = model_lib.build_model(tiny_config.model)
    own = sources.Source(model=None, config=tiny_config)
    s = attribution.settings(tiny_config, request)
    with pytest.raises(UsageError, match="cam_layer='conv4' is not valid: choose one of conv1, "):
        attribution.resolve(s, ablated, own)
    att.methods = ("saliency", "occlusion")  # no CAM method: the layer is not used
    s = attribution.settings(tiny_config, request)
    assert attribution.resolve(s, ablated, own).maps.cam_layer == "conv4"


@pytest.mark.slow
def test_mode_end_to_end(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.model.width = 0.125
    att = config.analysis.attribution
    att.num_images, att.pointing_images, att.smoothgrad_samples = 2, 4, 2
    config.analysis.occlusion.stride = 0.125  # fewer occluder positions: faster
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config.model)
    wd = workdir_with_model(config, model, tmp_path / "w")
    capsys.readouterr()
    paths = run_analysis("attribution", config, wd).paths
    assert list(paths) == list(attribution.OUTPUTS)
    out = tmp_path / "w" / "attribution"
    table = (out / "pointing_game.md").read_text()
    header, table_only = table.split("\n\n", 1)
    assert header.startswith("Pointing game, validation split, 4 images, true class.\n")
    wrote = f"Wrote {', '.join(paths.values())}"
    assert capsys.readouterr().out.endswith(f"{table_only}\n{wrote}\n")

    ex = examples_lib.load_examples(config, "validation", 4)
    npz = np.load(out / "attribution.npz")
    assert list(npz["methods"]) == list(attribution.METHODS)
    for m in attribution.METHODS:
        assert npz[m].shape == (2, 64, 64) and np.isfinite(npz[m]).all()
    np.testing.assert_array_equal(npz["images"], ex.images[:2])
    np.testing.assert_array_equal(npz["boxes"], ex.boxes[:2])
    np.testing.assert_array_equal(npz["indices"], ex.indices[:2])
    np.testing.assert_array_equal(npz["classes"], ex.labels[:2])  # target 'true'
    probs = tf.nn.softmax(model(ex.images[:2], training=False)).numpy()
    np.testing.assert_allclose(npz["probs"], probs[[0, 1], ex.labels[:2]], rtol=1e-5)
    # One method recomputed independently: saliency of all 4 scored images.
    saliency = attribution.saliency_maps(model, ex.images, ex.labels)
    np.testing.assert_allclose(npz["saliency"], saliency[:2], rtol=1e-4, atol=1e-7)
    png = Image.open(out / "attribution.png")
    assert png.size[0] > 500 and png.size[1] > 150

    game = json.loads((out / "pointing_game.json").read_text())
    assert game["num_images"] == 4 and game["target"] == "true"
    assert game["images"]["box"] == ex.boxes.tolist()
    assert game["images"]["index"] == ex.indices.tolist()
    assert game["occluder_px"] == 16 and game["occluder_stride_px"] == 8
    points = game["images"]["points"]
    assert points["saliency"] == attribution.pointing_points(saliency).tolist()
    for m in attribution.METHODS:  # the points of the shown images are their maps' maxima
        np.testing.assert_array_equal(points[m][:2], attribution.pointing_points(npz[m]))
    # Hits by hand from the points and the boxes (ends exclusive).
    for m in attribution.METHODS:
        hits = sum(
            int(y0 <= y < y1 and x0 <= x < x1)
            for (y, x), (y0, x0, y1, x1) in zip(points[m], ex.boxes.tolist())
        )
        assert game["methods"][m] == {"hits": hits, "images": 4, "score": hits / 4}, m
    center = sum(int(y0 <= 32 < y1 and x0 <= 32 < x1) for y0, x0, y1, x1 in ex.boxes.tolist())
    assert game["center"] == {"hits": center, "images": 4, "score": center / 4, "point": [32, 32]}
    areas = [(y1 - y0) * (x1 - x0) / 64**2 for y0, x0, y1, x1 in ex.boxes.tolist()]
    assert game["chance"]["score"] == pytest.approx(np.mean(areas))
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    expected = [
        f"| {attribution.TITLES[m]} | {r['hits']} | 4 | {r['score']:.3f} |"
        for m, r in game["methods"].items()
    ]
    expected.append(f"| center pixel (baseline) | {center} | 4 | {center / 4:.3f} |")
    expected.append(f"| chance (mean box area) | - | 4 | {np.mean(areas):.3f} |")
    assert [row.rsplit(" | ", 2)[0] + " |" for row in rows] == expected
    # With the tolerance (4 px at 64): hits by hand, distance to the box's nearest pixel.
    tolerant = game["tolerant"]
    assert tolerant["tolerance_px"] == 4
    for m in attribution.METHODS:
        hits = sum(
            int(max(y0 - y, 0, y - y1 + 1) ** 2 + max(x0 - x, 0, x - x1 + 1) ** 2 <= 16)
            for (y, x), (y0, x0, y1, x1) in zip(points[m], ex.boxes.tolist())
        )
        assert tolerant["methods"][m]["hits"] == hits >= game["methods"][m]["hits"], m
    assert "attribution/true_class" in events(tmp_path / "w" / "logs" / "attribution")

    # Again without --overwrite: refused in one line, nothing replaced.
    stamp = (out / "attribution.png").stat().st_mtime_ns
    with pytest.raises(UsageError, match="--overwrite") as error:
        run_analysis("attribution", config, wd)
    assert "\n" not in str(error.value)
    assert (out / "attribution.png").stat().st_mtime_ns == stamp

    # With --overwrite, the predicted class, one method: replaced.
    att.methods, att.target = ("saliency",), "predicted"
    result = run_analysis("attribution", config, wd, overwrite=True, num_images=1)
    npz = np.load(out / "attribution.npz")
    assert list(npz["methods"]) == ["saliency"] and npz["saliency"].shape == (1, 64, 64)
    predicted = tf.nn.softmax(model(ex.images, training=False)).numpy().argmax(axis=1)
    np.testing.assert_array_equal(npz["classes"], predicted[:1])
    game = json.loads((out / "pointing_game.json").read_text())
    assert list(game["methods"]) == ["saliency"] and game["target"] == "predicted"
    assert game["images"]["class"] == predicted.tolist()
    assert result.report.summary == game

    # Without object boxes: no pointing game, a line saying so, only the npz and the figure.
    s = attribution.settings(config, base.Request(wd))
    arrays = {k: npz[k] for k in npz.files if k not in ("methods", "boxes")}
    new = {name: str(tmp_path / "plain" / name) for name in attribution.OUTPUTS}
    (tmp_path / "plain").mkdir()
    report = attribution.render_outputs({"arrays": arrays, "game": None, "summary": None}, s, new)
    assert report.lines == ["No object boxes in this dataset: pointing game skipped."]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "attribution.npz",
        "attribution.png",
    ]
    assert report.summary is None and list(report.images) == ["attribution/predicted_class"]


# ---------------------------------------------------------------------------------------------
# Any model: the CAM layer follows the model; labels that are not its classes
# ---------------------------------------------------------------------------------------------


def test_resolve_picks_the_models_own_layer(tiny_config, model):
    s = attribution.settings(tiny_config, base.Request("/nowhere"))
    assert (s.maps.cam_layer, s.target) == ("", "true")
    own = sources.Source(model=None, config=tiny_config)
    r = attribution.resolve(s, model, own)
    assert (r.maps.cam_layer, r.target, r.labels, r.class_names) == (
        "conv5",
        "true",
        True,
        s.class_names,
    )
    imagenet_like = named_convnet(classes=1000)
    brought = sources.Source(model=imagenet_like, config=tiny_config, own_labels=False)
    r = attribution.resolve(s, imagenet_like, brought)
    assert (r.maps.cam_layer, r.target, r.labels) == ("b", "predicted", False)
    assert len(r.class_names) == 1000 and r.class_names[-1] == "class 999"
    named = dataclasses.replace(s, maps=dataclasses.replace(s.maps, cam_layer="a"))
    assert attribution.resolve(named, imagenet_like, brought).maps.cam_layer == "a"
    bad = dataclasses.replace(s, maps=dataclasses.replace(s.maps, cam_layer="h"))
    with pytest.raises(UsageError, match=r"cam_layer='h' is not valid: choose one of a, b$"):
        attribution.resolve(bad, imagenet_like, brought)


def test_cams_of_nested_and_fixed_size_models_equal_the_flat_ones(images):
    flat = named_convnet()
    inp = keras.Input((64, 64, 3))
    nested = keras.Model(inp, flat(inp))  # get_layer('b').output is not in its graph
    x = keras.Input((None, None, 3))
    free = keras.Model(x, flat(x))
    fixed = graph.fixed_input(free, 64)  # layers shared with `flat`, rebuilt on a new input
    classes = [6, 9]  # classes whose Grad-CAM is not all zero on these random weights
    for method in ("gradcam", "scorecam"):
        expected = attribution.cam_maps(flat, images, classes, method, "b")
        assert np.abs(expected).max() > 0, method
        for other in (nested, fixed):
            assert_close(attribution.cam_maps(other, images, classes, method), expected)


def test_predicted_class_where_labels_do_not_apply(tiny_config):
    model = named_convnet()
    brought = sources.Source(model=model, config=tiny_config, own_labels=False)
    tiny_config.analysis.attribution.methods = ("saliency", "gradcam")
    s = attribution.resolve(attribution.settings(tiny_config, base.Request("/x")), model, brought)
    ex = examples_lib.load_examples(tiny_config, "validation", 2)
    arrays = attribution.compute(model, ex, s)["arrays"]
    probs = tf.nn.softmax(model(ex.images, training=False)).numpy()
    np.testing.assert_array_equal(arrays["classes"], probs.argmax(axis=1))
    np.testing.assert_allclose(arrays["probs"], probs.max(axis=1), rtol=1e-5)


def test_mode_on_a_model_brought_along(tiny_config, tmp_path, capsys):
    config = tiny_config
    att = config.analysis.attribution
    att.num_images, att.pointing_images, att.smoothgrad_samples = 2, 2, 2
    config.analysis.occlusion.stride = 0.25
    path = saved_bn_net(tmp_path)
    run = run_analysis("attribution", config, tmp_path / "w", model=path)
    assert list(run.paths) == list(attribution.OUTPUTS)
    npz = np.load(run.paths["attribution.npz"])
    for m in attribution.METHODS:
        assert npz[m].shape == (2, 64, 64) and np.isfinite(npz[m]).all(), m
    game = json.loads(open(run.paths["pointing_game.json"]).read())
    assert game["target"] == "predicted" and game["cam_layer"] == "c2"
    assert "not classes of this model" in game["note"]
    with Image.open(run.paths["attribution.png"]) as png:
        assert png.size[0] > 500
    assert f"Note: {game['note']}" in capsys.readouterr().out.splitlines()


def test_a_model_is_freed_after_attribution():
    """The per-model caches (traced functions, CAM and quiet copies) are weakly keyed by
    the model and hold no strong reference to it: dropping it frees it."""
    import gc
    import weakref

    net = named_convnet(size=32)
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    for rule in ("deconvnet", "guided"):
        assert attribution.rule_gradients(net, x, [0, 1], rule).shape == x.shape
    assert attribution.probabilities_fn(net)(x).shape == (2, 10)
    for method in ("gradcam", "scorecam"):
        assert attribution.cam_maps(net, x, [0, 1], method, "b", batch_size=4).shape == (2, 32, 32)
    assert deconv.gradient_projection(net, "b", x, [0, 1], [0, 0]).shape == x.shape
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
