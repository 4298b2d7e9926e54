"""Shared fixtures and helpers: quiet TF, the repo on sys.path, configs, the tiny-config
factory, tiny datasets, workdirs holding a model, and the in-process analysis runner."""

import importlib
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Decode checks of test folders are remembered in a cache of the session's own."""
    old = os.environ.get("ZF_TF_CACHE_DIR")
    os.environ["ZF_TF_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["ZF_TF_CACHE_DIR"]
    else:
        os.environ["ZF_TF_CACHE_DIR"] = old


SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def load_config(name="default", *args):
    """A fresh copy of configs/<name>.py's get_config(*args)."""
    return importlib.import_module(f"zf_tf.configs.{name}").get_config(*args)


def tiny(config, data_dir, width=None, batch_size=8, **fields):
    """`config` shrunk for tests: the tiny embedded dataset, small batches and shuffle
    buffer; optionally a narrower model; `fields` are dotted overrides ("train.epochs")."""
    config.data.data_dir = data_dir
    config.data.tfds_config = "tiny"
    config.data.shuffle_buffer = 64
    config.train.batch_size = batch_size
    config.train.eval_batch_size = batch_size
    if width is not None:
        config.model.width = width
    for key, value in fields.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def workdir_with_model(config, model, path) -> str:
    """A workdir holding `config` (config.json) and `model` as its checkpoint, as a
    finished training run leaves them; returns its path."""
    from zf_tf.training import resume, workdirs

    path = str(path)
    workdirs.prepare_for_training(config, path, False)
    resume.save_model(model, workdirs.checkpoint_path(path))
    return path


def run_analysis(name, config, workdir, **request):
    """Runs analysis mode `name` in-process as the command line does (analyses.base.run):
    `request`'s Request fields (overwrite, model, weights) make the Request, the others are
    alias flags (layer=, top_k=, features=, ...) that set their config fields as on the
    command line (`helpers.with_aliases`); returns the Result."""
    import dataclasses

    from tests.helpers import with_aliases
    from zf_tf import analyses
    from zf_tf.analyses import base

    fields = {f.name for f in dataclasses.fields(base.Request)}
    config = with_aliases(config, name, **{k: v for k, v in request.items() if k not in fields})
    given = {k: v for k, v in request.items() if k in fields}
    return base.run(analyses.get(name), config, base.Request(workdir=str(workdir), **given))


# Costly module-scope fixtures (a training run, an atlas, VGG16): the tests using one run in
# one pytest-xdist worker (`make test`: --dist loadgroup), so it is made once, not per worker.
SHARED_MODULE_FIXTURES = ("trained", "mixed_run", "site", "vgg16")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The slow tests first: pytest-xdist hands tests out in this order, so the long ones
    start early and the short ones fill the gaps at the end; the tests of each costly
    module fixture in one group (handed out first: xdist orders groups by size)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        for name in SHARED_MODULE_FIXTURES:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{name}"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A tfds data dir holding the embedded dataset's 'tiny' config, generated once."""
    from zf_tf.pipelines import embedded

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    embedded.builder(data_dir, "tiny").download_and_prepare()
    return data_dir


def made_once(tmp_path_factory, name: str, make):
    """The folder `name`, filled by `make(folder)` once per session: under pytest-xdist the
    workers share the session's temp folder, and the first to take the lock makes it for
    all of them (again if a worker died half-way). Tests copy what they write into."""
    import filelock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / name, shared / f"{name}.done"
    with filelock.FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_default(tiny_data_dir, tmp_path_factory):
    """(config, workdir) of the default model (configs/default.py's ZFNet, 64 px, width
    0.25) trained on the tiny embedded dataset: 8 epochs of 50 steps of 32, no dropout,
    feature-evolution snapshots after epochs 1 and 8 (about 15 s on 2 cores; > 90% of its
    training images right). Shared: no test trains it again; tests copy the workdir before
    writing into it."""
    import keras
    import tensorflow as tf

    from zf_tf.training import train

    config = tiny(
        load_config(),
        tiny_data_dir,
        batch_size=32,
        **{
            "train.epochs": 8,
            "train.steps_per_epoch": 50,
            "train.lr_patience": 10,
            "train.callbacks": ("feature_evolution",),  # snapshots for --mode=evolution
            "analysis.evolution.epochs": (1, 8),
            "analysis.evolution.probe_images": 16,
            "analysis.evolution.features_per_layer": 2,
            "model.dropout": 0.0,
        },
    )

    def make(workdir):
        # The data order depends on TF's global seed once any test has set one: set it, so
        # that the model is the same whichever tests ran before.
        keras.utils.set_random_seed(0)
        train.train_and_evaluate(config, str(workdir), tf.distribute.get_strategy())

    return config, str(made_once(tmp_path_factory, "trained_default", make))


@pytest.fixture(scope="session")
def trained_mirrored(tiny_data_dir, tmp_path_factory):
    """(config, workdir, stdout) of `main.py --mode=train --strategy=mirrored` on 2 CPU
    replicas with the tiny training command line (tests.helpers.tiny_args: 2 epochs of 4
    steps of 16, width 0.25), validation batches of 15 (the last 15 split 8 + 7 over the
    replicas) and feature-evolution snapshots of 2 maps per layer after epochs 1 and 2 (the
    paper's epochs within the run). Shared (`made_once`): tests/test_train.py checks the
    run, tests/test_evolution.py the callback's snapshots under the strategy."""
    import json

    from tests.helpers import main_py, tiny_args
    from zf_tf import cli

    extra = (
        "--config.train.eval_batch_size=15",
        "--config.analysis.evolution.features_per_layer=2",
    )

    def make(folder):
        args = tiny_args(tiny_data_dir, folder / "w", *extra)
        proc = main_py("--mode=train", "--strategy=mirrored", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (folder / "stdout.txt").write_text(proc.stdout)
        (folder / "args.json").write_text(json.dumps(args))  # this worker's data dir

    folder = made_once(tmp_path_factory, "trained_mirrored", make)
    args = json.loads((folder / "args.json").read_text())
    config = cli.resolved_config(cli.DEFAULT_CONFIG, [a for a in args if a.startswith("--config.")])
    return config, str(folder / "w"), (folder / "stdout.txt").read_text()


@pytest.fixture
def tiny_config(tiny_data_dir):
    """The default config on the tiny embedded dataset with small batches."""
    return tiny(load_config(), tiny_data_dir)


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
