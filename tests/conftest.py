"""Shared fixtures: quiet TF, the repo on sys.path, the default config, tiny datasets."""

import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def load_config(name="default"):
    """A fresh copy of configs/<name>.py's get_config()."""
    return runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A tfds data dir holding the embedded dataset's 'tiny' config, generated once."""
    from pipelines import embedded

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    embedded.builder(data_dir, "tiny").download_and_prepare()
    return data_dir


@pytest.fixture
def tiny_config(tiny_data_dir):
    """The default config on the tiny embedded dataset with small batches."""
    config = load_config()
    config.data.data_dir = tiny_data_dir
    config.data.tfds_config = "tiny"
    config.data.shuffle_buffer = 64
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    return config


@pytest.fixture
def absl_caplog(caplog):
    """caplog that also receives absl logging at INFO, whatever verbosity earlier code set
    (absl's logger is not `logging.getLogger('absl')`, so caplog.at_level cannot reach it)."""
    import logging

    from absl import logging as absl_logging

    logger = absl_logging.get_absl_logger()
    old = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = True
    with caplog.at_level(logging.INFO):
        yield caplog
    logger.setLevel(old[0])
    logger.propagate = old[1]
