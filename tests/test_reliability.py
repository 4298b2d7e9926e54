"""Hostile input refused before anything is written: numbers out of range, a crop too small
for the topology, batches that do not split over the replicas, --top_k beyond the split;
one writer per workdir (the lock), in-process and across processes."""

import json
import os
import subprocess
import sys
import types

import pytest

from tests.conftest import ROOT, load_config, run_analysis
from tests.helpers import tiny_args
from zf_tf import cli
from zf_tf.analyses.base import Request
from zf_tf.core import errors
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError
from zf_tf.training import resume, workdirs


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.epochs=-1", "config.train.epochs=-1 is not valid: it must be >= 1"),
        ("--config.train.batch_size=0", "config.train.batch_size=0 is not valid: it must be >= 1"),
        ("--config.train.batch_size=-5", "config.train.batch_size=-5 is not valid"),
        ("--config.train.learning_rate=0", "config.train.learning_rate=0.0 is not valid"),
        ("--config.train.momentum=1.5", "must be in [0, 1)"),
        ("--config.data.num_classes=1", "config.data.num_classes=1 is not valid: it must be >= 2"),
        ("--config.model.dropout=1", "config.model.dropout=1.0 is not valid"),
        (
            "--config.data.crop_size=8",
            "config.data.crop_size=8 is too small for this model: its smallest input that "
            "leaves every layer non-empty is 21 px",
        ),
    ],
)
def test_numbers_out_of_range_write_nothing(override, message, tmp_path):
    config = cli.resolved_config(cli.DEFAULT_CONFIG, [override])
    workdir = tmp_path / "w"
    pattern = message.replace("[", r"\[").replace(")", r"\)")
    with pytest.raises((UsageError, DataError), match=pattern):  # DataError: config.data
        cli.run("train", config, Request(workdir=str(workdir)))
    assert not workdir.exists()


def test_smallest_input_size_is_the_topologys():
    """At the computed size the real (full-width) model builds; one pixel less it cannot."""
    for layer1, arch in (("zfnet", "zfnet"), ("alexnet", "zfnet"), ("zfnet", "vgg")):
        config = load_config("vgg_small" if arch == "vgg" else "default").model
        config.layer1 = layer1
        smallest = model_lib.smallest_input_size(config)
        config.input_size = smallest
        assert model_lib.build_model(config).output.shape[-1] == 10
        config.input_size = smallest - 1
        with pytest.raises(ValueError):
            model_lib.build_model(config)
    assert model_lib.smallest_input_size(load_config("vgg_small").model) == 8  # 3 2x2 pools


def test_batches_must_split_over_the_replicas():
    config = load_config()
    config.train.batch_size = 63
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(UsageError, match="batch_size=63 does not split over the 2 replicas"):
        cli.check_training(config, two, "mirrored")
    config.train.batch_size, config.train.eval_batch_size = 64, 15  # eval may split 8 + 7
    cli.check_training(config, two, "mirrored")


def test_top_k_beyond_the_split(tiny_config, tmp_path):
    with pytest.raises(UsageError, match="--top_k=100000 exceeds the 50 images of split"):
        run_analysis("deconv", tiny_config, tmp_path / "w", top_k=100000, untrained=True)
    assert not (tmp_path / "w").exists()


def test_one_writer_per_workdir(tmp_path):
    workdir = str(tmp_path / "w")
    config = cli.resolved_config(cli.DEFAULT_CONFIG, [])
    with workdirs.lock(workdir):
        with pytest.raises(UsageError, match=rf"w is in use by PID {os.getpid()} \("):
            cli.run("eval", config, Request(workdir=workdir))
        with pytest.raises(UsageError, match="in use by"):
            with workdirs.lock(workdir):
                pass
    with workdirs.lock(workdir):  # released: free again
        pass
    # A refused second writer wrote nothing; the lock lives outside the workdir.
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_second_writer_process_is_refused_in_one_line(tmp_path):
    workdir = str(tmp_path / "w")
    with workdirs.lock(workdir):
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "main.py"),
                "--mode=export",
                f"--workdir={workdir}",
            ],
            capture_output=True,
            text=True,
            # Another temporary folder: the lock is seen all the same.
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(tmp_path)),
            timeout=300,
        )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {workdir} is in use by PID {os.getpid()} ({' '.join(sys.argv)}): wait for it "
        "to finish, or use another --workdir"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_undecodable_image_crashes_no_reader(tmp_path, monkeypatch, capsys):
    """A file the pipelines cannot decode although the index let it through (changed since
    it was indexed): training with its augmentation grid and Fig. 4 probe set, eval, the
    analyses' example sets and transfer features skip it, and eval counts it."""
    import tensorflow as tf

    from tests.images import encode, random_rgb, undecodable_jpeg, write
    from zf_tf.experiments.transfer import images as transfer_images
    from zf_tf.experiments.transfer.target import Target
    from zf_tf.pipelines import examples, folder
    from zf_tf.training import train

    root = tmp_path / "photos"
    for c in range(2):
        for i in range(10):
            write(f"{root}/c{c}/{i}.png", encode(random_rgb(48, 48, 10 * c + i), "PNG"))
    # First in the training split (where the augmentation grid and probe set start) and
    # in validation (held out: every 10th file, so c0/9).
    write(f"{root}/c0/0.png", undecodable_jpeg())
    write(f"{root}/c0/9.png", undecodable_jpeg(seed=3))
    monkeypatch.setattr(folder, "_decodes", lambda paths: [True] * len(paths))
    folder.forget()
    config = cli.resolved_config(
        cli.DEFAULT_CONFIG,
        [
            "--config.data.source=folder",
            f"--config.data.folder={root}",
            "--config.data.num_classes=2",
            "--config.data.resize_size=40",
            "--config.data.crop_size=36",
            "--config.model.input_size=36",
            "--config.model.width=0.125",
            "--config.train.batch_size=4",
            "--config.train.eval_batch_size=4",
            "--config.train.epochs=1",
            "--config.train.steps_per_epoch=2",
            "--config.analysis.evolution.probe_images=4",
        ],
    )
    train.train_and_evaluate(config, str(tmp_path / "w"), tf.distribute.get_strategy())
    results = json.loads((tmp_path / "w" / "eval.json").read_text())
    assert (results["num_images"], results["skipped_images"]) == (1, 1)
    assert "1 of 2 validation images could not be decoded and are not scored" in (
        capsys.readouterr().out
    )
    ex = examples.load_examples(config, "train", 3)
    assert ex.indices.tolist() == [1, 2, 3]  # positions in the split: 0 is left out
    target = Target(config.data, ["c0", "c1"], multi_label=False, held_out=False)
    got = [i for b in transfer_images.center_crops(target, "train", 8) for i in b[0].numpy()]
    assert got == list(range(1, 18))  # transfer features: 17 of the 18 training images


def fault(code, path):
    return OSError(code, os.strerror(code), str(path))


def test_file_system_faults_are_one_line(tmp_path, capsys, monkeypatch):
    """A path that is a file, a read-only folder, a full disk: one line naming the path and
    the cause, exit 1, before anything is written where it can be checked up front."""
    import errno

    import tensorflow as tf

    from zf_tf.core.errors import file_system_fault

    class Flags:
        config, mode, strategy = cli.DEFAULT_CONFIG, "eval", "default"
        overwrite, model, weights = False, "", ""

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for workdir, message in (
        (a_file, f"error: --workdir={a_file} is a file, not a folder: choose another --workdir"),
        (a_file / "w", f"error: --workdir={a_file}/w: {a_file} is a file, not a folder"),
    ):
        Flags.workdir = str(workdir)
        with pytest.raises(SystemExit) as e:
            cli.main(Flags, [])
        assert e.value.code == 1
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert a_file.read_text() == "x"
    # A folder this user cannot write (root ignores permission bits, so os.access stands in).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=f"cannot write {tmp_path}: (Permission denied|Read-only)"):
        workdirs.check_writable(str(tmp_path / "new"))
    monkeypatch.undo()
    # Faults met while writing (a full disk): main() says where and why in one line.
    Flags.workdir = str(tmp_path / "w")
    for raised, message in (
        (
            fault(errno.ENOSPC, tmp_path / "w" / "eval.json.tmp"),
            f"error: cannot write {tmp_path}/w/eval.json.tmp: No space left on device "
            "(free some space, or choose another --workdir)",
        ),
        (
            tf.errors.UnknownError(None, None, "/x/export/.tmp: Read-only file system"),
            "error: cannot write: /x/export/.tmp: Read-only file system",
        ),
    ):

        def run(*args, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "run", run)
        with pytest.raises(SystemExit) as e:
            cli.main(Flags, [])
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert file_system_fault(ValueError("a bug")) is None  # bugs keep their traceback
    # stdout and stderr into one log (2>&1): the error starts a line of its own, not glued
    # to a progress bar's.
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stdout", log)
        monkeypatch.setattr(sys, "stderr", log)
        log.write("1/2 ━━━━━━━━━━ 1s 2s/step - loss: 3.6551")
        with pytest.raises(SystemExit):
            cli.fail("cannot write x: No space left on device")
    assert (tmp_path / "log").read_text().splitlines()[1] == (
        "error: cannot write x: No space left on device"
    )


def test_a_full_disk_leaves_no_temporary_and_the_old_outputs(tmp_path, monkeypatch):
    import errno

    import keras
    import tensorflow as tf

    from zf_tf import outputs
    from zf_tf.training import export

    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    path = workdirs.checkpoint_path(str(tmp_path))
    resume.save_model(model, path, epochs_done=1)
    before = open(path, "rb").read()

    def half_then_full(self, filepath, *a, **k):
        open(filepath, "wb").write(b"PK\x03\x04 half a model")
        raise OSError(errno.ENOSPC, "No space left on device")  # as Keras' zip: no file named

    monkeypatch.setattr(keras.Model, "save", half_then_full)
    with pytest.raises(OSError, match="No space left") as e:
        resume.save_model(model, path, epochs_done=2)
    assert e.value.filename == path  # the file meant, not its temporary
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(path))) == ["model.epochs.json", "model.keras"]
    monkeypatch.undo()
    # The export: its temporary folder goes, the previous export stays.
    config = load_config()
    config.data.resize_size, config.data.crop_size = 5, 4
    export.export(model, config, str(tmp_path))
    saved = sorted(os.listdir(tmp_path / "export"))
    real_save = tf.saved_model.save

    def fill_disk(module, directory, **kw):
        real_save(module, directory, **kw)
        raise tf.errors.UnknownError(  # as TensorFlow words it: a temporary of its own
            None,
            None,
            f"{directory}/variables/variables_temp/part-0.tempstate1; No space left on device",
        )

    monkeypatch.setattr(tf.saved_model, "save", fill_disk)
    with pytest.raises(OSError) as e:
        export.export(model, config, str(tmp_path))
    assert errors.file_system_fault(e.value) == (
        f"cannot write {tmp_path}/export: No space left on device "
        "(free some space, or choose another --workdir)"
    )
    assert not (tmp_path / ".export-tmp").exists()
    assert sorted(os.listdir(tmp_path / "export")) == saved
    # Every atomic writer: text, arrays, figures.
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(fault(errno.EROFS, b)))
    for write in (
        lambda p: outputs.save_text(p, "new"),
        lambda p: outputs.save_npz(p, x=[1]),
    ):
        target = tmp_path / "out.txt"
        target.write_text("old")
        with pytest.raises(OSError):
            write(str(target))
        assert target.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_damaged_workdir_files_are_named(tmp_path, tiny_config):
    from tests.conftest import workdir_with_model
    from zf_tf.core import model as model_lib

    model = model_lib.build_model(tiny_config.model)
    workdir = workdir_with_model(tiny_config, model, tmp_path / "w")
    config_path = os.path.join(workdir, workdirs.CONFIG_FILE)
    good_config = open(config_path).read()
    open(config_path, "w").write(good_config[: len(good_config) // 2])
    for run in (
        lambda: workdirs.load_config(workdir, tiny_config),
        lambda: workdirs.prepare_for_training(tiny_config, workdir, False),
    ):
        with pytest.raises(UsageError, match=f"{config_path} is damaged .*--overwrite"):
            run()
    workdirs.prepare_for_training(tiny_config, workdir, True)  # --overwrite: afresh
    assert json.load(open(config_path)) == workdirs.config_json(tiny_config)
    assert not os.path.exists(workdirs.checkpoint_path(workdir))  # old state removed
    workdir = workdir_with_model(tiny_config, model, tmp_path / "w2")
    checkpoint = workdirs.checkpoint_path(workdir)
    data = open(checkpoint, "rb").read()
    for damaged in (data[: len(data) // 2], data[:100] + b"\0" * 100 + data[200:], b""):
        open(checkpoint, "wb").write(damaged)
        with pytest.raises(UsageError, match=f"{checkpoint} is damaged .*rerun --mode=train"):
            workdirs.load_model(workdir)


def test_malformed_tf_config(monkeypatch):
    from zf_tf.training import strategies

    for text, why in (
        ("{not json", "not JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "no 'cluster' object"),
        ('{"cluster": {"worker": "localhost:1"}, "task": {}}', "list of 'host:port'"),
        ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "chief"}}', "task.type"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "0..1"),
    ):
        monkeypatch.setenv("TF_CONFIG", text)
        with pytest.raises(UsageError, match=f"TF_CONFIG is not valid \\(.*{why}"):
            strategies.make_strategy("multi_worker")
    strategies.check_tf_config("")
    strategies.check_tf_config(
        '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", '
        '"index": 1}}'
    )


def test_unknown_split_in_deconv(tiny_config, tmp_path):
    with pytest.raises(Exception, match="unknown split 'tain': valid splits: "):
        run_analysis("deconv", tiny_config, tmp_path / "w", split="tain", untrained=True)
    assert not (tmp_path / "w").exists()


def tree(root):
    """{relative path: bytes (None for a folder)} of everything under `root`."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.mark.slow
def test_every_refusal_leaves_the_workdir_byte_identical(tiny_data_dir, tmp_path, capsys):
    """Each refusal the command line has, in a fresh workdir and, with --overwrite, in one
    holding a run: one line, the workdir byte-identical (no config.json, no lock owner
    file), and the corrected command then trains."""
    from zf_tf.pipelines import prepare, prepared

    folder = tmp_path / "photos"  # an image folder with one class: refused for training
    (folder / "only").mkdir(parents=True)
    damaged = tmp_path / "prep"  # a prepared folder whose shard went missing
    config = cli.resolved_config(cli.DEFAULT_CONFIG, tiny_args(tiny_data_dir, "x")[1:])
    prepare.prepare(config.data, str(damaged), ["train", "validation"], progress=False)
    os.remove(
        damaged / json.load(open(damaged / prepared.METADATA))["splits"]["train"]["shards"][0]
    )
    refusals = [  # (mode, extra arguments, the one line says)
        ("train", ["--config.data.bogus=1"], "unknown config key 'data.bogus'"),
        ("train", ["--config.train.epochs=x"], "not a valid int"),
        ("train", ["--config.train.momentum=1.5"], "must be in [0, 1)"),
        ("train", ["--config.model.layer1=vgg"], "choose one of zfnet, alexnet"),
        ("train", ["--config.train.lr_drop_epochs=(3,2)"], "must be increasing epochs in 1.."),
        ("train", ["--config.data.crop_size=8"], "too small for this model"),
        (
            "train",
            ["--config.train.batch_size=4096", "--config.train.steps_per_epoch=0"],
            "fewer than one batch",
        ),
        ("train", ["--config.data.source=prepared"], "needs config.data.prepared_dir"),
        (
            "train",
            ["--config.data.source=prepared", f"--config.data.prepared_dir={tmp_path}/none"],
            "holds no prepared split",
        ),
        (
            "train",
            ["--config.data.source=prepared", f"--config.data.prepared_dir={damaged}"],
            "(missing). Rewrite just those with: python main.py --mode=prepare",
        ),
        (
            "train",
            ["--config.data.source=folder", f"--config.data.folder={tmp_path}/nothing"],
            "no such folder",
        ),
        ("train", ["--config.data.source=folder", f"--config.data.folder={folder}"], "class"),
        ("eval", [], "no trained model"),
        ("deconv", ["--config.data.bogus=2"], "unknown config key"),
    ]

    class Flags:
        config, strategy, overwrite, model, weights = cli.DEFAULT_CONFIG, "default", False, "", ""

    def refused(mode, workdir, extra, says, overwrite=False):
        Flags.mode, Flags.workdir, Flags.overwrite = mode, str(workdir), overwrite
        before = tree(workdir)
        with pytest.raises(SystemExit) as e:
            cli.main(Flags, tiny_args(tiny_data_dir, workdir, *extra)[1:])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and says in err[0], (mode, extra, err)
        assert tree(workdir) == before, (mode, extra)
        assert not os.path.exists(workdirs._lock_paths(str(workdir))[1])  # no owner file

    fresh, held = tmp_path / "fresh", tmp_path / "held"
    workdirs.prepare_for_training(config, str(held), False)  # a run of the tiny config
    for mode, extra, says in refusals:
        refused(mode, fresh, extra, says)
        assert not fresh.exists()
        refused(mode, held, extra, says, overwrite=True)
    refused("train", held, ["--config.train.epochs=9"], "differs in train.epochs")
    Flags.mode, Flags.workdir, Flags.overwrite = "train", str(fresh), False  # corrected: trains
    cli.main(Flags, tiny_args(tiny_data_dir, fresh, "--config.train.epochs=1")[1:])
    assert json.loads((fresh / "eval.json").read_text())["num_images"] == 50


def test_tensorflow_op_errors_lose_their_internals(tmp_path):
    """An unreadable image is named with the cause alone, not TensorFlow's op wrapping."""
    import tensorflow as tf

    from zf_tf.analyses import deconv
    from zf_tf.core import errors

    bad = tmp_path / "x.jpg"
    bad.write_text("hello")
    for path, cause in ((bad, "Unknown image file format"), (tmp_path, "Is a directory")):
        with pytest.raises(UsageError) as e:
            deconv.load_image(str(path), 72, 64, None)
        message = str(e.value)
        assert message.startswith(f"cannot read image {path}: ") and cause in message
        assert "function_node" not in message and "[Op:" not in message, message
    with pytest.raises(tf.errors.OpError) as e:
        tf.io.decode_jpeg(b"\xff\xd8 half a jpeg")
    assert "function_node" in e.value.message  # what TensorFlow says
    assert errors.op_message(e.value) == (
        "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."
    )
