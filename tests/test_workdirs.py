"""zf_tf/workdirs.py: analysis settings come from the command line, not the run."""

import json

import pytest

from tests.conftest import load_config
from zf_tf.core.errors import UsageError
from zf_tf.training import workdirs


def test_analysis_section_comes_from_the_command_line(tmp_path):
    trained = load_config()
    trained.train.epochs = 3
    workdirs.prepare_for_training(trained, str(tmp_path), overwrite=False)
    command_line = load_config()
    command_line.analysis.occlusion.num_images = 2
    config = workdirs.load_config(str(tmp_path), command_line)
    assert config.train.epochs == 3  # the run's
    assert config.analysis.occlusion.num_images == 2  # the command line's


def test_analysis_changes_do_not_make_another_run(tmp_path):
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
    config.analysis.occlusion.size = 0.5
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)  # no error
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["analysis"]["occlusion"]["size"] == 0.5
    config.train.epochs = 1
    with pytest.raises(UsageError, match="train.epochs"):
        workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
