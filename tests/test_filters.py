"""--mode=filters (paper Fig. 6): dead layer-1 filters against hand-set kernels and a
brute-force oracle; the mode end to end on two untrained workdirs (ZFNet, AlexNet layer 1)."""

import json
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.test_train import events
from zf_tf.analyses import filters
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
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


def opts(**kw):
    return types.SimpleNamespace(
        **{"overwrite": False, "split": "", "num_images": 0, "compare": "", **kw}
    )


def untrained_workdir(config, path, layer1):
    """A workdir holding an untrained model (checkpoint + config.json), no training."""
    model = small_model(config, layer1)
    workdirs.prepare_for_training(config, str(path), overwrite=False)
    workdirs.save_model_atomic(model, workdirs.checkpoint_path(str(path)))
    return model


def test_mode_end_to_end(tiny_config, tmp_path):
    zf_dir, alex_dir = tmp_path / "zfnet", tmp_path / "alexnet"
    zf = untrained_workdir(tiny_config, zf_dir, "zfnet")
    untrained_workdir(tiny_config, alex_dir, "alexnet")
    config = workdirs.load_config(str(zf_dir), tiny_config)
    out = filters.run_mode(config, str(zf_dir), opts(compare=str(alex_dir)))
    png = np.asarray(Image.open(out["png"]))
    assert png.ndim == 3 and min(png.shape[:2]) > 300
    record = json.loads((zf_dir / "filters" / "filters.json").read_text())
    assert record == out["summary"] and record["split"] == "validation"
    assert record["num_images"] == 50
    (zf_label, zf_rec), (alex_label, alex_rec) = record["models"].items()
    assert zf_label.startswith("zfnet") and alex_label.startswith("alexnet")
    assert zf_rec["layer1"] == {"kernel": 7, "stride": 2, "filters": 12}
    assert alex_rec["layer1"] == {"kernel": 11, "stride": 4, "filters": 12}
    kernel = zf.get_layer("conv1").get_weights()[0]
    rms = np.sqrt((kernel.astype(np.float64) ** 2).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(zf_rec["rms"], rms, rtol=1e-6)
    for rec in (zf_rec, alex_rec):
        for criterion in ("rms", "never_active"):
            dead = rec["dead"][criterion]
            assert dead["count"] == len(dead["indices"])
        assert len(rec["rms"]) == len(rec["max_activation"]) == 12
        winners = rec["layer2_winners"]
        assert len(winners) == 16  # 16 of conv2's 32 maps
        assert [w["feature"] for w in winners] == [w["feature"] for w in zf_rec["layer2_winners"]]
        assert all(0 <= w["image"] < 50 for w in winners)
    tb = events(zf_dir / "logs" / "filters")
    assert tb["filters/comparison"][-1][1].shape == png.shape[:2] + (3,)
    with pytest.raises(UsageError, match="--overwrite"):
        filters.run_mode(config, str(zf_dir), opts(compare=str(alex_dir)))


def test_missing_compare_names_the_command(tmp_path, tiny_config):
    workdir = str(tmp_path / "w")
    expected = (
        f"python main.py --mode=train --config.model.layer1=alexnet "
        f"--workdir={workdir}/ablate/alexnet_layer1"
    )
    with pytest.raises(UsageError) as error:
        filters.run_mode(tiny_config, workdir, opts())
    assert expected in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UsageError, match="--workdir=/nowhere"):
        filters.run_mode(tiny_config, workdir, opts(compare="/nowhere"))
