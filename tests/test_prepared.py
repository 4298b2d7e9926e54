"""Prepared shards (--mode=prepare): written once from any source, read by train and eval
with the same 10-crop geometry, resumable after a kill, undecodable images counted."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import load_config
from tests.images import encode, undecodable_jpeg, write
from zf_tf.pipelines import DataError, folder, inputs, prepare, prepared, preprocess

S, s = 48, 40
# Bound of the JPEG re-encoding error (quality 90, 4:4:4) on these test photos, in gray
# levels of 0..255 pixels: the mean |difference| of each crop. Measured here 1.2 to 2.7
# (2.7: the lossless PNG, whose pixel noise JPEG smooths); on 60 real ImageNet photos of
# ../shared at S=256 the image's mean |difference| is 2.5 (median), 6.1 (worst). A crop
# taken at another position differs by 10 or more.
MEAN_ERROR_BOUND = 3.0


def photo(h, w, seed):
    """A smooth RGB image with mild noise: JPEG-like content, not flat, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c + seed) + np.cos(5 * (c + 1) * yy) for c in range(3)], -1)
    return np.clip(60 * base + 128 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
    """2 classes x 10 JPEGs/PNGs of assorted sizes (shorter side S, larger, smaller)."""
    root = str(tmp_path / "photos")
    sizes = [
        (S, 70),
        (60, S),
        (90, 120),
        (S, S),
        (40, 64),
        (130, 100),
        (75, 75),
        (S, 51),
        (66, 80),
        (S, 90),
    ]
    for c in range(2):
        for i, (h, w) in enumerate(sizes):
            fmt = "PNG" if i == 3 else "JPEG"
            write(f"{root}/c{c}/{i}.{fmt.lower()}", encode(photo(h, w, 10 * c + i), fmt))
    folder.forget()
    return root


def source_config(root, **data):
    config = load_config()
    config.data.source, config.data.folder, config.data.num_classes = "folder", root, 2
    config.data.resize_size, config.data.crop_size, config.model.input_size = S, s, s
    config.data.cache = False
    config.train.batch_size = config.train.eval_batch_size = 4
    for k, v in data.items():
        config.data[k] = v
    return config


def prepared_config(config, out):
    config = config.copy_and_resolve_references()
    config.data.source, config.data.prepared_dir = "prepared", out
    return config


def test_prepare_writes_shards_that_train_and_eval_read(photos, tmp_path):
    config = source_config(photos)
    out = str(tmp_path / "prep")
    meta = prepare.prepare(config.data, out, ["train", "validation"], shard_size=5)
    # 20 images; every 10th file of the folder is held out: 18 train, 2 validation.
    assert meta["splits"]["train"]["examples"] == 18
    assert meta["splits"]["train"]["class_counts"] == {"0": 9, "1": 9}
    assert meta["splits"]["validation"]["examples"] == 2
    assert meta["class_names"] == ["c0", "c1"] and meta["resize_size"] == S
    assert sorted(os.listdir(out)) == sorted(
        [prepared.METADATA, "validation-00000-of-00001.tfrecord"]
        + [f"train-{k:05d}-of-00004.tfrecord" for k in range(4)]
    )
    records = list(prepared.records(prepared_config(config, out).data, "train"))
    assert len(records) == 18
    square = tf.io.decode_jpeg(records[0][0]).numpy()
    assert square.shape == (S, S, 3)

    pconfig = prepared_config(config, out)
    assert inputs.num_examples(pconfig.data, "train") == 18
    assert inputs.class_names(pconfig.data) == ["c0", "c1"]
    images, labels = next(iter(inputs.build_inputs(pconfig, "train", mode="train")))
    assert images.shape == (4, s, s, 3) and labels.dtype == tf.int64
    batches = list(inputs.build_inputs(pconfig, "validation", mode="ten_crop"))
    assert sum(b[0].shape[0] for b in batches) == 2 and batches[0][0].shape[1:] == (10, s, s, 3)
    pconfig.data.cache = True  # the in-memory cache path reads the squares as well
    images, _ = next(iter(inputs.build_inputs(pconfig, "train", mode="train")))
    assert images.shape == (4, s, s, 3)
    pconfig.data.classes, pconfig.data.num_classes = (1,), 1  # select at read time
    assert inputs.num_examples(pconfig.data, "train") == 9


def test_prepared_crops_equal_the_originals_up_to_jpeg_error(photos, tmp_path):
    """Every training crop (0..9) and the eval ten crops of each prepared image equal those
    of the original (resized to S, center S x S, sub-crop) within MEAN_ERROR_BOUND."""
    config = source_config(photos)
    out = str(tmp_path / "prep")
    prepare.prepare(config.data, out, ["train"])
    pconfig = prepared_config(config, out)
    pixels = preprocess.Pixels("raw", (0.0, 0.0, 0.0))
    originals = list(inputs.encoded_records(config.data, "train"))
    squares = list(inputs.encoded_records(pconfig.data, "train"))
    assert [int(y) for _, y in originals] == [int(y) for _, y in squares]
    errors, wrong = [], []
    for (original, _), (square, _) in zip(originals, squares):
        reference = preprocess.ten_crops(original, S, s, pixels).numpy()
        ten = preprocess.ten_crops(square, S, s, pixels).numpy()
        errors.append(np.abs(ten - reference).mean(axis=(1, 2, 3)))
        crops = [prepared.crop_of_prepared(square, i, S, s, pixels).numpy() for i in range(10)]
        errors.append(np.abs(np.stack(crops) - reference).mean(axis=(1, 2, 3)))
        wrong.append(np.abs(crops[0] - reference[3]).mean())  # another crop position
    errors = np.concatenate(errors)
    assert errors.max() <= MEAN_ERROR_BOUND, errors.max()
    assert min(wrong) > 3 * MEAN_ERROR_BOUND  # the bound tells crops apart
    # The eval pipeline gives the same crops from both sources, in the same order.
    a = np.concatenate([x for x, _ in inputs.build_inputs(config, "train", mode="ten_crop")])
    b = np.concatenate([x for x, _ in inputs.build_inputs(pconfig, "train", mode="ten_crop")])
    assert a.shape == b.shape == (18, 10, s, s, 3)
    assert np.abs(a - b).mean() <= MEAN_ERROR_BOUND


def test_raw_squares_are_the_exact_pixels(photos, tmp_path):
    """encoding='raw': each record is the uint8 S x S center square itself, so every crop
    (train 0..9, eval ten, cached) equals the crop of `center_square_uint8` of the original
    exactly; another encoding is refused unless --overwrite; a prepared.json written before
    encodings existed means JPEG."""
    config = source_config(photos)
    out = str(tmp_path / "raw")
    meta = prepare.prepare(config.data, out, ["train"], shard_size=5, encoding="raw")
    assert meta["encoding"] == "raw" and meta["jpeg_quality"] is None  # no JPEG to refuse
    assert meta["splits"]["train"]["examples"] == 18
    pconfig = prepared_config(config, out)
    pixels = preprocess.Pixels("raw", (0.0, 0.0, 0.0))
    originals = list(inputs.encoded_records(config.data, "train"))
    squares = list(inputs.encoded_records(pconfig.data, "train"))
    for (original, _), (square, _) in zip(originals, squares):
        assert bool(preprocess.is_pixel_tensor(square)) and not preprocess.is_pixel_tensor(original)
        want = preprocess.center_square_uint8(original, S)
        np.testing.assert_array_equal(preprocess.decode_rgb(square), want)
        for i in range(10):
            np.testing.assert_array_equal(
                prepared.crop_of_prepared(square, i, S, s, None),
                preprocess.crop_of_square(want, i, S, s, None),
            )
        np.testing.assert_array_equal(
            preprocess.ten_crops(square, S, s, pixels),
            preprocess.ten_crops_of_square(want, S, s, pixels),
        )
    images, _ = next(iter(inputs.build_inputs(pconfig, "train", normalize=False)))
    assert images.dtype == tf.uint8 and images.shape == (4, s, s, 3)
    pconfig.data.cache = True
    assert next(iter(inputs.build_inputs(pconfig, "train")))[0].shape == (4, s, s, 3)
    # 7x the bytes of quality-90 JPEG at S = 256; here at S = 48 about the pixel count.
    assert os.path.getsize(f"{out}/train-00000-of-00004.tfrecord") > 5 * S * S * 3

    kept = prepare.prepare(
        config.data, out, ["train"], shard_size=5, encoding="raw", jpeg_quality=50
    )
    assert kept["splits"] == meta["splits"]  # the JPEG quality does not matter to raw squares
    with pytest.raises(DataError, match="another encoding, jpeg_quality: use another"):
        prepare.prepare(config.data, out, ["train"], shard_size=5)
    with pytest.raises(DataError, match="encoding='png': choose one of jpeg, raw"):
        prepare.prepare(config.data, out, ["train"], encoding="png")
    jpeg_out = str(tmp_path / "jpeg")
    prepare.prepare(config.data, jpeg_out, ["validation"])
    path = f"{jpeg_out}/{prepared.METADATA}"
    with open(path) as f:
        old = json.load(f)
    del old["encoding"]  # as written before encodings existed
    with open(path, "w") as f:
        json.dump(old, f)
    again = prepare.prepare(config.data, jpeg_out, ["validation"])  # kept: not refused
    assert again["encoding"] == "jpeg" and again["splits"] == old["splits"]


def test_undecodable_images_are_skipped_and_counted(photos, tmp_path, monkeypatch):
    write(f"{photos}/c0/bad.jpg", undecodable_jpeg())
    monkeypatch.setattr(folder, "_decodes", lambda paths: [True] * len(paths))  # index passes it
    folder.forget()
    config = source_config(photos)
    meta = prepare.prepare(config.data, str(tmp_path / "prep"), ["train"], shard_size=4)
    train = meta["splits"]["train"]
    assert (
        train["skipped"] == 1 and train["examples"] == inputs.num_examples(config.data, "train") - 1
    )


def test_prepare_resumes_after_a_kill(photos, tmp_path, monkeypatch):
    """Interrupted while writing shard 2: its temporary goes; a rerun keeps shards 0 and 1
    (not rewritten), continues from shard 2 and ends with the same shards as an
    uninterrupted run."""
    config = source_config(photos)
    clean = str(tmp_path / "clean")
    prepare.prepare(config.data, clean, ["train"], shard_size=4)
    out = str(tmp_path / "prep")
    real, written = prepare._example, []

    def dying(image, label):
        if len(written) == 10:  # 2 shards of 4 done, 2 images into the third (of 5)
            raise KeyboardInterrupt
        written.append(label)
        return real(image, label)

    monkeypatch.setattr(prepare, "_example", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(config.data, out, ["train"], shard_size=4)
    done = sorted(glob.glob(f"{out}/train-*.tfrecord"))
    assert [os.path.basename(p) for p in done] == [
        "train-00000-of-00005.tfrecord",
        "train-00001-of-00005.tfrecord",
    ]
    assert not glob.glob(f"{out}/*.tmp") and not os.path.exists(f"{out}/{prepared.METADATA}")
    stamps = {p: os.stat(p).st_mtime_ns for p in done}
    monkeypatch.setattr(prepare, "_example", real)
    encoded = []
    monkeypatch.setattr(
        prepare,
        "encoded_square",
        lambda e, *a, f=prepare.encoded_square: encoded.append(1) or f(e, *a),
    )
    meta = prepare.prepare(config.data, out, ["train"], shard_size=4)
    assert {p: os.stat(p).st_mtime_ns for p in done} == stamps  # kept, not rewritten
    assert meta["splits"]["train"]["examples"] == 18 and not glob.glob(f"{out}/*.tmp")
    assert not glob.glob(f"{out}/*.progress.json")
    for name in meta["splits"]["train"]["shards"]:
        with open(f"{out}/{name}", "rb") as a, open(f"{clean}/{name}", "rb") as b:
            assert a.read() == b.read(), name
    # A finished split is not prepared again.
    assert prepare.prepare(config.data, out, ["train"], shard_size=4)["splits"] == meta["splits"]


def test_damaged_shards_are_named_before_a_run_and_repaired_alone(photos, tmp_path, capfd):
    """A missing and a truncated shard: every run's check names both, with the command that
    rewrites them; that command rewrites just those two, byte-identical to the originals."""
    from zf_tf import cli
    from zf_tf.analyses.base import Request

    config = source_config(photos)
    out = str(tmp_path / "prep")
    prepare.prepare(config.data, out, ["train", "validation"], shard_size=4)
    pconfig = prepared_config(config, out)
    prepared.verify(pconfig.data, ["train", "validation"])  # intact: no error
    names = sorted(os.listdir(out))
    originals = {n: open(f"{out}/{n}", "rb").read() for n in names if n.endswith(".tfrecord")}
    stamps = {n: os.stat(f"{out}/{n}").st_mtime_ns for n in originals}
    missing, cut = "train-00001-of-00005.tfrecord", "train-00003-of-00005.tfrecord"
    os.remove(f"{out}/{missing}")
    with open(f"{out}/{cut}", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError) as e:
        inputs.check_source(pconfig.data, ["train", "validation"])
    message = str(e.value)
    assert f"2 prepared shard(s) damaged: {missing} (missing); {cut} (100 bytes, written with" in (
        message
    )
    assert "\n" not in message and "--config.prepare.splits=train " in message
    command = message.split("Rewrite just those with: ")[1].split()
    assert command[:3] == ["python", "main.py", "--mode=prepare"]
    repair = cli.resolved_config(cli.DEFAULT_CONFIG, command[3:])
    cli.run("prepare", repair, Request(workdir=str(tmp_path / "unused")))
    assert f"train: rewriting 2 damaged shard(s): {missing}, {cut}" in capfd.readouterr().out
    assert sorted(os.listdir(out)) == names
    for n, data in originals.items():
        assert open(f"{out}/{n}", "rb").read() == data, n
        if n not in (missing, cut):
            assert os.stat(f"{out}/{n}").st_mtime_ns == stamps[n], f"{n} was rewritten"
    inputs.check_source(pconfig.data, ["train", "validation"])
    # Altered without a change of size: passes the check, and reading that shard stops at
    # the record that fails its checksum, said in one line with the fix, in both orders.
    altered = "train-00002-of-00005.tfrecord"
    with open(f"{out}/{altered}", "r+b") as f:
        f.seek(os.path.getsize(f"{out}/{altered}") // 2)
        f.write(bytes(b ^ 0xFF for b in f.read(4))[:4])
    inputs.check_source(pconfig.data, ["train", "validation"])
    total = prepared.split_info(pconfig.data, "train")["examples"]
    capfd.readouterr()
    for shuffle in (False, True):
        read = prepared.records(pconfig.data, "train", shuffle)
        labels = [int(y) for _, y in read.as_numpy_iterator()]
        kept = len(labels) - (total - 4)  # 4 records a shard: the altered one keeps 0 to 3
        assert 0 <= kept < 4
        lines = [l for l in capfd.readouterr().err.splitlines() if "prepared shard" in l]
        assert len(lines) == 1 and lines[0].startswith(
            f"WARNING: prepared shard {out}/{altered}: only {kept} of 4 records are readable"
        ), lines
        assert lines[0].split("delete it and run ")[1] == prepared.repair_command(
            out, prepared.metadata(pconfig.data), ["train"]
        )
    os.remove(f"{out}/{altered}")
    cli.run("prepare", repair, Request(workdir=str(tmp_path / "unused")))
    assert open(f"{out}/{altered}", "rb").read() == originals[altered]


def test_another_recipe_is_refused_unless_overwrite(photos, tmp_path):
    config = source_config(photos)
    out = str(tmp_path / "prep")
    prepare.prepare(config.data, out, ["validation"])
    with pytest.raises(DataError, match="another jpeg_quality: use another"):
        prepare.prepare(config.data, out, ["validation"], jpeg_quality=70)
    meta = prepare.prepare(config.data, out, ["validation"], jpeg_quality=70, overwrite=True)
    assert meta["jpeg_quality"] == 70
    with open(f"{out}/{prepared.METADATA}") as f:
        assert json.load(f)["jpeg_quality"] == 70
    pconfig = prepared_config(config, out)
    pconfig.data.resize_size = 64
    with pytest.raises(
        DataError, match="prepared at resize size 48 but config.data.resize_size=64"
    ):
        inputs.num_examples(pconfig.data, "validation")
    pconfig.data.resize_size = S
    with pytest.raises(DataError, match="unknown split 'train'.*valid splits: validation"):
        inputs.check_split(pconfig.data, "train")


def test_prepare_from_a_tfds_source(tiny_config, tmp_path):
    """The embedded tfds dataset (PNG bytes) prepares like a folder: every image, labels kept."""
    config = tiny_config
    out = str(tmp_path / "prep")
    meta = prepare.prepare(config.data, out, ["validation"], shard_size=16)
    n = inputs.num_examples(config.data, "validation")
    assert meta["splits"]["validation"]["examples"] == n
    original = [int(y) for _, y in inputs.encoded_records(config.data, "validation")]
    pconfig = prepared_config(config, out)
    assert [int(y) for _, y in prepared.records(pconfig.data, "validation")] == original


def test_command_line_prepares_and_refuses_bad_input(photos, tmp_path, capsys):
    from zf_tf import cli
    from zf_tf.analyses.base import Request
    from zf_tf.core.errors import UsageError

    out = str(tmp_path / "prep")
    args = [
        "--config.data.source=folder",
        f"--config.data.folder={photos}",
        "--config.data.num_classes=2",
        f"--config.data.resize_size={S}",
        f"--config.data.crop_size={s}",
    ]
    config = cli.resolved_config(cli.DEFAULT_CONFIG, args + [f"--config.data.prepared_dir={out}"])
    workdir = str(tmp_path / "workdir")
    cli.run("prepare", config, Request(workdir=workdir))
    assert "--config.data.source=prepared" in capsys.readouterr().out
    assert sorted(json.load(open(f"{out}/{prepared.METADATA}"))["splits"]) == [
        "train",
        "validation",
    ]
    assert not os.path.exists(workdir)  # the workdir is not touched
    with pytest.raises(UsageError, match="needs --config.data.prepared_dir"):
        cli.run("prepare", cli.resolved_config(cli.DEFAULT_CONFIG, args), Request(workdir=workdir))
    with pytest.raises(DataError, match="encoding='gif' is not valid: choose one of jpeg, raw"):
        cli.validate_config(
            cli.resolved_config(cli.DEFAULT_CONFIG, args + ["--config.prepare.encoding=gif"])
        )
    with pytest.raises(DataError, match="prepare.jpeg_quality=0 is not valid"):
        cli.validate_config(
            cli.resolved_config(cli.DEFAULT_CONFIG, args + ["--config.prepare.jpeg_quality=0"])
        )
    with pytest.raises(DataError, match="source='prepared' needs config.data.prepared_dir"):
        cli.validate_config(
            cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.data.source=prepared"])
        )
