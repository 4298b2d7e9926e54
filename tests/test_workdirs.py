"""zf_tf/training/workdirs.py: analysis settings come from the command line, not the run;
another config is refused unless overwritten; checkpoints; who is the chief."""

import json
import os
import types

import pytest

from tests.conftest import load_config
from zf_tf.core.errors import UsageError
from zf_tf.training import resume, workdirs


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


def fake_state(workdir):
    """Files a training run leaves, plus one that is not training state."""
    for d in ("backup", "checkpoints", "logs", "export", "evolution"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
        (workdir / d / "f").write_text("x")
    for f in ("history.csv", "eval.json", "eval.md"):
        (workdir / f).write_text("x")
    (workdir / "occlusion.png").write_text("an analysis output")


def test_other_config_is_refused_and_overwrite_starts_afresh(tmp_path):
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
    fake_state(tmp_path)
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)  # same run: resume
    assert all((tmp_path / name).exists() for name in workdirs.TRAINING_STATE)
    other = load_config()
    other.train.learning_rate = 0.5
    other.model.width = 0.5
    with pytest.raises(UsageError) as e:
        workdirs.prepare_for_training(other, str(tmp_path), overwrite=False)
    message = str(e.value)
    assert "model.width, train.learning_rate" in message and "--overwrite" in message
    assert all((tmp_path / name).exists() for name in workdirs.TRAINING_STATE)  # untouched
    assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.01
    workdirs.prepare_for_training(other, str(tmp_path), overwrite=True)
    assert not any((tmp_path / name).exists() for name in workdirs.TRAINING_STATE)
    assert (tmp_path / "occlusion.png").exists()  # not training state: kept
    assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.5
    assert workdirs.run_differences(str(tmp_path), other) == []


def test_list_field_added_later_is_the_same_run(tmp_path):
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["model"]["remove"]  # a config.json written before model.remove existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert workdirs.run_differences(str(tmp_path), config) == []
    config.model.remove = ("fc6",)
    assert workdirs.run_differences(str(tmp_path), config) == ["model.remove"]


def test_workdir_trained_before_data_preprocessing_existed(tmp_path):
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["data"]["preprocessing"]  # it meant the paper's mean subtraction
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert workdirs.run_differences(str(tmp_path), config) == []
    assert workdirs.load_config(str(tmp_path), config).data.preprocessing == "zfnet"
    config.data.preprocessing = "tf"
    assert workdirs.run_differences(str(tmp_path), config) == ["data.preprocessing"]


def test_load_model_needs_a_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="run --mode=train first"):
        workdirs.load_model(str(tmp_path))


def test_save_model_atomic_leaves_no_temporary(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = workdirs.checkpoint_path(str(tmp_path))
    resume.save_model(model, path)
    assert sorted(os.listdir(os.path.dirname(path))) == ["model.keras"]
    loaded = workdirs.load_model(str(tmp_path))
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert (a == b).all()


def strategy_of(task_type=None, task_id=0, cluster=None):
    """A stand-in strategy whose cluster resolver names this task."""
    if task_type is None:
        return types.SimpleNamespace()
    spec = types.SimpleNamespace(as_dict=lambda: cluster)
    resolver = types.SimpleNamespace(
        task_type=task_type, task_id=task_id, cluster_spec=lambda: spec
    )
    return types.SimpleNamespace(cluster_resolver=resolver)


@pytest.mark.parametrize(
    "task_type, task_id, cluster, chief",
    [
        (None, 0, None, True),  # no cluster
        ("worker", 0, {"worker": ["a", "b"]}, True),  # worker 0 without a chief
        ("worker", 1, {"worker": ["a", "b"]}, False),
        ("chief", 0, {"chief": ["a"], "worker": ["b"]}, True),
        ("worker", 0, {"chief": ["a"], "worker": ["b"]}, False),
    ],
)
def test_is_chief(task_type, task_id, cluster, chief):
    assert workdirs.is_chief(strategy_of(task_type, task_id, cluster)) is chief


def test_upgrade_fills_in_every_field_added_later(tmp_path):
    """An old config.json, and a config file written before the fields existed, get every
    field of ADDED_FIELDS at the value that means what it did before (one function); the
    logging fields of a workdir's config come from the command line's config."""
    config = load_config()
    workdirs.prepare_for_training(config, str(tmp_path), overwrite=False)
    old = json.loads((tmp_path / "config.json").read_text())
    for section, key in workdirs.ADDED_FIELDS:
        old[section].pop(key, None)
        del config[section][key]
    (tmp_path / "config.json").write_text(json.dumps(old))
    upgraded = workdirs.upgrade(config)
    for (section, key), value in workdirs.ADDED_FIELDS.items():
        assert upgraded[section][key] == value, (section, key)
    command_line = load_config()
    command_line.train.cluster_timeout = 5.0
    loaded = workdirs.load_config(str(tmp_path), command_line)
    assert loaded.train.cluster_timeout == 5.0 and loaded.train.lr_drop_epochs == []
    assert workdirs.load_config(str(tmp_path)).data.service_address == ""
    assert workdirs.run_differences(str(tmp_path), load_config()) == []
