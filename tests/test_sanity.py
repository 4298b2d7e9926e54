"""--mode=sanity (zf_tf.analyses.sanity): the similarity wrappers against hand-computed
values, randomization that changes exactly the intended layers of a copy (the trained model
bit-identical), and the mode end to end with its refusals."""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from pipelines import examples as examples_lib
from tests.conftest import load_config, run_analysis, workdir_with_model
from zf_tf.analyses import base, sanity
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError


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
    result = sanity.compute(model, examples, s)
    assert all(np.array_equal(np.array(w), t) for w, t in zip(model.weights, trained))
    assert len(result["cascade"]) == len(result["independent"]) == 8
    for m in s.methods:
        assert result["original"][m].shape == (2, 64, 64)
    assert np.all(result["others"] != result["classes"])

    paths = run_analysis("sanity", config, workdir).paths
    assert list(paths) == list(sanity.OUTPUTS)
    summary = json.load(open(paths["sanity.json"]))
    assert summary["layers_from_the_output_down"][0] == "logits"
    assert [len(summary["cascade"][m]) for m in s.methods] == [8, 8]
    # The run is deterministic: the file holds what compute gave here.
    want = result["similarity"]["cascade"]["saliency"][-1]["ssim"]
    assert summary["cascade"]["saliency"][-1]["ssim"] == pytest.approx(want, abs=1e-3)
    table = open(paths["sanity.md"]).read()
    assert table.count("\n| ") == 3 and "| saliency |" in table  # header + 2 methods
    for name in ("sanity.png", "cascade.png"):
        with Image.open(paths[name]) as im:
            assert im.size[0] > 400 and np.asarray(im).std() > 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("methods", ("saliency", "lime"), "'lime' is not a method: choose from deconvnet, "),
        ("num_images", 1, "--num_images=1: the sanity checks need at least 2 images"),
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
