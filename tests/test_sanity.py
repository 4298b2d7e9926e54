"""--mode=sanity (zf_tf.analyses.sanity): the similarity wrappers against hand-computed
values, randomization that changes exactly the intended layers of a copy (the trained model
bit-identical), and the mode end to end with its refusals."""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_config, run_analysis, workdir_with_model
from zf_tf.analyses import attribution, base, sanity
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import examples as examples_lib


def test_similarity_against_hand_computed_values():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 3.0], [2.0, 4.0]])
    # Ranks 1 2 3 4 against 1 3 2 4: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12 / 60.
    assert sanity.similarity(a, b)["spearman"] == pytest.approx(0.8)
    assert sanity.similarity(-a, b)["spearman"] == pytest.approx(-0.8)
    assert sanity.similarity(-a, b)["spearman_abs"] == pytest.approx(0.8)  # |-a| = a
    rng = np.random.default_rng(0)
    m = rng.normal(size=(64, 64))
    same = sanity.similarity(m, m)
    assert all(same[k] == pytest.approx(1.0) for k in sanity.METRICS), same
    other = sanity.similarity(m, rng.normal(size=(64, 64)))
    # 4096 independent pairs: the rank correlation's sd is 1/sqrt(4095) = 0.016.
    assert abs(other["spearman"]) < 0.06 and abs(other["spearman_abs"]) < 0.06
    assert other["ssim"] < 0.2
    np.testing.assert_array_equal(sanity.unit_scale(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])


def test_a_constant_map_is_left_out_and_counted():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 16, 16))
    flat = maps.copy()
    flat[1] = 0.0
    mean = sanity.mean_similarity(maps, flat)
    assert mean["undefined"]["spearman"] == 1 and mean["undefined"]["ssim"] == 0
    assert mean["spearman"] == pytest.approx(1.0)  # the two defined pairs are identical


@pytest.fixture(scope="module")
def small():
    config = load_config()
    config.model.width = 0.125
    keras.utils.set_random_seed(0)
    return config, model_lib.build_model(config.model)


def test_randomization_changes_exactly_the_intended_layers(small):
    _, model = small
    trained = {w.path: np.array(w) for w in model.weights}
    layers = sanity.weight_layers(model)
    assert layers == ["logits", "fc7", "fc6", "conv5", "conv4", "conv3", "conv2", "conv1"]
    randomizer = sanity.Randomizer(model, seed=0)

    def changed(copy):
        return {
            w.path.split("/")[0]
            for w in copy.weights
            if not np.array_equal(np.array(w), trained[w.path])
        }

    for i in range(len(layers)):
        copy = randomizer.randomize(layers[: i + 1])
        # Biases start at zero, so a layer counts as changed by its kernel.
        assert changed(copy) == set(layers[: i + 1]), i
    for layer in layers:
        assert changed(randomizer.randomize([layer])) == {layer}
    # Seeded: the same step draws the same weights.
    first = [np.array(w) for w in randomizer.randomize(["conv3"]).weights]
    again = [np.array(w) for w in randomizer.randomize(["conv3"]).weights]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(np.array(w), trained[w.path]) for w in model.weights)


@pytest.mark.slow
def test_mode_end_to_end(tiny_config, tmp_path):
    config = tiny_config
    config.model.width = 0.125
    config.analysis.sanity.num_images = 2
    config.analysis.sanity.methods = ("saliency", "gradcam")
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config.model)
    workdir = workdir_with_model(config, model, tmp_path / "w")
    examples = examples_lib.load_examples(config, "validation", 2)
    s = sanity.resolve(sanity.settings(config, base.Request(workdir=workdir)), model, None)
    trained = [np.array(w) for w in model.weights]
    result = sanity.compute(model, sanity.Data(examples), s)
    assert all(np.array_equal(np.array(w), t) for w, t in zip(model.weights, trained))
    assert len(result["cascade"]) == len(result["independent"]) == 8
    for m in s.methods:
        assert result["original"][m].shape == (2, 64, 64)
    assert np.all(result["others"] != result["classes"])
    # conv5 units' projections go down from conv5: randomizing the layers above changes
    # nothing (exactly), conv5 itself or a layer below does.
    proj = [st["spearman"] for st in result["similarity"]["cascade"][sanity.PROJECTION]]
    assert result["layers"][:4] == ["logits", "fc7", "fc6", "conv5"]
    assert proj[:3] == [pytest.approx(1.0, abs=1e-12)] * 3 and proj[3] < 0.99
    alone = [st["spearman"] for st in result["similarity"]["independent"][sanity.PROJECTION]]
    assert alone[:3] == [pytest.approx(1.0, abs=1e-12)] * 3 and max(alone[3:]) < 0.99
    assert result["original"][sanity.PROJECTION].shape == (8, 64, 64)
    assert sanity.PROJECTION not in result["similarity"]["class"]

    assert set(result["faithfulness"]) == {"saliency", "gradcam", "random"}
    assert result["faithfulness"]["random"]["deletion"].shape == (2, 21)
    paths = run_analysis("sanity", config, workdir).paths
    assert list(paths) == list(sanity.OUTPUTS)
    summary = json.load(open(paths["sanity.json"]))
    assert summary["layers_from_the_output_down"][0] == "logits"
    assert [len(summary["cascade"][m]) for m in s.methods] == [8, 8]
    # The run is deterministic: the file holds what compute gave here.
    want = result["similarity"]["cascade"]["saliency"][-1]["ssim"]
    assert summary["cascade"]["saliency"][-1]["ssim"] == pytest.approx(want, abs=1e-3)
    table = open(paths["sanity.md"]).read()
    # Two tables: header + 2 methods; header + 2 methods + the random order.
    assert table.count("\n| ") == 4 + 4 and "| random order (baseline) |" in table
    assert "| deconvnet projection of 8 conv5 units |" in table
    assert len(summary["faithfulness"]["saliency"]["deletion_curve"]) == 21
    for name in ("sanity.png", "cascade.png", "faithfulness.png"):
        with Image.open(paths[name]) as im:
            assert im.size[0] > 400 and np.asarray(im).std() > 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("methods", ("saliency", "lime"), "'lime' is not a method: choose from deconvnet, "),
        ("num_images", 1, "--num_images=1: the sanity checks need at least 2 images"),
        ("projection_layer", "fc6", "projection_layer='fc6' is not valid: choose one of "),
        ("projection_units", 33, "projection_units=33 exceeds the 32 maps of conv5"),
        ("steps", 1, "steps=1: give an integer of at least 2"),
    ],
)
def test_bad_settings_write_nothing(tiny_config, tmp_path, small, field, value, message):
    config = tiny_config
    config.model.width = 0.125
    config.analysis.sanity[field] = value
    workdir = workdir_with_model(config, small[1], tmp_path / "w")
    with pytest.raises(UsageError, match=message):
        run_analysis("sanity", config, workdir)
    assert not os.path.exists(os.path.join(workdir, "sanity"))


def evidence_model(size=16, region=4):
    """Logit 0 = the sum of the image over its top-left region x region pixels (all
    channels); logit 1 = 0: the evidence for class 0 is that region alone."""
    x = keras.Input((size, size, 3))
    logits = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    model = keras.Model(x, logits)
    kernel = np.zeros((size, size, 3, 2), np.float32)
    kernel[:region, :region, :, 0] = 1.0
    model.layers[-1].set_weights([kernel.reshape(-1, 2), np.zeros(2, np.float32)])
    return model


def test_deletion_curve_of_a_model_whose_evidence_is_one_region():
    size, region, steps = 16, 4, 16
    model = evidence_model(size, region)
    probabilities = attribution.probabilities_fn(model)
    rng = np.random.default_rng(0)
    image = rng.uniform(0.5, 1.0, (size, size, 3)).astype(np.float32)
    relevant = np.zeros((size, size))
    relevant[:region, :region] = 1.0  # the right map: the region, nothing else
    order = sanity.relevance_order(relevant)
    assert set(order[: region * region]) == {y * size + x for y in range(4) for x in range(4)}
    base = sanity.blurred(image, 1.0)
    deletion, insertion = sanity.deletion_insertion(
        probabilities, image, 0, order, np.zeros(3), base, steps
    )
    # By hand: 16 pixels go per step, the region's 16 first, so from step 1 on logit 0 is 0.
    logit = image[:region, :region].sum()
    np.testing.assert_allclose(deletion, [1 / (1 + np.exp(-logit))] + [0.5] * steps, rtol=1e-5)
    inserted = 1 / (1 + np.exp(-base[:region, :region].sum()))
    np.testing.assert_allclose(insertion[0], inserted, rtol=1e-5)
    np.testing.assert_allclose(insertion[1:], 1 / (1 + np.exp(-logit)), rtol=1e-5)
    by_hand = (deletion[0] + deletion[1]) / 2 / 16 + 0.5 * 15 / 16  # trapezoids
    assert sanity.auc(deletion) == pytest.approx(by_hand)
    # A random order removes the region gradually: a larger deletion area.
    shuffled = rng.permutation(size * size)
    random_deletion, _ = sanity.deletion_insertion(
        probabilities, image, 0, shuffled, np.zeros(3), base, steps
    )
    assert sanity.auc(random_deletion) > sanity.auc(deletion) + 0.2
    assert sanity.auc([1.0, 1.0, 1.0]) == 1.0 and sanity.auc([0.0, 1.0]) == 0.5


@pytest.mark.slow
def test_mode_on_a_model_brought_along(tiny_config, tmp_path):
    from tests.tiny_models import saved_bn_net

    config = tiny_config
    config.analysis.sanity.num_images = 2
    config.analysis.sanity.methods = ("guided_backprop", "gradcam")
    config.analysis.sanity.projection_units = 2
    run = run_analysis("sanity", config, tmp_path / "w", model=saved_bn_net(tmp_path))
    summary = json.load(open(run.paths["sanity.json"]))
    assert summary["target"] == "predicted"  # its classes are not the data's
    layers = summary["layers_from_the_output_down"]
    assert len(summary["cascade"]["guided_backprop"]) == len(layers) >= 3
    assert summary["projection"]["layer"] == summary["cam_layer"] == "c2"


def test_random_labels_are_fixed_per_image_uniform_and_seeded(tiny_config):
    import tensorflow as tf

    from zf_tf.pipelines import inputs

    encoded = tf.constant([str(i).encode() for i in range(5000)])
    labels = inputs.random_label(encoded, 0, 10).numpy()
    np.testing.assert_array_equal(labels, inputs.random_label(encoded[::-1], 0, 10).numpy()[::-1])
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 420 and counts.max() < 580  # 500 each, within 3.5 sd
    assert np.mean(inputs.random_label(encoded, 1, 10).numpy() == labels) < 0.15
    # The training pipeline carries them; evaluation keeps the true labels.
    config = tiny_config
    config.data.random_labels_seed = 3
    records = list(inputs.encoded_records(config.data, "train").as_numpy_iterator())
    true = np.array([y for _, y in records])
    drawn = inputs.random_label(tf.constant([e for e, _ in records]), 3, 10).numpy()
    assert np.mean(drawn == true) < 0.3
    batch = next(iter(inputs.build_inputs(config, "train")))[1].numpy()
    assert set(batch) <= set(drawn) and len(batch) == config.train.batch_size
    center = inputs.build_inputs(config, "validation", mode="center")
    evaluated = np.concatenate([y for _, y in center.as_numpy_iterator()])
    want = [y for _, y in inputs.encoded_records(config.data, "validation").as_numpy_iterator()]
    np.testing.assert_array_equal(evaluated, want)


@pytest.mark.slow
def test_compare_with_another_workdirs_model(tiny_config, tmp_path, small):
    config = tiny_config
    config.model.width = 0.125
    config.analysis.sanity.num_images = 2
    config.analysis.sanity.methods = ("saliency",)
    config.analysis.sanity.projection_units = 0
    workdir = workdir_with_model(config, small[1], tmp_path / "w")
    seeded = config.copy_and_resolve_references()
    seeded.model.seed = 1  # other initial weights
    other = workdir_with_model(config, model_lib.build_model(seeded.model), tmp_path / "o")
    with pytest.raises(UsageError, match="--compare=.*: no trained model there"):
        run_analysis("sanity", config, workdir, compare=str(tmp_path / "none"))
    assert not os.path.exists(os.path.join(workdir, "sanity"))
    run = run_analysis("sanity", config, workdir, compare=other)
    summary = json.load(open(run.paths["sanity.json"]))
    assert summary["compare"]["workdir"] == other and summary["projection"] is None
    assert -1 <= summary["compare"]["saliency"]["spearman"] < 0.99
    assert "--compare model: SSIM" in open(run.paths["sanity.md"]).read()
    # Against itself: identical maps.
    same = run_analysis("sanity", config, workdir, compare=workdir, overwrite=True)
    assert same.report.summary["compare"]["saliency"]["spearman"] == pytest.approx(1.0)


def test_rule_form_projections_are_built_once_and_follow_the_weights(monkeypatch):
    """The rule-form deconvnet runs the model's own layers (`rules.rule_tap`), so one
    built on the randomized copy projects with whatever weights it holds now: the cascade
    builds it once, not at every step."""
    from tests.oracles import tiny_residual_net
    from zf_tf.core import deconv

    model = tiny_residual_net()
    layer = "block2_out"
    assert deconv.projection_form(model, layer)[0] == "rule"
    images = np.random.default_rng(0).uniform(0, 1, (2, 24, 24, 3)).astype(np.float32)
    requests = sanity.unit_requests(model, layer, images, 3)
    built = []
    build = deconv.build_deconvnet
    monkeypatch.setattr(
        deconv, "build_deconvnet", lambda *a, **k: built.append(1) or build(*a, **k)
    )
    randomizer = sanity.Randomizer(model, seed=0)
    for step in (["block2_conv2"], ["block1_conv1"]):
        copy = randomizer.randomize(step)
        maps = sanity.unit_projections(copy, layer, images, requests)
        fresh = deconv.project(
            build(copy, layer),
            images,
            *(requests[k].astype(np.int32) for k in ("image", "unit", "y", "x")),
        )
        np.testing.assert_allclose(
            maps, attribution.max_abs_channels(fresh["projection"]), rtol=1e-5, atol=1e-6
        )
    assert len(built) == 1
