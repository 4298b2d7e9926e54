"""Architecture ablations (paper Table 3): the variants' exact parameter counts and layers,
configs/ablations.py, and --mode=ablate end to end (table, reuse, refusing mixed budgets)."""

import json
import os

import keras
import numpy as np
import pytest

from tests.conftest import load_config
from tests.helpers import error_lines, main_py
from zf_tf.configs import ablations
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.experiments import ablate
from zf_tf.pipelines import inputs
from zf_tf.training import evaluate, train, workdirs


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def dense(n_in, n_out):
    return n_in * n_out + n_out


# At the paper's size (224 px, width 1, 1000 classes): conv1 7x7x3 -> 96, conv2 5x5 -> 256,
# conv3-5 3x3; pool5 is 6x6, so fc6 reads 6*6*(conv5 maps) inputs.
CONV12 = conv(7, 3, 96) + conv(5, 96, 256)
PAPER_PARAMS = {
    "baseline": CONV12
    + conv(3, 256, 384)
    + conv(3, 384, 384)
    + conv(3, 384, 256)
    + dense(6 * 6 * 256, 4096)
    + dense(4096, 4096)
    + dense(4096, 1000),
    # fc6 feeds the logits directly.
    "no_fc7": CONV12
    + conv(3, 256, 384)
    + conv(3, 384, 384)
    + conv(3, 384, 256)
    + dense(6 * 6 * 256, 4096)
    + dense(4096, 1000),
    # conv5 reads conv2's 256 normalized maps.
    "no_conv3_conv4": CONV12
    + conv(3, 256, 256)
    + dense(6 * 6 * 256, 4096)
    + dense(4096, 4096)
    + dense(4096, 1000),
    "fc_8192": CONV12
    + conv(3, 256, 384)
    + conv(3, 384, 384)
    + conv(3, 384, 256)
    + dense(6 * 6 * 256, 8192)
    + dense(8192, 8192)
    + dense(8192, 1000),
    "conv_512_1024_512": CONV12
    + conv(3, 256, 512)
    + conv(3, 512, 1024)
    + conv(3, 1024, 512)
    + dense(6 * 6 * 512, 4096)
    + dense(4096, 4096)
    + dense(4096, 1000),
    "no_conv3_conv4_fc6_fc7": CONV12 + conv(3, 256, 256) + dense(6 * 6 * 256, 1000),
}
PAPER_TOTALS = {
    "baseline": 62_357_608,
    "no_fc7": 45_576_296,
    "no_conv3_conv4": 59_850_088,
    "fc_8192": 154_542_184,
    "conv_512_1024_512": 107_627_624,
    "no_conv3_conv4_fc6_fc7": 10_435_944,
}


@pytest.fixture
def zero_init(monkeypatch):
    """Zero kernels: counting parameters of 100M+ weight models without the slow random
    draws (the count does not depend on the values)."""
    monkeypatch.setattr(model_lib, "_kernel_initializer", lambda *a: keras.initializers.Zeros())


@pytest.mark.parametrize("variant", list(PAPER_PARAMS))
def test_paper_size_parameter_counts(variant, zero_init):
    config = ablations.set_variant(load_config("zfnet_imagenet"), variant)
    model = model_lib.build_model(config.model)
    assert model.count_params() == PAPER_PARAMS[variant] == PAPER_TOTALS[variant]
    keras.utils.clear_session()


LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "drop6", "fc7", "drop7", "logits")
ABSENT = {
    "no_conv3_conv4": {"conv3", "conv4"},
    "no_fc7": {"fc7", "drop7"},
    "no_fc6_fc7": {"fc6", "drop6", "fc7", "drop7"},
    "no_conv3_conv4_fc6_fc7": {"conv3", "conv4", "fc6", "drop6", "fc7", "drop7"},
}


def test_every_variant_layers_and_widths():
    assert list(ablations.VARIANTS) == [
        "baseline",
        "no_conv3_conv4",
        "no_fc7",
        "no_fc6_fc7",
        "no_conv3_conv4_fc6_fc7",
        "fc_2048",
        "fc_8192",
        "conv_512_1024_512",
        "conv_512_1024_512_fc_8192",
        "alexnet_layer1",
    ]
    base = load_config()  # width 0.25: unit counts scale like every other layer
    for variant in ablations.VARIANTS:
        config = ablate.variant_config(base, variant)
        model = model_lib.build_model(config.model)
        names = {layer.name for layer in model.layers}
        absent = ABSENT.get(variant, set())
        assert names.isdisjoint(absent), variant
        assert set(LAYERS) - absent <= names, variant
        units = {n: model.get_layer(n).units for n in ("fc6", "fc7") if n in names}
        maps = {n: model.get_layer(n).filters for n in ("conv3", "conv4", "conv5") if n in names}
        fc = {"fc_2048": 512, "fc_8192": 2048, "conv_512_1024_512_fc_8192": 2048}.get(variant, 1024)
        assert set(units.values()) <= {fc}, variant
        wide = "conv_512" in variant
        assert maps.get("conv5") == (128 if wide else 64), variant
        if wide:
            assert (maps["conv3"], maps["conv4"]) == (128, 256)
        assert model.get_layer("conv1").kernel_size == (
            (11, 11) if "alexnet" in variant else (7, 7)
        )
        # The budget is the ablation's, the rest the base config's.
        assert config.train.epochs == base.ablate.epochs
        assert config.train.learning_rate == base.train.learning_rate
    keras.utils.clear_session()


def test_config_file_variants():
    config = load_config("ablations")  # default argument: the Fig. 3 model
    assert config.model.to_dict() == load_config().model.to_dict()
    import runpy

    get_config = runpy.run_path(os.path.join("zf_tf", "configs", "ablations.py"))["get_config"]
    no_fc7 = get_config("no_fc7")
    assert tuple(no_fc7.model.remove) == ("fc7",)
    no_fc7.model.remove = ()
    assert no_fc7.to_dict() == load_config().to_dict()
    # A variant is the same network whatever architecture the base config has.
    base = get_config("conv_512_1024_512_fc_8192")
    base.model.layer1, base.model.remove = "alexnet", ("fc7",)
    assert ablate.variant_config(base, "baseline").model.to_dict() == load_config().model.to_dict()
    no_fc7.model.remove = ("fc7",)
    assert ablate.variant_config(base, "no_fc7").model.to_dict() == no_fc7.model.to_dict()
    with pytest.raises(ValueError, match="valid variants: baseline, no_conv3_conv4"):
        get_config("no_fc9")
    with pytest.raises(UsageError, match="unknown variant 'bogus': valid variants: all, base"):
        ablate.requested_variants("baseline,bogus")
    assert ablate.requested_variants("no_fc7, baseline,no_fc7") == ["no_fc7", "baseline"]
    assert ablate.requested_variants("all") == list(ablations.VARIANTS)


@pytest.mark.slow
def test_unknown_variant_is_one_line_through_main(tmp_path):
    proc = main_py("--mode=ablate", "--config=configs/ablations.py:bogus", f"--workdir={tmp_path}")
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "unknown ablation variant 'bogus': valid variants: baseline, no_conv3_conv4" in lines[0]
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_error_rates_exact():
    # 4 images, 7 classes; the label ranks 1st, 3rd, 7th (last), and 2nd (tied with class 0).
    scores = np.array(
        [
            [0.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.1, 0.3, 0.4, 0.2, 0.0, 0.0],
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.7],
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    labels = np.array([1, 2, 5, 1])
    # Top-1 hits: image 0 only (a tie goes to the lower class id: image 3 predicts 0).
    # Top-5 misses: image 2.
    assert evaluate.error_rates(scores, labels) == {"top1_error": 75.0, "top5_error": 25.0}
    # Constant scores (a dead network): the first classes, not every tied class, count.
    flat = evaluate.error_rates(np.zeros((4, 10)), np.array([0, 3, 7, 9]))
    assert flat == {"top1_error": 75.0, "top5_error": 50.0}
    # Fewer than 5 classes: top-5 error is 0.
    assert evaluate.error_rates(np.eye(3)[[0, 2]], np.array([1, 2]))["top5_error"] == 0.0


def test_table_markdown_exact():
    row = {
        "variant": "no_fc7",
        "description": "Removed layer 7",
        "parameters": 1234567,
        "train_top1_error": 12.345,
        "train_top5_error": 1.0,
        "val_top1_error": 40.06,
        "val_top5_error": 9.94,
        "val_center_top1_error": 41.25,
        "wall_s": 99.6,
    }
    info = {
        "dataset": "zf_shapes (embedded, tiny)",
        "budget": {
            "epochs": 2,
            "steps_per_epoch": 3,
            "batch_size": 8,
            "learning_rate": 0.01,
            "seed": 0,
        },
    }
    text = ablate.table_markdown([row], info)
    caption, table = text.split("\n\n")
    assert caption.startswith(
        "Error % on zf_shapes (embedded, tiny): 2 epochs x 3 steps of batch 8, learning rate "
        "0.01, seed 0 for every variant."
    )
    assert table == (
        "| " + " | ".join(ablate.COLUMNS) + " |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| no_fc7 | Removed layer 7 | 1,234,567 | 12.3 | 1.0 | 40.1 | 9.9 | 41.2 | 100 |\n"
    )


def test_check_reuse_plans_and_refusals(tiny_config, tmp_path):
    """Which variants are reused, trained or retrained, decided before any training."""
    base = tiny_config
    base.ablate.epochs, base.ablate.steps_per_epoch = 1, 2
    out = str(tmp_path / "ablate")
    variants = ["no_fc7", "no_conv3_conv4"]
    finished = os.path.join(out, "no_fc7")
    workdirs.prepare_for_training(ablate.variant_config(base, "no_fc7"), finished, False)
    open(os.path.join(finished, ablate.RESULT_FILE), "w").write("{}")
    assert ablate.check_reuse(base, out, variants, False) == {
        "no_fc7": "reuse",
        "no_conv3_conv4": "train",
    }
    # A table of another variant list is refused (the budget is the same).
    table = {"budget": ablate.budget(base), "variants": ["no_fc7"]}
    open(os.path.join(out, "table.json"), "w").write(json.dumps(table))
    with pytest.raises(UsageError, match=r"table.json holds .*differs in variants"):
        ablate.check_reuse(base, out, variants, False)
    os.remove(os.path.join(out, "table.json"))
    # Another budget: the finished variant is refused, or retrained with overwrite.
    base.ablate.epochs = 3
    with pytest.raises(UsageError, match=r"no_fc7 was trained with another config .*train.epochs"):
        ablate.check_reuse(base, out, variants, False)
    assert ablate.check_reuse(base, out, variants, True)["no_fc7"] == "retrain"


@pytest.fixture
def ablation_config(tiny_config, monkeypatch):
    config = tiny_config
    config.model.width = 0.125
    config.ablate.variants = "no_fc7,no_conv3_conv4"
    config.ablate.epochs = 1
    config.ablate.steps_per_epoch = 2
    config.ablate.train_error_images = 16
    # Training's feature-evolution snapshots (Fig. 4, tested in test_evolution.py) and its
    # SavedModel export (test_train.py) would be half of this test's time; the ablation
    # reads neither.
    if hasattr(train, "evolution"):
        monkeypatch.setattr(
            train.evolution, "FeatureEvolution", lambda *args: keras.callbacks.Callback()
        )
    from zf_tf.training import export

    monkeypatch.setattr(export, "export", lambda *args: None)
    return config


def _errors_by_hand(model, config, num_images):
    """Top-1/top-5 error % of `model` on the first images of the training split's center
    crops, ranked with numpy."""
    ds = inputs.build_inputs(config, config.data.train_split, None, "center")
    crops, labels = zip(*ds.unbatch().take(num_images).as_numpy_iterator())
    logits = model(np.stack(crops), training=False).numpy()
    ranks = np.argsort(-logits, axis=1, kind="stable")
    labels = np.array(labels)
    return (
        100 * np.mean(ranks[:, 0] != labels),
        100 * np.mean([label not in top for label, top in zip(labels, ranks[:, :5])]),
    )


@pytest.mark.slow
def test_ablate_mode_end_to_end_and_reuse(ablation_config, tmp_path, monkeypatch):
    import tensorflow as tf

    workdir = str(tmp_path / "w")
    strategy = tf.distribute.get_strategy()
    rows = ablate.run(ablation_config, workdir, strategy)
    out = os.path.join(workdir, "ablate")
    assert os.listdir(workdir) == ["ablate"]  # the parent workdir's own run is untouched
    assert [r["variant"] for r in rows] == ["no_fc7", "no_conv3_conv4"]

    table = json.load(open(os.path.join(out, "table.json")))
    assert table["variants"] == ["no_fc7", "no_conv3_conv4"]
    assert table["budget"]["epochs"] == 1 and table["budget"]["steps_per_epoch"] == 2
    assert table["rows"] == rows
    for row in table["rows"]:
        vdir = os.path.join(out, row["variant"])
        config = ablate.variant_config(ablation_config, row["variant"])
        model = keras.models.load_model(os.path.join(vdir, "checkpoints", "model.keras"))
        # The trained model is the variant's architecture (counted from its config).
        assert row["parameters"] == ablate.parameter_count(config)
        names = {layer.name for layer in model.layers}
        assert names.isdisjoint(ABSENT[row["variant"]])
        ev = json.load(open(os.path.join(vdir, "eval.json")))
        assert (row["val_top1_error"], row["val_top5_error"]) == (
            ev["ten_crop"]["top1_error"],
            ev["ten_crop"]["top5_error"],
        )
        assert (row["val_center_top1_error"], row["val_center_top5_error"]) == (
            ev["center_crop"]["top1_error"],
            ev["center_crop"]["top5_error"],
        )
        # The train columns: the first 16 training images, recomputed here.
        top1, top5 = _errors_by_hand(model, config, 16)
        assert row["train_top1_error"] == pytest.approx(top1)
        assert row["train_top5_error"] == pytest.approx(top5)
        assert row["wall_s"] > 0 and row["epochs_trained"] == 1
        cfg = json.load(open(os.path.join(vdir, "config.json")))
        assert cfg["train"]["epochs"] == 1 and cfg["train"]["steps_per_epoch"] == 2
    md = open(os.path.join(out, "table.md")).read().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header == list(ablate.COLUMNS)
    assert [line.split("|")[1].strip() for line in md[4:]] == ["no_fc7", "no_conv3_conv4"]
    assert open(os.path.join(out, "errors.png"), "rb").read(4) == b"\x89PNG"

    # Rerun: the finished variants are reused, nothing retrains.
    ckpt = os.path.join(out, "no_fc7", "checkpoints", "model.keras")
    mtime = os.path.getmtime(ckpt)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was retrained")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    assert ablate.run(ablation_config, workdir, strategy) == rows
    assert os.path.getmtime(ckpt) == mtime

    # Another budget is refused before any training, naming what differs.
    ablation_config.ablate.epochs = 2
    with pytest.raises(UsageError, match="table.json holds .*differs in .*epochs"):
        ablate.run(ablation_config, workdir, strategy)
    # ...and so is a variant workdir of another budget, even without a table.
    os.remove(os.path.join(out, "table.json"))
    with pytest.raises(UsageError, match="no_fc7 was trained with another config .*train.epochs"):
        ablate.run(ablation_config, workdir, strategy)
    assert os.path.getmtime(ckpt) == mtime


def test_run_identity_of_workdirs_trained_before_model_remove_existed(tmp_path):
    config = load_config()
    old = workdirs.config_json(config)
    del old["model"]["remove"]  # config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert workdirs.run_differences(str(tmp_path), config) == []
    config.model.remove = ("fc7",)
    assert workdirs.run_differences(str(tmp_path), config) == ["model.remove"]
    config.model.remove = ()
    config.ablate.epochs = 9  # a command-line section: not part of the run
    assert workdirs.run_differences(str(tmp_path), config) == []
