"""main.py: one-line usage errors with the valid choices, and the resolved config."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def main_py(*args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def error_lines(proc):
    """stderr lines that are not TF/absl logging (e.g. 'I1127 00:22:46.4 ...')."""
    log = re.compile(r"^([IWEF]\d{4} |WARNING: All log)")
    return [line for line in proc.stderr.splitlines() if line and not log.match(line)]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--mode=bogus"], "train"),
        (["--strategy=bogus"], "default|mirrored|multi_worker|tpu"),
        (["--config.data.bogus=1"], "unknown config key 'data.bogus'"),
        (
            ["--config.nope.x=1"],
            "valid keys of the config: ablate, analysis, data, model, seed, train, transfer",
        ),
        (["--config=configs/missing.py"], "configs/missing.py"),
        (["stray"], "unexpected arguments: stray"),
    ],
)
def test_usage_errors_are_one_line(args, expected, tmp_path):
    proc = main_py(*args, f"--workdir={tmp_path}/w")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing written on bad input


def test_unknown_data_source_is_one_line(tmp_path):
    proc = main_py("--mode=summary", "--config.data.source=web", f"--workdir={tmp_path}")
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and "embedded, tfds, folder" in lines[0], lines


def test_summary_resolves_config_overrides(tiny_data_dir, tmp_path):
    workdir = tmp_path / "w"
    proc = main_py(
        "--mode=summary",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.data.tfds_config=tiny",
        "--config.data.crop_size=56",
        "--config.train.batch_size=4",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # crop_size and the model's input size are one field reference.
    assert summary["batch"] == [4, 56, 56, 3] and summary["model_input_size"] == 56
