"""The workdir: its resolved config, checkpoints, and who may write it.

Layout:
  config.json               resolved config of the run (written by train)
  checkpoints/model.keras   last good model (full Keras model, finite loss only)
  backup/                   training state of the last epochs, to resume after a kill
                            (zf_tf/training/resume.py)
  history.csv, logs/        per-epoch metrics; TensorBoard scalars and images
  eval.json, eval.md        10-crop / center-crop evaluation (Table 2 form)
  export/                   SavedModel for serving
  evolution/                feature-evolution snapshots epoch_XXX.npz (Fig. 4), written
                            during training; --mode=evolution adds evolution.png
  transfer/                 --mode=transfer: cache/<key>.npz features of target images,
                            <target>/<layer>.{json,md,png} results (Tables 4-6, Fig. 9)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys

import filelock
import keras
import ml_collections

from zf_tf import outputs
from zf_tf.configs import default as default_config
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import folder as folder_lib
from zf_tf.pipelines import preprocess, service
from zf_tf.training import strategies

CONFIG_FILE = "config.json"
# Config sections that do not change what training produces: analysis modes take them
# from the command line (--config and overrides), not from the workdir's config.json.
COMMAND_LINE_SECTIONS = ("analysis", "ablate", "transfer", "prepare")
# Fields that do not change the trained weights either (what is logged during training,
# where the input pipeline runs, how long to wait for other processes).
LOGGING_FIELDS = (
    ("train", "callbacks"),
    ("data", "service_address"),
    ("data", "service_timeout"),
    ("train", "cluster_timeout"),
)
# Fields added after some workdirs were trained (or some config files written), and what a
# config without them means: `upgrade` fills them in, so the code reads every field directly.
ADDED_FIELDS = {
    ("data", "preprocessing"): preprocess.DEFAULT_PREPROCESSING,
    ("model", "arch"): "zfnet",
    ("data", "random_labels_seed"): -1,
    ("data", "prepared_dir"): "",
    ("train", "precision"): "float32",
    ("train", "jit_compile"): False,
    ("data", "augment"): "ten_crop",
    ("data", "min_crop_area"): 0.25,
    ("train", "weight_decay"): 0.0,
    ("train", "label_smoothing"): 0.0,
    ("train", "warmup_epochs"): 0.0,
    ("model", "conv1_init_stddev"): 0.0,
    ("train", "lr_drop_epochs"): (),
    ("model", "remove"): (),
    ("data", "classes"): (),
    ("train", "callbacks"): ("image_summaries", "feature_evolution"),  # callbacks.OPTIONAL
    ("data", "service_address"): "",
    ("data", "service_timeout"): service.DEFAULT_TIMEOUT,
    ("train", "cluster_timeout"): strategies.CLUSTER_TIMEOUT,
}
TRAINING_STATE = (
    "backup",
    "checkpoints",
    "logs",
    "history.csv",
    "eval.json",
    "eval.md",
    "export",
    "evolution",
)


def _lock_paths(workdir: str) -> tuple[str, str]:
    """(lock file, owner file) of a workdir: outside it, so that taking the lock (which
    some refusals follow) writes nothing into the workdir; in this user's zf_tf cache
    (`folder.cache_dir`: the same for every job of the user, whatever its $TMPDIR, and
    across machines where the home folder is shared), keyed by the workdir's real path."""
    key = hashlib.sha1(os.path.realpath(workdir).encode()).hexdigest()[:16]
    folder = os.path.join(folder_lib.cache_dir(), "locks")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}.lock")
    return path, path + ".owner"


@contextlib.contextmanager
def lock(workdir: str):
    """Holds `workdir`'s writer lock for the block: one writing run per workdir at a time.

    The operating system releases it when the holder dies (SIGKILL included); the holder's
    PID and command are kept beside it for the message of a refused second writer. Works
    between the processes of a user on one machine, and across machines that share the
    user's home folder and the workdir under the same path.

    Raises:
      UsageError: another process holds it.
    """
    path, owner_path = _lock_paths(workdir)
    held = filelock.FileLock(path, timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        try:
            with open(owner_path) as f:
                owner = json.load(f)
            who = f"PID {owner['pid']} ({owner['command']})"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise UsageError(
            f"{workdir} is in use by {who}: wait for it to finish, or use another --workdir"
        ) from None
    try:
        owner = {"pid": os.getpid(), "command": " ".join(sys.argv)}
        outputs.save_text(owner_path, json.dumps(owner), suffix=f".{os.getpid()}")
        yield
    finally:
        try:
            os.remove(owner_path)
        except OSError:
            pass
        held.release()


def check_writable(workdir: str):
    """Raises UsageError, before anything is written, when `workdir` cannot be a writable
    folder: it (or a folder above it) is a file, or the nearest existing folder is on a
    read-only file system or not writable by this user."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir={workdir} is a file, not a folder: choose another --workdir")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--workdir={workdir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        cause = "Read-only file system" if read_only else "Permission denied"
        raise UsageError(f"cannot write {existing}: {cause} (choose a --workdir you can write)")


def checkpoint_path(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints", "model.keras")


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def upgrade(config):
    """`config` (a config.json's dict, or a ConfigDict from a config file) with every field
    of ADDED_FIELDS that it lacks, at the value that means what it meant before the field
    existed, and (a ConfigDict) every field of the COMMAND_LINE_SECTIONS that it lacks at
    configs/default.py's value; in place, returned. The one place where old configs are
    made current: the code reads every field directly."""
    for (section, key), value in ADDED_FIELDS.items():
        if section in config and key not in config[section]:
            config[section][key] = value
    if isinstance(config, ml_collections.ConfigDict):
        defaults = default_config.get_config()
        with config.unlocked():
            for section in COMMAND_LINE_SECTIONS:
                _fill(config, section, defaults)
    return config


def _fill(config, key, defaults):
    """config[key] completed from defaults[key], recursively (a section a config lacks is
    added whole)."""
    if key not in config:
        config[key] = copy.deepcopy(defaults[key])
    elif hasattr(config[key], "keys") and hasattr(defaults[key], "keys"):
        for inner in defaults[key].keys():
            _fill(config[key], inner, defaults[key])


def _run_identity(config: dict) -> dict:
    """The fields of a config (upgraded) that decide the trained weights."""
    config = json.loads(json.dumps(upgrade(copy.deepcopy(config))))  # tuples as lists
    out = {k: v for k, v in config.items() if k not in COMMAND_LINE_SECTIONS}
    for section, key in LOGGING_FIELDS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys in which two nested dicts differ."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k) and not (a.get(k, []) == [] == b.get(k, [])):
            # A list field added later with an empty default (model.remove) is the same
            # run as a config.json written before it existed.
            out.append(f"{prefix}{k}")
    return out


def _read_json(path: str) -> dict:
    """A workdir's JSON file; a damaged one (truncated, not JSON) is one UsageError line."""
    try:
        with open(path) as f:
            value = json.load(f)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path} is damaged ({e}): restore it, or start afresh with --mode=train --overwrite"
        ) from None


def run_differences(workdir: str, config) -> list[str]:
    """Dotted config keys in which `workdir`'s run (config.json) differs from `config`,
    ignoring the COMMAND_LINE_SECTIONS; [] if the workdir holds no run yet."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return []
    old = _read_json(path)
    return differences(_run_identity(old), _run_identity(config_json(config)))


def check_run(config, workdir: str, overwrite: bool) -> None:
    """Refuses, before anything is written, a workdir holding a run of another config
    (or a damaged config.json) unless `overwrite`.

    Raises:
      UsageError: naming the differing keys (the first five) and what to do.
    """
    if overwrite or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return
    diff = run_differences(workdir, config)
    if diff:
        raise UsageError(
            f"{workdir} holds a run with a different config (differs in "
            f"{', '.join(diff[:5])}{'...' if len(diff) > 5 else ''}); "
            "use another --workdir, or --overwrite to start afresh"
        )


def prepare_for_training(config, workdir: str, overwrite: bool):
    """Writes the resolved config; refuses a workdir trained with another config
    (`check_run`).

    With `overwrite`, the previous run's state (backup, checkpoints, logs, eval, export)
    is removed so that training starts afresh.

    Raises:
      UsageError: the workdir holds a run of a different config and not `overwrite`.
    """
    check_run(config, workdir, overwrite)
    path = os.path.join(workdir, CONFIG_FILE)
    new = config_json(config)
    if os.path.exists(path):
        try:
            old = _read_json(path)
        except UsageError:
            old = {}  # damaged: with --overwrite, a run of another config
        if differences(_run_identity(old), _run_identity(new)):
            for name in TRAINING_STATE:
                p = os.path.join(workdir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    os.makedirs(workdir, exist_ok=True)
    outputs.save_text(path, json.dumps(new, indent=2, sort_keys=True))


def load_config(workdir: str, fallback=None):
    """The config a workdir was trained with (upgraded), or `fallback` if it has none.

    The COMMAND_LINE_SECTIONS (analysis settings) and the LOGGING_FIELDS always come from
    `fallback`, the command line's config, so they can be changed without retraining (their
    defaults without one).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return fallback
    config = _run_identity(_read_json(path))
    if fallback is not None:
        given = config_json(fallback)
        for section in COMMAND_LINE_SECTIONS:
            if section in given:
                config[section] = given[section]
        for section, key in LOGGING_FIELDS:
            if key in given.get(section, {}):
                config[section][key] = given[section][key]
    return ml_collections.ConfigDict(upgrade(config))


def damage(path: str) -> str | None:
    """Why a .keras file is damaged (truncated, bad CRC, not a zip archive), or None. Reads
    the file's archive, not the model (no layers are built)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return str(e) or type(e).__name__
    if bad is not None:
        return f"member {bad} fails its CRC check"
    if "config.json" not in names:
        return "no config.json in the archive"
    return None


def load_model(workdir: str, compile: bool = False, float32: bool = True) -> keras.Model:
    """The last good model of a workdir.

    Args:
      workdir: the run's folder.
      compile: restore the compiled state (optimizer, loss) too; the model is then returned
        with the dtype policies it was trained with, whatever `float32`.
      float32: return a model trained with mixed precision (`config.train.precision`) as
        its float32 copy (`model_lib.as_float32`): analyses, evaluation and export then
        compute activations, projections and probabilities in full precision. False: the
        model as trained.

    Raises:
      UsageError: no checkpoint there, or a damaged one.
    """
    path = checkpoint_path(workdir)
    if not os.path.exists(path):
        raise UsageError(f"no trained model in {workdir} ({path} missing): run --mode=train first")

    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception:  # noqa: BLE001 - a damaged archive can fail anywhere; say so if it is
        why = damage(path)  # read only when loading failed: no second read of a good file
        if why is None:
            raise
        raise UsageError(
            f"{path} is damaged ({why}): rerun --mode=train with this --workdir to rewrite it "
            "from the backup, or start afresh with --overwrite"
        ) from None
    return model_lib.as_float32(model) if float32 and not compile else model
