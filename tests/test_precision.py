"""Mixed precision and XLA (`config.train.precision`, `config.train.jit_compile`): layer
dtypes per policy, a few training steps of each precision and with XLA on CPU, loss scaling
for float16 only, checkpoints that load back (as trained, and as float32 for analyses), the
deconvnet oracle on a mixed-precision-trained model loaded for analysis, the export's
float32 outputs, old workdirs without the fields, and the one-line refusal of a bad value."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import oracles
from tests.conftest import load_config, tiny
from zf_tf import cli
from zf_tf.analyses import base, sources
from zf_tf.core import deconv, graph
from zf_tf.core import model as model_lib
from zf_tf.pipelines import preprocess
from zf_tf.training import train, workdirs

MIXED = ("mixed_bfloat16", "mixed_float16")
COMPUTE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
WIDTH = 0.25


def tiny_config(data_dir, precision="float32", **fields):
    """The default config on the tiny dataset at width 0.25, batch 16, 1 epoch x 2 steps."""
    fields = {
        "train.epochs": 1,
        "train.steps_per_epoch": 2,
        "train.precision": precision,
        **fields,
    }
    return tiny(load_config(), data_dir, width=WIDTH, batch_size=16, **fields)


def random_batch(n=48, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.normal(size=(n, size, size, 3)) * 50).astype(np.float32)
    return images, (np.arange(n) % 10).astype(np.int64)


def fit_steps(config, steps=3):
    """compile_model(build_model(...)) as `train._train` does, fit `steps` batches of 16;
    returns (model, losses, weights before)."""
    model = model_lib.build_model(config.model, train.precision(config))
    model = train.compile_model(model, config)
    before = [np.array(w) for w in model.get_weights()]
    x, y = random_batch(16 * steps)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model, history.history["loss"], before


# ---------------------------------------------------------------------------------------------
# Layers and training steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["zfnet", "vgg"])
@pytest.mark.parametrize("precision", model_lib.PRECISIONS)
def test_layers_compute_as_the_policy_says(precision, arch):
    config = load_config("vgg_small" if arch == "vgg" else "default").model
    config.width = WIDTH
    model = model_lib.build_model(config, precision)
    compute = COMPUTE[precision]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == compute for layer in convs)
    assert model.get_layer("logits").compute_dtype == "float32"
    if arch == "zfnet":  # LRN has no bfloat16 CPU kernel (and no float16 XLA one)
        assert model.get_layer("norm1").compute_dtype == "float32"
        assert model.get_layer("norm2").compute_dtype == "float32"
        assert model.get_layer("fc6").compute_dtype == compute
    assert {v.dtype for v in model.weights} == {"float32"}
    assert model_lib.precision_of(model) == precision
    x, _ = random_batch(2)
    assert model(x).dtype == tf.float32
    conv = graph.tap(model, [convs[-1].name])(x)
    assert conv.dtype == compute


def test_mixed_and_float32_models_coexist_and_bad_precision_is_refused():
    config = load_config().model
    config.width = WIDTH
    mixed = model_lib.build_model(config, "mixed_bfloat16")
    plain = model_lib.build_model(config)  # no global policy was left behind
    assert model_lib.precision_of(plain) == "float32"
    assert plain.get_layer("conv1").compute_dtype == "float32"
    assert mixed.get_layer("conv1").compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="float32, mixed_bfloat16, mixed_float16"):
        model_lib.build_model(config, "float16")


@pytest.mark.parametrize("precision", model_lib.PRECISIONS)
def test_each_precision_trains_a_few_steps(tiny_data_dir, precision):
    config = tiny_config(tiny_data_dir, precision)
    model, losses, before = fit_steps(config)
    assert all(np.isfinite(losses)), losses
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert any(changed)
    assert model.get_layer("conv2").compute_dtype == COMPUTE[precision]
    assert {v.dtype for v in model.trainable_weights} == {"float32"}
    assert model(random_batch(2)[0], training=False).dtype == tf.float32
    # Loss scaling for float16 only: Keras would not add it itself (the functional model's
    # own policy is float32), so compile_model does.
    assert model.dtype_policy.name == "float32"
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")
    if scaled:
        assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.SGD)
        assert float(model.optimizer.learning_rate) == pytest.approx(config.train.learning_rate)
    assert model.jit_compile is False


@pytest.mark.parametrize(
    "precision",
    [
        "mixed_bfloat16",
        # XLA compiling: 5-6 s each, about 12 s with the loss-scaling update (float16).
        pytest.param("float32", marks=pytest.mark.slow),
        pytest.param("mixed_float16", marks=pytest.mark.slow),
    ],
)
def test_jit_compile_trains_on_cpu(tiny_data_dir, precision):
    config = tiny_config(tiny_data_dir, precision, **{"train.jit_compile": True})
    model, losses, _ = fit_steps(config)
    assert model.jit_compile is True
    assert all(np.isfinite(losses)), losses


# ---------------------------------------------------------------------------------------------
# A mixed-precision run: checkpoint, analysis loading, deconvnet oracle, export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MIXED)
def mixed_run(request, tiny_data_dir, tmp_path_factory):
    """(precision, workdir, config, trained model) of train_and_evaluate with a mixed policy
    (bfloat16 with the default callbacks, feature evolution included)."""
    precision = request.param
    callbacks = {} if precision == "mixed_bfloat16" else {"train.callbacks": ()}
    config = tiny_config(
        tiny_data_dir, precision, **callbacks, **{"analysis.evolution.probe_images": 16}
    )
    workdir = str(tmp_path_factory.mktemp(precision) / "w")
    history = train.train_and_evaluate(config, workdir, tf.distribute.get_strategy())
    assert all(np.isfinite(history.history["loss"]))
    return precision, workdir, config, history.model


def test_checkpoint_loads_as_trained_and_as_float32(mixed_run):
    precision, workdir, _, trained = mixed_run
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["precision"] == precision
    as_trained = workdirs.load_model(workdir, float32=False)
    inspected = workdirs.load_model(workdir)
    assert model_lib.precision_of(as_trained) == precision
    assert as_trained.get_layer("conv3").compute_dtype == COMPUTE[precision]
    assert model_lib.precision_of(inspected) == "float32"
    assert all(layer.compute_dtype == "float32" for layer in inspected.layers)
    names = [layer.name for layer in trained.layers]
    assert [layer.name for layer in inspected.layers] == names
    for model in (as_trained, inspected):
        for a, b in zip(trained.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    # The float32 copy is the model (not a different net): close outputs, float32 math.
    x, _ = random_batch(4)
    expected = trained(x, training=False).numpy()
    np.testing.assert_allclose(inspected(x, training=False).numpy(), expected, atol=0.05)
    # A compiled load restores the optimizer it was trained with.
    compiled = workdirs.load_model(workdir, compile=True)
    scaled = isinstance(compiled.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")


def test_deconv_oracle_holds_on_the_model_loaded_for_analysis(mixed_run):
    precision, workdir, config, trained = mixed_run
    model = base.load_model(config, base.Request(workdir=workdir))  # what analyses get
    brought, _ = sources._load_file(workdirs.checkpoint_path(workdir))  # --model=FILE
    assert model_lib.precision_of(brought) == "float32"
    assert model_lib.precision_of(model) == "float32"
    images, _ = random_batch(2, seed=3)
    index = np.arange(2, dtype=np.int32)
    minus = np.full(2, -1, np.int32)
    for name in ("conv1", "conv3", "conv5"):
        maps = graph.tap(model, [name])(images).numpy()
        feature = np.argmax(maps.reshape(2, -1, maps.shape[-1]).max(1), axis=1).astype(np.int32)
        expected = oracles.chain_projection(graph.chain(model, name), images, feature, minus, minus)
        scale = np.abs(expected).max()
        assert scale > 0, name
        out = deconv.project(deconv.build_deconvnet(model, name), images, index, feature)
        np.testing.assert_allclose(out["projection"], expected, rtol=0, atol=2e-4 * scale)
    # The as-trained model computes its projections in 16 bits: not equal at that
    # tolerance, which is why analyses get the float32 copy.
    mixed = deconv.project(deconv.build_deconvnet(trained, "conv5"), images, index, feature)
    assert np.abs(mixed["projection"] - expected).max() > 2e-4 * scale


def test_export_of_a_mixed_model_serves_float32(mixed_run):
    precision, workdir, config, trained = mixed_run
    served = tf.saved_model.load(os.path.join(workdir, "export"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 80, 90, 3), dtype=np.uint8)
    out = served.signatures["serve_images"](images=tf.constant(images))
    probs = out["probabilities"]
    assert probs.dtype == tf.float32 and probs.shape == (2, config.data.num_classes)
    np.testing.assert_allclose(probs.numpy().sum(axis=1), 1.0, atol=1e-5)
    # The export holds the model as trained (mixed precision), preprocessing included.
    pixels = preprocess.pixels(config.data)
    data = config.data
    crops = np.concatenate(
        [preprocess.ten_crops_of_image(i, data.resize_size, data.crop_size, pixels) for i in images]
    )
    expected = tf.nn.softmax(trained(crops, training=False)).numpy().reshape(2, 10, -1).mean(1)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Config: old workdirs, validation
# ---------------------------------------------------------------------------------------------


def test_workdirs_without_the_fields_are_the_same_run(tmp_path):
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), False)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["train"]["precision"], old["train"]["jit_compile"]
    path.write_text(json.dumps(old))
    assert workdirs.run_differences(str(tmp_path), config) == []
    config.train.precision = "mixed_bfloat16"
    config.train.jit_compile = True
    assert workdirs.run_differences(str(tmp_path), config) == [
        "train.jit_compile",
        "train.precision",
    ]


def test_cli_refuses_a_bad_precision_in_one_line():
    """Checked with the other enumerated fields before anything runs (main() prints the
    UsageError as one `error:` line: tests/test_cli.py)."""
    from zf_tf.core.errors import UsageError

    config = cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.train.precision=float16"])
    with pytest.raises(UsageError) as e:
        cli.validate_config(config)
    assert str(e.value) == (
        "config.train.precision='float16' is not valid: choose one of float32, "
        "mixed_bfloat16, mixed_float16"
    )


def test_feature_evolution_snapshots_project_in_float32(tiny_data_dir, tmp_path):
    """The Fig. 4 callback of a mixed-precision run projects with a float32 twin holding the
    live weights: its snapshot after the weights changed equals that of a float32 model."""
    from zf_tf.training import callbacks

    config = tiny_config(tiny_data_dir, "mixed_bfloat16")
    config.analysis.evolution.epochs = (1, 2)
    config.analysis.evolution.probe_images = 4
    config.analysis.evolution.features_per_layer = 1
    config.train.epochs = 2
    model = model_lib.build_model(config.model, "mixed_bfloat16")
    mixed = callbacks.FeatureEvolution(str(tmp_path / "mixed"), config)
    mixed.set_model(model)
    mixed.on_epoch_end(0)
    kernel = model.get_layer("conv1").kernel
    kernel.assign(kernel * 1.5)  # training moved on
    mixed.on_epoch_end(1)
    assert model_lib.precision_of(mixed.inspected) == "float32"
    reference = callbacks.FeatureEvolution(str(tmp_path / "float32"), config)
    reference.set_model(model_lib.as_float32(model))
    reference.on_epoch_end(1)
    name = callbacks.SNAPSHOT_PATTERN.format(2)
    a = np.load(tmp_path / "mixed" / callbacks.MODE / name)
    b = np.load(tmp_path / "float32" / callbacks.MODE / name)
    keys = [k for k in a.files if k.endswith("_projection")]
    assert keys
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
