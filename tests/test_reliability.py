"""Hostile input refused before anything is written: numbers out of range, a crop too small
for the topology, batches that do not split over the replicas, --top_k beyond the split;
one writer per workdir (the lock), in-process and across processes."""

import os
import subprocess
import sys
import types

import pytest

from tests.conftest import ROOT, load_config, run_analysis
from zf_tf import cli
from zf_tf.analyses.base import Request
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.training import workdirs


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
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
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
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
            timeout=300,
        )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {workdir} is in use by PID {os.getpid()} ({' '.join(sys.argv)}): wait for it "
        "to finish, or use another --workdir"
    ]
    assert "Traceback" not in proc.stderr
