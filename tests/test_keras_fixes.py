"""zf_tf/training/keras_fixes.py: each Keras bug it works around still happens without its
patch (a canary: it fails, saying "remove the patch", once Keras fixes the bug), the patch
makes the reproduction pass, patches are applied only where needed and only inside the
block, and only on the tested Keras versions that pyproject.toml pins.

The reproductions are tests/keras_bugs.py: `fit`, 1 step, of a 4 -> 3 Dense model with 2
mirrored CPU replicas (a subprocess: logical devices must be set before any TF op) or as
the 2 workers of a local MultiWorkerMirroredStrategy cluster (slow)."""

import json
import os
import re
import subprocess
import sys
import tomllib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT
from tests.helpers import local_cluster
from zf_tf.training import keras_fixes

SCRIPT = os.path.join(ROOT, "tests", "keras_bugs.py")


def assert_keras_still_fails(result, bug, expected):
    """The canary: Keras without the patch still fails with `expected`."""
    if result["ok"]:
        pytest.fail(
            f"Keras {keras.__version__} fixed {keras_fixes.BUGS[bug]}: remove the patch "
            f"in {keras_fixes.PATCH_FILE}"
        )
    assert expected in result["error"], (
        f"Keras {keras.__version__} still fails without the {bug!r} patch, but differently "
        f"(re-check the patch): {result['error']}"
    )


def assert_patched_passes(result, patches):
    note = "" if keras.__version__ in keras_fixes.TESTED_KERAS else " (untested: patches off)"
    assert result["ok"], f"with {patches} on keras {keras.__version__}{note}: {result['error']}"


def run_script(*args, env=None):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


# --- Bug 1 with 2 mirrored replicas and an uneven batch (one subprocess, ~10 s) -------------


@pytest.fixture(scope="module")
def mirrored_uneven():
    out = run_script("mirrored_uneven", "none", "prebuild")
    assert out["replicas"] == 2
    return out["results"]


@pytest.mark.slow
def test_canary_uneven_replica_batches(mirrored_uneven):
    assert_keras_still_fails(
        mirrored_uneven["none"],
        "prebuild",
        "Inputs to operation AddN of type AddN must have the same size and shape",
    )


@pytest.mark.slow
def test_prebuild_fixes_uneven_replica_batches(mirrored_uneven):
    assert_patched_passes(mirrored_uneven["prebuild"], "prebuild")


# --- Bugs 1 and 2 under MultiWorkerMirroredStrategy (2 local workers, ~15 s) ---------------


@pytest.fixture(scope="module")
def multi_worker():
    """Each worker's results for no patch, prebuild alone, and both patches."""

    cluster = local_cluster()
    command = [sys.executable, SCRIPT, "multi_worker", "none", "prebuild", "prebuild,scalar_reduce"]
    procs = []
    for i in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": i}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(task))
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        record = json.loads(out.splitlines()[-1])
        assert record["replicas"] == 2
        results.append(record["results"])
    return results


@pytest.mark.slow
def test_canary_multi_worker_symbolic_build(multi_worker):
    for results in multi_worker:
        assert_keras_still_fails(
            results["none"], "prebuild", "Attempt to convert a value (PerReplica"
        )


@pytest.mark.slow
def test_canary_multi_worker_scalar_reduce(multi_worker):
    for results in multi_worker:
        assert_keras_still_fails(
            results["prebuild"],
            "scalar_reduce",
            "Invalid reduction dimension 0 for input with 0 dimensions",
        )


@pytest.mark.slow
def test_both_patches_fix_multi_worker_fit(multi_worker):
    for results in multi_worker:
        assert_patched_passes(results["prebuild,scalar_reduce"], "prebuild,scalar_reduce")


# --- In-process: where and when the patches apply -----------------------------------------


def compiled_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


EXAMPLE = (np.zeros((1, 4), np.float32), np.zeros((1,), np.int64))


def trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def test_one_replica_gets_no_patch():
    model = compiled_model()
    original = trainer_module().reduce_per_replica
    with keras_fixes.fit_workarounds(model, tf.distribute.get_strategy(), EXAMPLE):
        assert "_maybe_symbolic_build" not in vars(model)
        assert trainer_module().reduce_per_replica is original
        model.fit(*EXAMPLE, epochs=1, verbose=0)
    assert not keras_fixes.is_multi_worker(tf.distribute.get_strategy())


def test_patches_hold_only_inside_the_block():
    model = compiled_model()
    strategy = tf.distribute.get_strategy()
    original = trainer_module().reduce_per_replica
    with keras_fixes.prebuilt_from_shapes(model, strategy, EXAMPLE):
        assert model.optimizer.built and model._compile_loss.built  # built from shapes
        assert vars(model)["_maybe_symbolic_build"]() is None
    assert "_maybe_symbolic_build" not in vars(model)
    with pytest.raises(RuntimeError):
        with keras_fixes.scalar_safe_multi_worker_reduce():
            assert trainer_module().reduce_per_replica is not original
            raise RuntimeError("fit failed")
    assert trainer_module().reduce_per_replica is original


def test_untested_keras_skips_the_patches_with_a_warning(monkeypatch, absl_caplog):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    model = compiled_model()
    original = trainer_module().reduce_per_replica
    with keras_fixes.prebuilt_from_shapes(model, tf.distribute.get_strategy(), EXAMPLE):
        with keras_fixes.scalar_safe_multi_worker_reduce():
            assert "_maybe_symbolic_build" not in vars(model)
            assert trainer_module().reduce_per_replica is original
    warnings = [r.getMessage() for r in absl_caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    for bug, message in zip(("prebuild", "scalar_reduce"), warnings):
        assert keras_fixes.BUGS[bug] in message and "keras 3.99.0" in message
        assert "pyproject.toml" in message


def test_requirements_pin_a_tested_keras():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in dependencies if re.match(r"keras\s*==", d)]
    assert len(pins) == 1 and pins[0].strip() in keras_fixes.TESTED_KERAS, pins
    assert keras.__version__ in keras_fixes.TESTED_KERAS, (
        f"installed keras {keras.__version__} is not one keras_fixes was tested on "
        f"{keras_fixes.TESTED_KERAS}: make setup (requirements.lock)"
    )
