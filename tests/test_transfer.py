"""--mode=transfer (paper Sec. 5.2, Tables 4-6, Fig. 9): tables, sampling, mean AP, the
Keras linear fit against a numpy Adam, the feature cache, the class-subset pipeline
option, end to end on the tiny embedded dataset and on an image folder, and one-line
errors. Everything runs in-process."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import load_config, workdir_with_model
from tests.images import encode, random_rgb, write
from zf_tf import cli, outputs
from zf_tf.analyses import base
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.experiments import transfer
from zf_tf.experiments.transfer import features, fits, images, metrics, report, sampling, target
from zf_tf.pipelines import DataError, inputs
from zf_tf.training import workdirs

# ------------------------------------------------------------------------------ tables


def test_results_table_exact():
    results = {
        "metric_name": "mean per-class accuracy",
        "draws": 3,
        "feature_layer": "fc7",
        "per_class": [15, 30, 0],
        "transfer": {
            "15": {"mean": 83.81, "std": 0.54},
            "30": {"mean": 86.5, "std": 0.5},
            "0": {"mean": 90.0, "std": 0.0},
        },
        "scratch": {
            "15": {"mean": 22.8, "std": 1.46},
            "30": {"mean": 46.5, "std": 1.7},
            "0": {"mean": 50.04, "std": 0.06},
        },
    }
    header = (
        "| mean per-class accuracy % (mean ± std over 3 draws) "
        "| 15/class | 30/class | all/class |\n"
        "|---|---|---|---|\n"
        "| Pretrained ZFNet features (fc7) + new softmax | 83.8 ± 0.5 | 86.5 ± 0.5 | 90.0 ± 0.0 |\n"
    )
    assert report.results_table(results) == header + (
        "| Same architecture trained from scratch | 22.8 ± 1.5 | 46.5 ± 1.7 | 50.0 ± 0.1 |\n"
    )
    results["scratch"] = {}  # scratch.epochs = 0: the transfer row only
    assert report.results_table(results) == header


def test_fig9_plot_shows_the_papers_points_for_caltech101(tmp_path, monkeypatch):
    figures = []
    save = outputs.save_figure
    monkeypatch.setattr(
        outputs, "save_figure", lambda fig, path, **kw: figures.append(fig) or save(fig, path)
    )
    run = {str(n): {"mean": float(n), "std": 1.0} for n in (5, 15, 30)}
    results = {
        "target": "caltech101",
        "metric_name": "mean per-class accuracy",
        "draws": 5,
        "feature_layer": "fc7",
        "per_class": [5, 15, 30],
        "class_names": ["c"] * 101,
        "transfer": run,
        "scratch": run,
    }
    image = report.plot(results, str(tmp_path / "fig9.png"))
    assert image.ndim == 3 and os.path.exists(tmp_path / "fig9.png")
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    paper = lines["paper: from scratch"]
    assert list(paper.get_xdata()) == [15, 30] and list(paper.get_ydata()) == [22.8, 46.5]
    paper = lines["paper: ImageNet-pretrained fc7 + softmax"]
    assert list(paper.get_ydata()) == [83.8, 86.5]
    results["target"] = "shapes"  # no published figures: none drawn
    report.plot(results, str(tmp_path / "other.png"))
    assert not [k for k in (x.get_label() for x in figures[1].axes[0].get_lines()) if "paper" in k]


def test_ap_table_exact():
    table = report.ap_table(["aero", "bike"], [80.0, float("nan")], [10.04, 20.0])
    assert table == (
        "| AP % | aero | bike | mean |\n"
        "|---|---|---|---|\n"
        "| Pretrained features | 80.0 | - | 80.0 |\n"
        "| From scratch | 10.0 | 20.0 | 15.0 |\n"
    )


def test_label_feature_of_the_paper_targets(tmp_path):
    import tensorflow_datasets as tfds

    # Builder info only: nothing is downloaded or written.
    voc = tfds.builder("voc/2012", data_dir=str(tmp_path)).info.features
    for key in ("objects/label", "labels"):
        names = target.label_feature(voc, key).names
        assert len(names) == 20 and names[:2] == ["aeroplane", "bicycle"]
    caltech = tfds.builder("caltech101", data_dir=str(tmp_path)).info.features
    assert target.label_feature(caltech, "label").num_classes == 102
    with pytest.raises(UsageError, match="not a class label"):
        target.label_feature(caltech, "image")


# ---------------------------------------------------------------------------- sampling


def test_sampling_exact_n_disjoint_seeded():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), [10, 12, 7, 9]))
    orders = sampling.class_orders(labels, 4, seed=3, draw=0)
    for n in (1, 3, 5):
        train = sampling.sample_per_class(orders, n)
        assert np.bincount(labels[train], minlength=4).tolist() == [n] * 4
        assert np.array_equal(train, np.sort(train))
    small, large = (sampling.sample_per_class(orders, n) for n in (3, 5))
    assert set(small) <= set(large)  # nested: smaller N are subsets
    test = sampling.held_out(labels, orders, 5, 0, seed=3, draw=0)
    assert not set(test) & set(large)
    assert np.bincount(labels[test], minlength=4).tolist() == [5, 7, 2, 4]
    capped = sampling.held_out(labels, orders, 5, 3, seed=3, draw=0)
    assert set(capped) <= set(test)
    assert np.bincount(labels[capped], minlength=4).tolist() == [3, 3, 2, 3]
    # Seeded: the same draw repeats exactly, another draw differs.
    again = sampling.class_orders(labels, 4, seed=3, draw=0)
    assert np.array_equal(sampling.sample_per_class(again, 3), small)
    other = sampling.class_orders(labels, 4, seed=3, draw=1)
    assert not np.array_equal(sampling.sample_per_class(other, 3), small)
    with pytest.raises(UsageError, match=r"has 7 training images.*<= 6"):
        sampling.check_counts(labels, ["a", "b", "c", "d"], [1, 7], held_out_test=True)
    sampling.check_counts(labels, ["a", "b", "c", "d"], [1, 7], held_out_test=False)


def test_multi_label_sampling_gives_every_class_n_positives():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1]])
    orders = sampling.class_orders(labels, 3, seed=0, draw=0)
    # Each class's order is a permutation of exactly the images holding that class.
    members = [[0, 1, 4], [1, 2, 5], [3, 4, 5]]
    assert [sorted(o.tolist()) for o in orders] == members
    train = sampling.sample_per_class(orders, 2)
    assert (labels[train].sum(axis=0) >= 2).all()
    # The union of every class's first 2, sorted, each image once.
    expected = sorted({int(i) for order in orders for i in order[:2]})
    assert train.tolist() == expected
    first = sampling.sample_per_class(orders, 1)
    test = sampling.held_out(labels, orders, 1, 5, seed=0, draw=0)  # cap: single-label only
    assert test.tolist() == sorted(set(range(6)) - set(first.tolist()))


# -------------------------------------------------------------------------- metrics


def test_average_precision_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # Ranked hits 1,0,1,0,1: precision 1, 1/2, 2/3, 2/4, 3/5; the monotone envelope at the
    # three positives is 1, 2/3, 3/5, so AP = (1 + 2/3 + 3/5) / 3.
    assert metrics.average_precision(scores, [1, 0, 1, 0, 1]) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )
    # Hits 0,1,0,1,1: precision 0, 1/2, 1/3, 1/2, 3/5. The envelope lifts every positive to
    # 3/5 (plain averaged precision would be (1/2 + 1/2 + 3/5) / 3).
    assert metrics.average_precision(scores, [0, 1, 0, 1, 1]) == pytest.approx(0.6)
    # Input order does not matter, only the ranking.
    perm = [3, 0, 4, 2, 1]
    assert metrics.average_precision(scores[perm], np.array([1, 0, 1, 0, 1])[perm]) == (
        pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    )
    assert np.isnan(metrics.average_precision(scores, [0, 0, 0, 0, 0]))
    # mean AP: classes without a positive test image are left out.
    two = np.stack([scores, scores[::-1], scores], axis=1)
    labels = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    result = metrics.evaluate_scores(two, labels, multi_label=True)
    assert result["per_class"][0] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 3)
    assert result["per_class"][1] == pytest.approx(100.0)  # its only positive ranks first
    assert np.isnan(result["per_class"][2])
    assert result["metric"] == pytest.approx((result["per_class"][0] + 100) / 2)


def test_mean_per_class_accuracy():
    scores = np.eye(3)[[0, 0, 1, 2, 2, 0]]
    labels = np.array([0, 0, 0, 2, 2, 1])
    result = metrics.evaluate_scores(scores, labels, multi_label=False)
    assert result["per_class"] == pytest.approx([100 * 2 / 3, 0.0, 100.0])
    assert result["metric"] == pytest.approx((200 / 3 + 100) / 3)
    assert result["accuracy"] == pytest.approx(100 * 4 / 6)


def test_multi_hot_eager_and_in_dataset_map():
    encode = images.multi_hot(4)
    assert encode(tf.constant([2, 0, 2])).numpy().tolist() == [1, 0, 1, 0]
    assert encode(tf.zeros([0], tf.int64)).numpy().tolist() == [0, 0, 0, 0]
    assert encode(tf.constant(1, tf.int64)).numpy().tolist() == [0, 1, 0, 0]
    assert encode(tf.constant([3], tf.int64)).dtype == tf.int64
    ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1, 1], [], [0, 2]], tf.int64))
    got = [v.tolist() for v in ds.map(lambda y: images.multi_hot(3)(y)).as_numpy_iterator()]
    assert got == [[0, 1, 0], [0, 0, 0], [1, 0, 1]]


# ----------------------------------------------------------------------- linear fit


def _numpy_adam_linear(x, y, num_classes, multi_label, steps, lr, weight_decay):
    """Full-batch Adam (betas 0.9, 0.999, eps 1e-8) from zero weights on mean cross-entropy
    + weight_decay * sum(W**2), in float64: the objective `fits.fit_linear` must minimize."""
    x = x.astype(np.float64)
    w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, steps + 1):
        z = x @ w + b
        if multi_label:
            g = (1 / (1 + np.exp(-z)) - y) / y.size
        else:
            p = np.exp(z - z.max(axis=1, keepdims=True))
            g = (p / p.sum(axis=1, keepdims=True) - np.eye(num_classes)[y]) / len(y)
        grads = [x.T @ g + 2 * weight_decay * w, g.sum(axis=0)]
        rate = lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        for param, grad, mi, vi in zip((w, b), grads, m, v):
            mi[...] = 0.9 * mi + 0.1 * grad
            vi[...] = 0.999 * vi + 0.001 * grad**2
            param -= rate * mi / (np.sqrt(vi) + 1e-8)
    return w, b


@pytest.mark.parametrize("multi_label", [False, True])
def test_fit_linear_is_full_batch_adam_with_l2(multi_label):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=12)
    if multi_label:
        y = (rng.random((12, 3)) < 0.3).astype(np.int64)
        # No class positive in exactly half the images: a gradient that starts at exactly 0
        # would make Adam's first steps follow float32 roundoff (m / sqrt(v) = +-1).
        assert 6 not in y.sum(axis=0).tolist()
    model = fits.fit_linear(
        x, y, 3, multi_label=multi_label, steps=20, learning_rate=0.05, weight_decay=0.01
    )
    kernel, bias = (v.numpy() for v in model.get_layer("linear").weights)
    want_w, want_b = _numpy_adam_linear(x, y, 3, multi_label, 20, 0.05, 0.01)
    np.testing.assert_allclose(kernel, want_w, atol=2e-5)
    np.testing.assert_allclose(bias, want_b, atol=2e-5)
    np.testing.assert_allclose(model.predict_on_batch(x), x @ kernel + bias, atol=1e-5)


def test_fit_linear_callbacks_see_every_step():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), np.arange(8) % 2
    steps = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda i, logs: steps.append(i))
    watched = fits.fit_linear(x, y, 2, steps=7, callbacks=[record])
    assert steps == list(range(7))
    plain = fits.fit_linear(x, y, 2, steps=7)  # all steps in one call: the same fit
    np.testing.assert_allclose(watched.predict_on_batch(x), plain.predict_on_batch(x), atol=1e-6)


def test_softmax_learns_separable_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 4)
    x = (np.eye(3)[y] * 5 + rng.normal(size=(12, 3))).astype(np.float32)
    classify = fits.train_softmax(x, y, 3, multi_label=False, steps=200)
    assert (classify(x).argmax(1) == y).all()
    again = fits.train_softmax(x, y, 3, multi_label=False, steps=200)
    assert np.array_equal(classify(x), again(x))  # zero init, full batch: deterministic
    # The features are divided by their RMS: scaling them changes nothing.
    scaled = fits.train_softmax(1000 * x, y, 3, multi_label=False, steps=200)
    np.testing.assert_allclose(scaled(1000 * x), classify(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- class subset


def test_class_subset_pipeline(tiny_config, tmp_path):
    data = tiny_config.data
    everything = [int(y) for _, y in inputs.encoded_records(data, "validation")]
    data.classes = (7, 2, 5)
    data.num_classes = 3
    kept = [int(y) for _, y in inputs.encoded_records(data, "validation")]
    assert kept == [(7, 2, 5).index(y) for y in everything if y in (7, 2, 5)]
    assert inputs.num_examples(data, "validation") == len(kept) == 15
    cli.validate_config(tiny_config)
    data.num_classes = 4
    with pytest.raises(DataError, match="num_classes=3"):
        cli.validate_config(tiny_config)
    # Folders: the same remapping, from the file list.
    for name in ("a", "b", "c"):
        for i in range(2):
            write(f"{tmp_path}/train/{name}/{i}.png", encode(random_rgb(20, 20, i), "PNG"))
    folder = load_config().data
    folder.source, folder.folder, folder.classes = "folder", str(tmp_path), (2, 0)
    assert [int(y) for _, y in inputs.encoded_records(folder, "train")] == [1, 1, 0, 0]
    assert inputs.num_examples(folder, "train") == 4


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def source(tiny_data_dir, tmp_path_factory):
    """An untrained small source model in a workdir of configs/pretrain_shapes.py."""
    config = load_config("pretrain_shapes")
    config.data.data_dir = tiny_data_dir
    config.data.tfds_config = "tiny"
    config.model.width = 0.125
    # 32 px crops of 36 px squares (model input too): the tracing and steps cost less.
    config.data.crop_size, config.data.resize_size = 32, 36
    path = tmp_path_factory.mktemp("source") / "w"
    return workdir_with_model(config, model_lib.build_model(config.model), path)


def shapes_config(tiny_data_dir, workdir, **transfer_settings):
    """configs/transfer_shapes.py on the tiny dataset, as --mode=transfer resolves it."""
    command_line = load_config("transfer_shapes")
    t = command_line.transfer
    t.data.data_dir = tiny_data_dir
    t.data.tfds_config = "tiny"
    t.per_class, t.draws, t.scratch.epochs, t.softmax.steps = (1, 2), 2, 1, 50
    t.scratch.batch_size = 8
    for key, value in transfer_settings.items():
        t[key] = value
    return workdirs.load_config(workdir, command_line)


def test_features_are_cached_and_match_the_model(source, tiny_data_dir, monkeypatch, absl_caplog):
    config = shapes_config(tiny_data_dir, source)
    tgt = target.resolve_target(config)
    assert tgt.class_names == ["ring", "semicircle", "crescent", "arrow", "letter_l"]
    model = workdirs.load_model(source)
    first, path, hit = features.cached_features(source, model, "fc7", tgt, "validation", 16)
    assert not hit and path.endswith(".npz")
    assert first["features"].shape == (25, 512)  # fc7: 4096 x width 0.125
    assert np.bincount(first["labels"]).tolist() == [5] * 5
    assert np.array_equal(first["indices"], np.arange(25))
    # The features are the model's fc7 on the evaluation pipeline's center crops.
    eval_config = load_config()
    eval_config.data = tgt.data
    eval_config.data.cache = True
    eval_config.train.eval_batch_size = 25
    crops, labels = next(iter(inputs.build_inputs(eval_config, "validation", mode="center")))
    tap = keras.Model(model.inputs, model.get_layer("fc7").output)
    np.testing.assert_allclose(first["features"], tap(crops, training=False), atol=1e-5)
    assert np.array_equal(first["labels"], labels.numpy())
    # Second time: read back, the model is never run.
    monkeypatch.setattr(features, "extract_features", lambda *a: pytest.fail("recomputed"))
    again, path2, hit = features.cached_features(source, model, "fc7", tgt, "validation", 16)
    assert hit and path2 == path and "Feature cache hit" in absl_caplog.text
    assert np.array_equal(again["features"], first["features"])
    # Another layer or split is another key.
    checkpoint = workdirs.checkpoint_path(source)
    keys = {
        features.cache_key(checkpoint, layer, tgt.data, split)
        for layer in ("fc7", "pool5")
        for split in ("train", "validation")
    }
    assert len(keys) == 4


def _mean_per_class_accuracy(scores, labels, num_classes):
    pred = np.argmax(scores, axis=1)
    return 100 * np.mean([np.mean(pred[labels == c] == c) for c in range(num_classes)])


@pytest.mark.slow
def test_end_to_end_tiny(source, tiny_data_dir):
    config = shapes_config(tiny_data_dir, source)
    results = transfer.run_mode(config, source, False)
    out = f"{source}/transfer/shapes"
    saved = json.loads(open(f"{out}/fc7.json").read())
    assert saved["per_class"] == [1, 2] and saved["num_test_images"] == 25
    for key in ("transfer", "scratch"):
        for n in ("1", "2"):
            values = saved[key][n]["values"]
            # Mean per-class accuracy over 5 test images per class: multiples of 4%.
            assert len(values) == 2 and all(v % 4 == pytest.approx(0, abs=1e-9) for v in values)
            assert saved[key][n]["mean"] == pytest.approx(np.mean(values))
            assert saved[key][n]["std"] == pytest.approx(np.std(values))
    assert saved["cache"]["train"]["hit"] is False
    assert results["transfer"]["1"]["mean"] == saved["transfer"]["1"]["mean"]
    # Draw 1, N = 2 recomputed from the cached features: the mode used those images.
    with np.load(saved["cache"]["train"]["path"]) as f:
        train = {k: f[k] for k in ("features", "labels")}
    with np.load(saved["cache"]["test"]["path"]) as f:
        test = {k: f[k] for k in ("features", "labels")}
    orders = sampling.class_orders(train["labels"], 5, config.transfer.seed, draw=1)
    positions = sampling.sample_per_class(orders, 2)
    assert np.bincount(train["labels"][positions]).tolist() == [2] * 5
    t = config.transfer.softmax
    classify = fits.train_softmax(
        train["features"][positions],
        train["labels"][positions],
        5,
        False,
        t.steps,
        t.learning_rate,
        t.weight_decay,
    )
    assert saved["transfer"]["2"]["values"][1] == pytest.approx(
        _mean_per_class_accuracy(classify(test["features"]), test["labels"], 5)
    )
    md = open(f"{out}/fc7.md").read()
    assert md.startswith(
        "Transfer to shapes: mean per-class accuracy %, fc7 features of the model in "
        f"{source}; test: 25 images.\n\n"
    )
    assert report.results_table(saved) in md
    png = tf.io.decode_png(open(f"{out}/fc7.png", "rb").read()).numpy()
    assert png.ndim == 3 and png.shape[0] > 100
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        transfer.run_mode(config, source, False)
    # A second run reuses the features and, seeded, repeats the transfer numbers.
    config = shapes_config(tiny_data_dir, source, draws=1)
    config.transfer.scratch.epochs = 0
    again = transfer.run_mode(config, source, True)
    assert again["cache"]["train"]["hit"] and again["cache"]["test"]["hit"]
    assert again["transfer"]["2"]["values"] == saved["transfer"]["2"]["values"][:1]
    assert again["scratch"] == {}


def test_interrupted_run_resumes_where_it_stopped(source, tiny_data_dir, monkeypatch, capsys):
    config = shapes_config(tiny_data_dir, source, name="shapes_resume")
    out = f"{source}/transfer/shapes_resume"
    softmax, scratch = fits.train_softmax, transfer.mode.ScratchTrainer.fit_predict
    calls = {"softmax": 0, "scratch": 0}

    def counted_softmax(*args):
        calls["softmax"] += 1
        if calls["softmax"] == 3:  # draw 1, N = 1: after draw 0 is done
            raise KeyboardInterrupt
        return softmax(*args)

    def counted_scratch(self, *args, **kwargs):
        calls["scratch"] += 1
        return scratch(self, *args, **kwargs)

    monkeypatch.setattr(fits, "train_softmax", counted_softmax)
    monkeypatch.setattr(transfer.mode.ScratchTrainer, "fit_predict", counted_scratch)
    with pytest.raises(KeyboardInterrupt):
        transfer.run(config, source, workdirs.load_model(source))
    saved = json.loads(open(f"{out}/fc7.progress.json").read())
    assert sorted(saved["done"]) == ["0/1", "0/2"] and not os.path.exists(f"{out}/fc7.json")
    assert calls == {"softmax": 3, "scratch": 2}
    # The same command again: only draw 1's two fits run; draw 0's results are the saved.
    results = transfer.run(config, source, workdirs.load_model(source))
    assert calls == {"softmax": 5, "scratch": 4}
    assert "Resuming: 2 (draw, N) fits already done" in capsys.readouterr().out
    for n in ("1", "2"):
        assert results["transfer"][n]["values"][0] == saved["done"][f"0/{n}"]["transfer"]
        assert results["scratch"][n]["values"][0] == saved["done"][f"0/{n}"]["scratch"]
    assert json.loads(open(f"{out}/fc7.json").read())["transfer"] == results["transfer"]
    assert not os.path.exists(f"{out}/fc7.progress.json")
    # Uninterrupted, the softmax numbers are the same (seeded, full-batch).
    config.transfer.scratch.epochs = 0
    again = transfer.run(config, source, workdirs.load_model(source), overwrite=True)
    for n in ("1", "2"):
        assert again["transfer"][n]["values"] == pytest.approx(results["transfer"][n]["values"])
    # A progress file of other settings is not used.
    outputs.save_text(f"{out}/fc7.progress.json", json.dumps({"identity": {}, "done": {}}))
    transfer.run(config, source, workdirs.load_model(source), overwrite=True)
    assert "from another source model or settings; starting over" in capsys.readouterr().out
    assert not os.path.exists(f"{out}/fc7.progress.json")


@pytest.mark.slow
def test_multi_label_end_to_end(source, tiny_data_dir):
    # The embedded labels as one-element label sets: the VOC code path (multi-hot labels,
    # per-class sigmoids, mean AP, Table 6-style AP table) on data that is here.
    config = shapes_config(tiny_data_dir, source, name="shapes_multi", per_class=(2,), draws=1)
    config.transfer.data.multi_label = True
    config.transfer.data.classes = ()
    results = transfer.run(config, source, workdirs.load_model(source))
    assert results["metric_name"] == "mean AP" and results["num_test_images"] == 50
    with np.load(results["cache"]["test"]["path"]) as f:
        labels = f["labels"]
    assert labels.shape == (50, 10) and (labels.sum(axis=1) == 1).all()  # one class each
    assert np.bincount(labels.argmax(axis=1)).tolist() == [5] * 10
    ap = results["per_class_ap"]
    assert ap["per_class"] == 2 and len(ap["transfer"]) == len(ap["scratch"]) == 10
    # One draw: the mean AP is the mean of the per-class APs (every class has positives).
    assert results["transfer"]["2"]["mean"] == pytest.approx(np.mean(ap["transfer"]))
    assert results["scratch"]["2"]["mean"] == pytest.approx(np.mean(ap["scratch"]))
    md = open(f"{source}/transfer/shapes_multi/fc7.md").read()
    assert "| AP % | circle | square |" in md
    assert md.endswith(report.ap_table(results["class_names"], ap["transfer"], ap["scratch"]))


def test_source_overlap_is_a_warning(source, tiny_data_dir, absl_caplog):
    config = shapes_config(tiny_data_dir, source)
    tgt = target.resolve_target(config)
    target.source_overlap_warning(config, tgt)  # source 0-4, target 5-9
    assert "measures no transfer" not in absl_caplog.text
    config.data.classes, config.data.num_classes = [], 10  # like the default workdir
    target.source_overlap_warning(config, tgt)
    assert "measures no transfer" in absl_caplog.text


def test_image_folder_target(source, tmp_path):
    # 3 classes of 6 images each, the class in the color: flat folder, test held out.
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, color in colors.items():
        for i in range(6):
            image = (random_rgb(48, 56, i) // 4 + np.array(color, np.uint8) // 4 * 3).astype(
                np.uint8
            )
            write(f"{tmp_path}/{name}/{i}.jpg", encode(image, "JPEG"))
    config = load_config("transfer_caltech256")
    t = config.transfer
    t.name, t.data.folder, t.data.classes = "colors", str(tmp_path), ()
    # From scratch is covered by the other end-to-end tests; here it would only add time.
    t.per_class, t.draws, t.test_per_class, t.scratch.epochs, t.softmax.steps = (2,), 1, 0, 0, 50
    results = transfer.run(
        workdirs.load_config(source, config), source, workdirs.load_model(source)
    )
    assert results["class_names"] == ["blue", "green", "red"]
    assert results["num_train_images"] == 18 and results["held_out_test"]
    assert results["num_test_images"] == 12  # 6 - 2 per class, never a training image
    assert results["transfer"]["2"]["values"][0] > 100 / 3  # color is the class here


# ----------------------------------------------------------------------- bad input


def test_configs_load_and_validate():
    for name in ("transfer_shapes", "transfer_caltech101", "transfer_voc2012"):
        config = load_config(name)
        transfer.check_config(config)
        assert "python main.py --mode=transfer" in open(f"zf_tf/configs/{name}.py").read()
    voc = load_config("transfer_voc2012").transfer
    assert voc.data.multi_label and voc.data.name == "voc/2012"
    caltech256 = load_config("transfer_caltech256")
    with pytest.raises(UsageError, match="config.transfer.data.folder="):
        transfer.check_config(caltech256)
    caltech256.transfer.data.folder = "/data/256_ObjectCategories"
    transfer.check_config(caltech256)
    assert len(caltech256.transfer.data.classes) == 256


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(feature_layer="fc9"), "choose one of input_scale, conv1_pad, conv1"),
        (dict(per_class=(1, 30)), "'ring' has 20 training images, fewer than N=30"),
        (dict(per_class=(0, -1)), "distinct images-per-class counts >= 1"),
        (dict(name=""), "configs/transfer_shapes.py, configs/transfer_caltech101.py"),
    ],
)
def test_bad_settings_are_one_line_errors(source, tiny_data_dir, change, expected):
    # cli.main prints a UsageError as one `error:` line; its message must be one line.
    config = shapes_config(tiny_data_dir, source, **change)
    with pytest.raises(UsageError) as error:
        cli.run("transfer", config, base.Request(workdir=source, overwrite=True))
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)


def test_missing_transfer_section(source):
    config = workdirs.load_config(source, None)  # a config file without the section
    assert "transfer" not in config
    with pytest.raises(UsageError, match="transfer section: configs/transfer_shapes.py"):
        transfer.run_mode(config, source, False)
