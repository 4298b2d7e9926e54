"""Image folders: odd but valid files decode, broken ones are skipped and counted."""

import types

import numpy as np
import pytest

from tests.conftest import load_config
from tests.images import encode, make_messy_folder, random_rgb, undecodable_jpeg, write
from zf_tf.pipelines import folder, inputs


@pytest.fixture
def messy(tmp_path):
    root = str(tmp_path / "images")
    return root, make_messy_folder(root)


def test_index_counts_and_reasons(messy, absl_caplog):
    root, expected = messy
    index = folder.index_folder(root)
    assert index.class_names == ["cat", "dog"]
    assert len(index.paths) == expected["readable"]
    assert {k: len(v) for k, v in index.skipped.items()} == expected["skipped"]
    assert index.num_skipped == 6
    assert sorted(index.labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert index.ignored == {".txt": 1}
    assert (
        "14 image files, 8 readable, 6 skipped (1 corrupt, 1 empty, 2 truncated, "
        "1 undecodable, 1 unsupported .tif); other files ignored: 1 .txt"
    ) in absl_caplog.text


def test_file_checks_are_remembered_per_file(tmp_path, monkeypatch):
    """Each file is opened (cheap check) and decoded once: a second index of an unchanged
    folder only stats it; a changed file (new size and mtime) is checked again."""
    root = str(tmp_path / "images")
    good = write(f"{root}/a.jpg", encode(random_rgb(40, 40, 1), "JPEG"))
    bad = write(f"{root}/b.jpg", undecodable_jpeg())
    cut = write(f"{root}/c.jpg", encode(random_rgb(40, 40, 3), "JPEG")[:-200])
    decoded, opened = [], []
    real_decodes, real_check = folder._decodes, folder.check_file
    monkeypatch.setattr(folder, "_decodes", lambda p: decoded.append(p) or real_decodes(p))
    monkeypatch.setattr(folder, "check_file", lambda p: opened.append(p) or real_check(p))
    expected = [None, "undecodable", "truncated"]
    assert folder.file_checks(root, [good, bad, cut]) == expected
    assert folder.file_checks(root, [good, bad, cut]) == expected
    assert sorted(opened) == [good, bad, cut] and decoded == [[good, bad]]  # once each
    write(bad, encode(random_rgb(40, 40, 2), "JPEG"))  # repaired: new size and mtime
    assert folder.file_checks(root, [good, bad, cut]) == [None, None, "truncated"]
    assert opened[3:] == [bad] and decoded[1:] == [[bad]]


def test_a_folder_is_indexed_once_per_process(tmp_path, monkeypatch):
    """The train and validation splits of a folder without split subfolders, and every
    count of them, share one listing of the tree."""
    root = str(tmp_path / "images")
    for c in range(2):
        for i in range(10):
            write(f"{root}/c{c}/{i}.png", encode(random_rgb(40, 40, 10 * c + i), "PNG"))
    listings = []
    real = folder.index_folder
    monkeypatch.setattr(folder, "index_folder", lambda r: listings.append(r) or real(r))
    folder.forget()
    config = folder_config(root)
    assert inputs.num_examples(config.data, "train") == 18
    assert inputs.num_examples(config.data, "validation") == 2
    next(iter(inputs.build_inputs(config, "train", mode="train")))
    assert listings == [root]
    folder.forget()
    assert inputs.num_examples(config.data, "validation") == 2
    assert listings == [root, root]


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        folder.index_folder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        folder.index_folder(str(tmp_path / "empty"))


def folder_config(root, **train):
    config = load_config()
    config.data.source = "folder"
    config.data.folder = root
    config.data.cache = False
    config.train.batch_size = 4
    config.train.eval_batch_size = 4
    return config


def test_pipeline_over_messy_folder(messy):
    root, expected = messy
    config = folder_config(root)
    folder.forget()
    # All of a folder without split subfolders: train + validation partition the files.
    n_train = inputs.num_examples(config.data, "train")
    n_val = inputs.num_examples(config.data, "validation")
    assert n_train + n_val == expected["readable"]
    seen = 0
    for split in ("train", "validation"):
        for images, _ in inputs.build_inputs(config, split, mode="ten_crop"):
            assert images.shape[1:] == (10, 64, 64, 3)
            assert np.isfinite(images.numpy()).all()
            seen += images.shape[0]
    assert seen == expected["readable"]


def test_indexed_batches_of_each_input_pipeline(messy):
    """`indexed=True`: each of 2 input pipelines reads every other image, and carries its
    position in the split, whatever the pipeline: together, the whole split once."""
    import tensorflow as tf

    root, _ = messy
    config = folder_config(root)
    folder.forget()
    whole = [
        (image, int(y))
        for images, labels in inputs.build_inputs(config, "validation", mode="center")
        for image, y in zip(images.numpy(), labels.numpy())
    ]
    seen = {}
    for pipeline in (0, 1):
        context = tf.distribute.InputContext(2, pipeline, 2)
        batches = inputs.build_inputs(config, "validation", context, "center", indexed=True)
        for images, labels, index in batches:
            for image, y, i in zip(images.numpy(), labels.numpy(), index.numpy()):
                assert i % 2 == pipeline and i not in seen
                seen[int(i)] = True
                np.testing.assert_array_equal(image, whole[i][0])
                assert int(y) == whole[i][1]
    assert sorted(seen) == list(range(len(whole)))


def test_split_subfolders_are_used(tmp_path):
    for split, n in (("train", 3), ("validation", 2)):
        for i in range(n):
            write(f"{tmp_path}/{split}/a/{i}.png", encode(random_rgb(40, 40, i), "PNG"))
    config = folder_config(str(tmp_path))
    folder.forget()
    assert inputs.num_examples(config.data, "train") == 3
    assert inputs.num_examples(config.data, "validation") == 2


def test_layout_is_checked_before_training(tmp_path):
    """One clear line per bad layout, from the command line's checks, before anything is
    written (the workdir is never created)."""
    from zf_tf import cli
    from zf_tf.analyses.base import Request
    from zf_tf.pipelines import DataError

    def make(layout):
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        for path, n in layout.items():
            for i in range(n):
                write(f"{root}/{path}/{i}.png", encode(random_rgb(40, 40, i), "PNG"))
            if n == 0:
                (root / path).mkdir(parents=True)
        return str(root)

    cases = [
        ({"train/a": 2, "train/b": 2}, "has train/ but no validation/: add "),
        ({"a": 2, "b": 0}, "class folder .*/b holds no images"),
        ({"a": 3}, "has 1 class folder: a classifier needs at least 2"),
        (
            {"a": 1, "b": 1, "c": 1},
            "has 3 class folders but config.data.num_classes=10: set --config.data.num_classes=3",
        ),
        ({"train/a": 1, "train/b": 1, "validation/a": 1}, "the splits must have the same classes"),
    ]
    for layout, message in cases:
        config = cli.resolved_config(
            cli.DEFAULT_CONFIG,
            ["--config.data.source=folder", f"--config.data.folder={make(layout)}"],
        )
        workdir = tmp_path / "w"
        with pytest.raises(DataError, match=message):
            cli.run("train", config, Request(workdir=str(workdir)))
        assert not workdir.exists()
    # A good layout passes the checks (10 classes, as the default config says).
    good = make({f"c{i}": 1 for i in range(10)})
    config = cli.resolved_config(
        cli.DEFAULT_CONFIG, ["--config.data.source=folder", f"--config.data.folder={good}"]
    )
    cli.check_training(config, types.SimpleNamespace(num_replicas_in_sync=1), "default")
