"""The command line: one-line usage errors with the valid choices, config loading and
overrides, and the resolved config. In-process, except where main.py's own process (absl
parsing, exit status, stderr) is the point."""

import json
import os

import pytest

from tests.helpers import error_lines, main_py
from zf_tf import cli, configs
from zf_tf.analyses import base as analyses_base
from zf_tf.analyses.base import Request
from zf_tf.configs import default
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, inputs, prepare
from zf_tf.training import train, workdirs


@pytest.mark.parametrize(
    "args, expected",
    [
        # absl's own parse of a known flag
        pytest.param(["--mode=bogus"], "train", marks=pytest.mark.slow),
        # the config override, resolved by cli after absl
        (["--config.data.bogus=1"], "unknown config key 'data.bogus'"),
    ],
)
def test_main_py_usage_errors_are_one_line(args, expected, tmp_path):
    proc = main_py(*args, f"--workdir={tmp_path}/w")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing written on bad input


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.data.bogus=1"], "unknown config key 'data.bogus': valid keys of data: "),
        (
            ["--config.nope.x=1"],
            "valid keys of the config: ablate, analysis, data, model, prepare, seed, train, "
            "transfer",
        ),
        (["--config.train.epochs=abc"], "--config.train.epochs=abc: not a valid int"),
        (["--config.data=1"], "--config.data is a section"),
        (["--config.train.epochs"], "--config.train.epochs needs a value"),
        (["--bogus=1"], "unknown flag --bogus=1"),
        (["stray"], "unexpected arguments: stray"),
    ],
)
def test_override_errors_name_the_valid_choices(args, expected):
    with pytest.raises(UsageError) as e:
        cli.resolved_config(cli.DEFAULT_CONFIG, args)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_errors():
    with pytest.raises(UsageError, match="configs/missing.py"):
        cli.resolved_config("configs/missing.py", [])
    with pytest.raises(UsageError, match="unknown ablation variant 'bogus': valid variants: "):
        cli.resolved_config("configs/ablations.py:bogus", [])


def test_overrides_parse_by_field_type():
    config = cli.resolved_config(
        cli.DEFAULT_CONFIG,
        [
            "--config.train.epochs=3",
            "--config.train.learning_rate",  # the value as the next argument
            "0.5",
            "--config.data.cache=false",
            "--config.data.source=folder",
            "--config.analysis.invariance.rotations=(0,45,90)",
            "--config.analysis.attribution.methods=('saliency','gradcam')",
            "--config.ablate.variants=baseline,no_fc7",
            "--config.data.classes=1,3",
            "--config.data.crop_size=56",
        ],
    )
    assert config.train.epochs == 3 and config.train.learning_rate == 0.5
    assert config.data.cache is False and config.data.source == "folder"
    assert tuple(config.analysis.invariance.rotations) == (0, 45, 90)
    assert tuple(config.analysis.attribution.methods) == ("saliency", "gradcam")
    assert config.ablate.variants == "baseline,no_fc7"
    assert tuple(config.data.classes) == (1, 3)
    # crop_size and the model's input size are one field reference.
    assert config.model.input_size == 56
    with pytest.raises(AttributeError):  # locked: no new keys after resolving
        config.data.new_key = 1


def test_unknown_mode_and_data_source(tmp_path):
    config = cli.resolved_config(cli.DEFAULT_CONFIG, [])
    with pytest.raises(UsageError, match="valid modes: train, eval"):
        cli.run("bogus", config, Request(workdir=str(tmp_path)))
    config = cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.data.source=web"])
    with pytest.raises(DataError, match="choose one of embedded, tfds, folder"):
        cli.run("summary", config, Request(workdir=str(tmp_path)))
    config = cli.resolved_config(cli.DEFAULT_CONFIG, ["--config.train.callbacks=('bogus',)"])
    with pytest.raises(UsageError, match="image_summaries, feature_evolution"):
        cli.run("summary", config, Request(workdir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "check, section, field, value, error, message",
    [
        (
            inputs.check_config,
            "data",
            "source",
            "web",
            DataError,
            "config.data.source='web' is not valid: choose one of embedded, tfds, folder, prepared",
        ),
        (
            inputs.check_config,
            "data",
            "min_crop_area",
            0.0,
            DataError,
            "config.data.min_crop_area=0.0 is not valid: it must be in (0, 1]",
        ),
        (
            model_lib.check_config,
            "model",
            "layer1",
            "vgg",
            UsageError,
            "config.model.layer1='vgg' is not valid: choose one of zfnet, alexnet",
        ),
        (
            model_lib.check_config,
            "model",
            "dropout",
            1.0,
            UsageError,
            "config.model.dropout=1.0 is not valid: it must be in [0, 1)",
        ),
        (
            train.check_config,
            "train",
            "momentum",
            2.0,
            UsageError,
            "config.train.momentum=2.0 is not valid: it must be in [0, 1)",
        ),
        (
            train.check_config,
            "train",
            "callbacks",
            ("bogus",),
            UsageError,
            "config.train.callbacks entry 'bogus' is not valid: choose from image_summaries, "
            "feature_evolution",
        ),
        (
            prepare.check_config,
            "prepare",
            "encoding",
            "gif",
            DataError,
            "config.prepare.encoding='gif' is not valid: choose one of jpeg, raw",
        ),
        (
            prepare.check_config,
            "prepare",
            "shard_size",
            0,
            DataError,
            "config.prepare.shard_size=0 is not valid: it must be >= 1",
        ),
        (
            analyses_base.check_config,
            "analysis",
            "batch_size",
            0,
            UsageError,
            "config.analysis.batch_size=0 is not valid: it must be >= 1",
        ),
    ],
)
def test_each_module_checks_its_own_section(check, section, field, value, error, message):
    """validate_config's parts: each owning module's check_config passes the default
    section and refuses one bad field in one line."""
    config = default.get_config()
    check(config[section])
    config[section][field] = value
    with pytest.raises(error) as e:
        check(config[section])
    assert str(e.value) == message


def test_sections_and_fields_a_config_file_lacks_are_filled_in_before_the_checks():
    """A config file written before a section or field existed is completed by
    `workdirs.upgrade` (at configs/default.py's values), then passes the checks."""
    config = default.get_config()
    del config["prepare"]
    del config.analysis["featvis"]
    del config.analysis.deconv["top_k"]
    workdirs.upgrade(config)
    cli.validate_config(config)
    assert config.prepare.encoding == "jpeg" and config.analysis.featvis.steps == 256
    assert config.analysis.deconv.top_k == 9
    ranges = (("size", ">= 1", lambda v: v >= 1),)
    assert configs.out_of_range({}, "s", ranges) is None
    assert configs.out_of_range({"size": 0}, "s", ranges) == (
        "config.s.size=0 is not valid: it must be >= 1"
    )


def test_main_turns_library_errors_into_one_line(capsys, tmp_path, tiny_data_dir):
    class Flags:  # absl's flags; the aliases (layer) default to None: not given
        config, mode, strategy = cli.DEFAULT_CONFIG, "train", "default"
        workdir, overwrite, model, weights, layer = str(tmp_path), False, "", "", None

    with pytest.raises(SystemExit) as e:
        cli.main(Flags, ["--config.model.layer1=vgg"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config.model.layer1='vgg' is not valid: choose one of zfnet, alexnet"]
    # Bad model sources and layers of a model brought along: one line, nothing written.
    Flags.mode = "deconv"
    for model, weights, layer, expected in (
        ("vgg17", "", "", "--model=vgg17: no such file, and not a keras.applications name"),
        ("vgg16", str(tmp_path / "none.h5"), "", f"--weights={tmp_path}/none.h5: no such file"),
        ("", str(tmp_path / "w.h5"), "", "--weights needs --model"),
        ("vgg16", "", "fc7", "--layer='fc7' is not valid: choose one of block1_conv1, "),
    ):
        Flags.model, Flags.weights, Flags.layer = model, weights, layer
        with pytest.raises(SystemExit):
            cli.main(
                Flags,
                [
                    "--config.data.crop_size=32",
                    "--config.data.resize_size=36",
                    f"--config.data.data_dir={tiny_data_dir}",  # prepared: no tfds progress
                    "--config.data.tfds_config=tiny",
                ],
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert os.listdir(tmp_path) == []


def test_summary_resolves_config_overrides(tiny_data_dir, tmp_path, capsys):
    config = cli.resolved_config(
        cli.DEFAULT_CONFIG,
        [
            f"--config.data.data_dir={tiny_data_dir}",
            "--config.data.tfds_config=tiny",
            "--config.data.crop_size=56",
            "--config.train.batch_size=4",
        ],
    )
    cli.run("summary", config, Request(workdir=str(tmp_path / "w")))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["batch"] == [4, 56, 56, 3] and summary["model_input_size"] == 56
    assert not os.path.exists(tmp_path / "w")
