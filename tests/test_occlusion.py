"""Occlusion sensitivity (paper Fig. 7): grid geometry, batched occlusion against a
brute-force loop, pixel maps, the on-object test, the analysis arrays, and the mode."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_config, run_analysis, workdir_with_model
from tests.helpers import events
from tests.tiny_models import named_convnet, saved_bn_net
from zf_tf import cli
from zf_tf.analyses import base, occlusion, sources
from zf_tf.core import deconv
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, inputs, preprocess
from zf_tf.pipelines import examples as examples_lib


def test_grid_geometry():
    size, stride, ys, xs = occlusion.occluder_grid(64, 0.25, 0.0625)
    assert (size, stride) == (16, 4)
    np.testing.assert_array_equal(ys, np.arange(0, 49, 4))
    np.testing.assert_array_equal(xs, ys)
    # 10 px: side round(3.0) = 3, step round(2.5) = 3; 7 is added so the square reaches
    # the bottom/right border.
    size, stride, ys, _ = occlusion.occluder_grid(10, 0.3, 0.25)
    assert (size, stride) == (3, 3)
    np.testing.assert_array_equal(ys, [0, 3, 6, 7])
    assert ys[-1] + size == 10
    # At least 1 px for both; at most the whole crop.
    size, stride, ys, _ = occlusion.occluder_grid(8, 0.01, 0.01)
    assert (size, stride) == (1, 1)
    np.testing.assert_array_equal(ys, np.arange(8))
    size, _, ys, _ = occlusion.occluder_grid(8, 1.0, 0.5)
    assert size == 8 and ys.tolist() == [0]
    for bad in [(0.0, 0.1), (1.5, 0.1), (0.25, 0.0)]:
        with pytest.raises(ValueError):
            occlusion.occluder_grid(64, *bad)


def _brute_force(fn, image, size, ys, xs, fill=0.0):
    """Occludes with numpy and calls fn on one copy at a time."""
    rows = []
    for y in ys:
        row = []
        for x in xs:
            copy = image.copy()
            copy[y : y + size, x : x + size] = fill
            row.append({k: v[0] for k, v in fn(copy[None]).items()})
        rows.append(row)
    return {k: np.stack([np.stack([c[k] for c in r]) for r in rows]) for k in rows[0][0]}


def _per_copy_fn(calls):
    def fn(batch):
        batch = np.asarray(batch)
        calls.append(batch.shape[0])
        # Identity (the copies themselves) and a nonlinear per-copy feature.
        return {"copy": batch, "feat": np.tanh(batch).max(axis=(1, 2))}

    return fn


def test_occluded_outputs_equals_brute_force():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (12, 12, 3)).astype(np.float32)
    size, stride, ys, xs = occlusion.occluder_grid(12, 0.34, 0.25)
    calls = []
    out = occlusion.occluded_outputs(_per_copy_fn(calls), image, size, stride, batch_size=5)
    expected = _brute_force(_per_copy_fn([]), image, size, ys, xs)
    assert out["copy"].shape == (len(ys), len(xs), 12, 12, 3)
    for k in expected:
        np.testing.assert_array_equal(out[k], expected[k])
    assert not np.signbit(out["copy"][out["copy"] == 0]).any()  # +0.0, the mean color
    # ceil(16 / 5) = 4 calls of equal size, none above the batch size.
    assert len(ys) * len(xs) == 16 and calls == [4, 4, 4, 4]
    # Explicit positions and a plain array output.
    arr = occlusion.occluded_outputs(
        lambda b: np.asarray(b).sum(axis=(1, 2, 3)), image, 2, 0, ys=[1, 10], xs=[0, 3, 5]
    )
    ref = _brute_force(lambda b: {"s": b.sum(axis=(1, 2, 3))}, image, 2, [1, 10], [0, 3, 5])
    assert arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, ref["s"])


def test_occluder_is_the_normalized_mean_colour():
    # With another preprocessing the gray square is the data mean normalized, not 0.
    config = load_config()
    config.data.preprocessing = "caffe"
    fill = preprocess.pixels(config.data).fill
    assert np.abs(fill).max() > 0
    image = np.random.default_rng(2).normal(0, 50, (6, 6, 3)).astype(np.float32)
    fn = _per_copy_fn([])
    out = occlusion.occluded_outputs(fn, image, 3, 3, fill=fill)
    np.testing.assert_array_equal(
        out["copy"], _brute_force(fn, image, 3, [0, 3], [0, 3], fill)["copy"]
    )
    np.testing.assert_array_equal(out["copy"][0, 0, 0, 0], fill)


def test_batch_size_invariance():
    image = np.random.default_rng(1).normal(0, 50, (16, 16, 3)).astype(np.float32)
    results = []
    for batch_size in (1, 7, 128):
        calls = []
        results.append(
            occlusion.occluded_outputs(_per_copy_fn(calls), image, 4, 3, batch_size=batch_size)
        )
        assert max(calls) <= batch_size and sum(calls) == 25  # offsets 0, 3, 6, 9, 12
    for other in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(results[0][k], other[k])


def test_pixel_map_hand_computed():
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    # 3 px, side 2 at offsets 0 and 1: the middle row/column is covered twice.
    expected = np.array([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    np.testing.assert_allclose(occlusion.pixel_map(values, [0, 1], [0, 1], 2, 3), expected)
    # Disjoint squares: each pixel takes its one square's value.
    np.testing.assert_allclose(
        occlusion.pixel_map(values, [0, 2], [0, 2], 2, 4), np.kron(values, np.ones((2, 2)))
    )
    # A gap (stride > size) is NaN.
    gap = occlusion.pixel_map(values, [0, 3], [0, 3], 2, 5)
    assert np.isnan(gap[2]).all() and np.isnan(gap[:, 2]).all() and gap[4, 4] == 4.0


def test_on_object_hand_computed():
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 0:2, 0:2] = True  # 4 px object in the top-left corner
    masks[1, 3:6, 3:6] = True  # 9 px in the bottom-right corner
    # masks[2] is empty: excluded.
    ys = xs = np.array([0, 2, 3])  # side 3
    prob = np.ones((3, 3, 3))
    prob[0, 0, 0] = 0.1  # minimum on the object
    prob[1, 0, 0] = 0.1  # minimum far from it
    res = occlusion.on_object(prob, masks, ys, xs, 3)
    # Image 0: need >= 2 of 4 px: the square at (0,0) covers all 4; every other covers 0.
    np.testing.assert_array_equal(
        res["on_object_map"][0], [[True, False, False], [False, False, False]] + [[False] * 3]
    )
    # Image 1: need >= 4.5 of 9 px: (3,3) covers 9, (2,3)/(3,2) cover 6, (2,2) 4, others < 4.
    np.testing.assert_array_equal(
        res["on_object_map"][1],
        [[False, False, False], [False, False, True], [False, True, True]],
    )
    np.testing.assert_array_equal(res["overlap"][1], [[0, 0, 0], [0, 4, 6], [0, 6, 9]])
    np.testing.assert_array_equal(res["argmin"][:2], [[0, 0], [0, 0]])
    np.testing.assert_array_equal(res["on_object"], [True, False, False])
    np.testing.assert_array_equal(res["valid"], [True, True, False])
    assert res["fraction"] == 0.5
    assert res["chance"] == pytest.approx((1 / 9 + 3 / 9) / 2)
    # Touching (any overlap): image 0 only at (0, 0); image 1 at the 4 lower-right squares.
    assert res["touch_fraction"] == 0.5
    assert res["touch_chance"] == pytest.approx((1 / 9 + 4 / 9) / 2)


@pytest.fixture(scope="module")
def small(tiny_data_dir):
    """An untrained narrow model, its config on the tiny dataset, and 2 examples."""
    config = load_config()
    config.data.data_dir = tiny_data_dir
    config.data.tfds_config = "tiny"
    config.train.eval_batch_size = 25
    config.model.width = 0.125
    config.analysis.occlusion.stride = 0.125  # 7 x 7 positions: fast
    config.analysis.occlusion.num_images = 2
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config.model)
    examples = examples_lib.load_examples(config, "validation", 2)
    return config, model, examples


def test_analysis_arrays(small):
    from zf_tf.pipelines import inputs

    config, model, ex = small
    layer = "conv5"
    a = occlusion.analyse(
        model,
        ex,
        layer,
        0.25,
        0.125,
        batch_size=20,
        dataset=lambda: inputs.build_inputs(config, "validation", mode="center"),
    )
    n, s, k = 2, 64, occlusion.OTHER_IMAGES
    assert int(a["size_px"]) == 16 and a["ys"].tolist() == [0, 8, 16, 24, 32, 40, 48]
    for key, shape in {
        "activation_map": (n, 7, 7),
        "prob_map": (n, 7, 7),
        "class_map": (n, 7, 7),
        "feature": (n,),
        "clean_probs": (n, 10),
        "projection": (n, s, s, 3),
        "others_projection": (n, k, s, s, 3),
        "others_index": (n, k),
        "on_object_map": (n, 7, 7),
        "masks": (n, s, s),
    }.items():
        assert a[key].shape == shape, key
    tap = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    fmap, logits = (t.numpy() for t in tap([ex.images], training=False))
    np.testing.assert_array_equal(a["feature"], fmap.max(axis=(1, 2)).argmax(axis=1))
    # Spot positions: the tap on a numpy-occluded copy gives (b), (d) and (e).
    for i, gy, gx in [(0, 0, 0), (0, 3, 6), (1, 6, 6), (1, 2, 1)]:
        copy = ex.images[i].copy()
        y, x = a["ys"][gy], a["xs"][gx]
        copy[y : y + 16, x : x + 16] = 0.0
        f_map, f_logits = (t.numpy()[0] for t in tap([copy[None]], training=False))
        probs = np.exp(f_logits - f_logits.max())
        probs /= probs.sum()
        f = a["feature"][i]
        np.testing.assert_allclose(a["activation_map"][i, gy, gx], f_map[..., f].sum(), rtol=1e-4)
        np.testing.assert_allclose(a["prob_map"][i, gy, gx], probs[ex.labels[i]], rtol=1e-4)
        assert a["class_map"][i, gy, gx] == probs.argmax()
    # (c): the projection is the deconvnet's at the map's maximum; other images are other
    # images, strongest first, with activations equal to the map's maximum on them.
    dn = deconv.build_deconvnet(model, layer)
    ref = deconv.project(dn, ex.images, np.arange(n), a["feature"])
    np.testing.assert_allclose(a["projection"], ref["projection"], rtol=1e-4, atol=1e-5)
    split = np.concatenate([b[0] for b in inputs.build_inputs(config, "validation", mode="center")])
    for i in range(n):
        idx = a["others_index"][i]
        assert (idx >= 0).all() and ex.indices[i] not in idx
        acts = a["others_activation"][i]
        assert (np.diff(acts) <= 0).all()
        other_map = tap([split[idx]], training=False)[0].numpy()
        np.testing.assert_allclose(
            acts, other_map[..., a["feature"][i]].max(axis=(1, 2)), rtol=1e-5
        )


@pytest.mark.slow
def test_mode_end_to_end(small, tmp_path):
    config, model, _ = small
    assert "occlusion" in cli.MODES
    wd = workdir_with_model(config, model, tmp_path / "wd")
    out = run_analysis("occlusion", config, wd).paths
    with np.load(out["occlusion.npz"]) as z:
        assert z["prob_map"].shape == (2, 7, 7) and z["images"].shape == (2, 64, 64, 3)
        probs = z["clean_probs"]
    summary = json.loads(open(out["occlusion.json"]).read())
    assert summary["grid"] == [7, 7] and summary["num_images"] == 2
    assert [r["prob"] for r in summary["images"]] == pytest.approx(
        probs[np.arange(2), [r["label"] for r in summary["images"]]].tolist()
    )
    result = summary["on_object"]
    assert result["num_images"] == 2 and 0 <= result["fraction"] <= 1
    assert 0 < result["chance"] < 1
    with Image.open(out["occlusion.png"]) as png:
        assert png.size[0] > 500 and png.size[1] > 300
    assert any(tag.startswith("occlusion/") for tag in events(tmp_path / "wd" / "logs"))
    # Refuses to overwrite; --overwrite replaces.
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("occlusion", config, wd, num_images=1)
    out = run_analysis("occlusion", config, wd, num_images=1, overwrite=True).paths
    assert json.loads(open(out["occlusion.json"]).read())["num_images"] == 1


def test_bad_input_is_a_usage_error(small, tmp_path):
    config, _, _ = small
    bad = config.copy_and_resolve_references()
    bad.analysis.occlusion.layer = "fc6"
    # The layer is checked against the model (`resolve`): a fresh one, as no workdir holds one.
    with pytest.raises(UsageError, match="choose one of conv1, conv2, conv3, conv4, conv5$"):
        run_analysis("occlusion", bad, tmp_path, untrained=True)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
    with pytest.raises(DataError, match="valid splits"):
        run_analysis("occlusion", config, tmp_path, split="nope")
    bad = config.copy_and_resolve_references()
    bad.analysis.occlusion.size = 0.0
    with pytest.raises(UsageError, match="occlusion"):
        run_analysis("occlusion", bad, tmp_path)


# ---------------------------------------------------------------------------------------------
# Any model: the layer follows the model; labels that are not its classes
# ---------------------------------------------------------------------------------------------


def test_resolve_picks_the_models_own_layer(small):
    config, zfnet, _ = small
    s = occlusion.settings(config, base.Request("/nowhere"))
    assert s.layer == ""  # the config's default: the model's own
    own = sources.Source(model=None, config=config)
    r = occlusion.resolve(s, zfnet, own)
    assert (r.layer, r.labels, r.target) == ("conv5", True, "true")
    assert r.class_names == s.class_names
    model = named_convnet()
    brought = sources.Source(model=model, config=config, own_labels=False)
    r = occlusion.resolve(s, model, brought)
    assert (r.layer, r.labels, r.target) == ("b", False, "predicted")
    assert r.class_names == tuple(f"class {i}" for i in range(10))
    named = dataclasses.replace(s, layer="a")
    assert occlusion.resolve(named, model, brought).layer == "a"
    with pytest.raises(UsageError, match=r"layer='h' is not valid: choose one of a, b$"):
        occlusion.resolve(dataclasses.replace(s, layer="h"), model, brought)
    # A Table 3 ablation: the choices are the conv layers it has.
    ablated = load_config()
    ablated.model.width, ablated.model.remove = 0.125, ("conv3", "conv4")
    with pytest.raises(UsageError, match="choose one of conv1, conv2, conv5$"):
        occlusion.resolve(
            dataclasses.replace(s, layer="conv3"), model_lib.build_model(ablated.model), own
        )


def test_predicted_class_where_labels_do_not_apply(small):
    _, _, ex = small
    model = named_convnet()
    unknown = examples_lib.Examples(ex.images, np.full(len(ex), -1), ex.indices)  # a flat folder
    got = occlusion.analyse(model, unknown, "", 0.25, 0.25, predicted=True)
    predicted = model(ex.images, training=False).numpy().argmax(axis=1)
    np.testing.assert_array_equal(got["classes"], predicted)
    ref = occlusion.occlusion_maps(model, ex.images, predicted, "b", 16, got["ys"], got["xs"])
    np.testing.assert_array_equal(got["prob_map"], ref["prob_map"])
    summary = occlusion.summarize(got, "b", "validation", None, "predicted")
    assert summary["target"] == "predicted"
    assert [r["class"] for r in summary["images"]] == [str(c) for c in predicted]
    assert [r["prob"] for r in summary["images"]] == pytest.approx(
        got["clean_probs"][[0, 1], predicted].tolist()
    )


@pytest.mark.slow
def test_mode_on_a_model_brought_along(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.analysis.occlusion.stride = 0.25  # 4 x 4 positions
    path = saved_bn_net(tmp_path)
    out = run_analysis("occlusion", config, tmp_path / "w", model=path, num_images=2).paths
    assert sorted(out) == sorted(occlusion.OUTPUTS)
    with np.load(out["occlusion.npz"]) as z:
        assert z["prob_map"].shape == (2, 4, 4)
        np.testing.assert_array_equal(z["classes"], z["clean_probs"].argmax(axis=1))
    summary = json.loads(open(out["occlusion.json"]).read())
    assert summary["layer"] == "c2" and summary["target"] == "predicted"
    assert "not classes of this model" in summary["note"]
    with Image.open(out["occlusion.png"]) as png:
        assert png.size[0] > 500
    printed = capsys.readouterr().out
    assert f"Note: {summary['note']}" in printed.splitlines()


def test_images_from_chosen_classes(tiny_config):
    """`analysis.occlusion.classes`: names or ids, `num_images` shared among them in order;
    an unknown class is refused naming the valid ones."""
    config = tiny_config
    names = [str(n) for n in inputs.class_names(config.data)]
    ids = base.class_ids(config, "analysis.occlusion.classes", (names[3], 1))
    assert ids == (3, 1)
    found = base.load_examples(config, "validation", 5, ids)
    assert list(found.labels) == [3, 3, 3, 1, 1]
    assert found.images.shape[0] == 5 and found.masks.shape[0] == 5
    firsts = examples_lib.load_examples(config, "validation", 3, label=3)
    np.testing.assert_array_equal(found.images[:3], firsts.images)
    assert base.class_ids(config, "analysis.occlusion.classes", ()) == ()
    with pytest.raises(UsageError, match="'nope' is not a class: choose names"):
        base.class_ids(config, "analysis.occlusion.classes", ("nope",))
    with pytest.raises(UsageError, match="ids 0..9"):
        base.class_ids(config, "analysis.occlusion.classes", (10,))
    # analysis.class_names: figures show those names; either name picks the class.
    config.analysis.class_names = {names[3]: "shown three"}
    shown = base.class_names(config)
    assert shown[3] == "shown three" and shown[:3] + shown[4:] == names[:3] + names[4:]
    assert base.class_ids(config, "k", ("shown three", names[3], names[2])) == (3, 3, 2)
