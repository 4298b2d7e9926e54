"""Feature evolution (paper Fig. 4): the training callback under MirroredStrategy, its
snapshots against the deconvnet and a brute-force maximum, and --mode=evolution's grid."""

import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_analysis
from tests.helpers import events
from zf_tf.analyses import evolution
from zf_tf.core import deconv, graph
from zf_tf.core.errors import UsageError
from zf_tf.core.model import CONV_LAYERS
from zf_tf.pipelines import examples
from zf_tf.training import callbacks, workdirs

# The snapshots come from the session's shared 2-replica mirrored run of main.py
# (conftest.trained_mirrored: 2 epochs, snapshots after epochs 1 and 2, 2 maps per layer),
# which tests/test_train.py checks as a training run.
PER_LAYER = 2


def test_snapshot_epochs_clipped_to_the_run():
    paper = (1, 2, 5, 10, 20, 30, 40, 64)
    assert callbacks.snapshot_epochs(paper, 12) == [1, 2, 5, 10, 12]
    assert callbacks.snapshot_epochs(paper, 64) == list(paper)
    assert callbacks.snapshot_epochs(paper, 70) == [*paper, 70]
    assert callbacks.snapshot_epochs((5, 1, 5), 2) == [1, 2]
    assert callbacks.snapshot_epochs((), 3) == []  # switched off
    assert callbacks.snapshot_epochs(paper, 0) == []


def test_strongest_matches_brute_force():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 4, 3, 6)).astype(np.float32)
    maps[3, 2, 1, 4] = 9.0  # a clear winner for map 4
    best = callbacks.strongest(maps, [4, 1])
    assert (best["image"][0], best["y"][0], best["x"][0]) == (3, 2, 1)
    for n, f in enumerate([4, 1]):
        i, y, x = np.unravel_index(np.argmax(maps[..., f]), maps.shape[:3])
        assert (best["image"][n], best["y"][n], best["x"][n]) == (i, y, x)
        assert best["activation"][n] == maps[..., f].max()


@pytest.mark.slow  # the shared mirrored main.py run: ~30 s
def test_callback_snapshots_under_mirrored_strategy(trained_mirrored):
    config, workdir, stdout = trained_mirrored
    assert "Strategy mirrored with 2 replica(s)" in stdout
    assert config.analysis.evolution.features_per_layer == PER_LAYER
    # epochs 1 and 2 of the paper's (1, 2, 5, ...): the run's 2 epochs
    assert sorted(os.listdir(os.path.join(workdir, "evolution"))) == [
        "epoch_001.npz",
        "epoch_002.npz",
    ]
    model = workdirs.load_model(workdir)
    probe = examples.load_examples(config, "train", config.analysis.evolution.probe_images).images
    taps = keras.Model(model.inputs[0], [model.get_layer(n).output for n in CONV_LAYERS])
    maps = dict(zip(CONV_LAYERS, (m.numpy() for m in taps(probe, training=False))))
    first = np.load(os.path.join(workdir, "evolution", "epoch_001.npz"))
    snap = np.load(os.path.join(workdir, "evolution", "epoch_002.npz"))  # the final weights
    assert int(snap["epoch"]) == 2 and list(snap["layers"]) == list(CONV_LAYERS)
    for layer in CONV_LAYERS:
        n = PER_LAYER
        features = snap[f"{layer}_features"]
        assert features.shape == (n,) and len(set(features)) == n
        np.testing.assert_array_equal(features, first[f"{layer}_features"])  # same maps
        for name in ("activation", "image", "y", "x"):
            assert snap[f"{layer}_{name}"].shape == (n,), name
        assert snap[f"{layer}_projection"].shape == (n, 64, 64, 3)
        assert snap[f"{layer}_box"].shape == (n, 4)
        # Brute force: the strongest activation of each map over the probe images.
        for j, f in enumerate(features):
            m = maps[layer][..., f]
            np.testing.assert_allclose(snap[f"{layer}_activation"][j], m.max(), rtol=1e-5)
            i, y, x = (snap[f"{layer}_{k}"][j] for k in ("image", "y", "x"))
            np.testing.assert_allclose(m[i, y, x], m.max(), rtol=1e-5)
            box = graph.receptive_field(model, layer, int(y), int(x))
            assert tuple(snap[f"{layer}_box"][j]) == box
        assert int(snap[f"{layer}_field"]) == graph.receptive_field_size(model, layer)
        if layer == "conv5":  # the projection is the deconvnet's (one layer: test time)
            expected = deconv.project(
                deconv.build_deconvnet(model, layer),
                probe,
                snap[f"{layer}_image"],
                features,
                snap[f"{layer}_y"],
                snap[f"{layer}_x"],
            )
            scale = np.abs(expected["projection"]).max()
            np.testing.assert_allclose(
                snap[f"{layer}_projection"], expected["projection"], atol=1e-5 * scale
            )
    tb = events(os.path.join(workdir, "logs", "evolution"))
    assert sorted(s for s, _ in tb["evolution/conv3"]) == [1, 2]


def test_resize_nearest_floor_mapping():
    # Output pixel i takes source pixel floor(i * side / size): 3 -> 8 px gives 3, 3, 2.
    image = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 3, 1), np.float32)
    out = evolution._resize_nearest(image, 8)
    assert out.shape == (8, 8, 1)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(evolution._resize_nearest(image, 3), image)


@pytest.mark.slow  # the shared mirrored main.py run: ~30 s
def test_mode_builds_the_grid(trained_mirrored, tmp_path, capsys):
    config, original, _ = trained_mirrored
    workdir = str(tmp_path / "w")
    shutil.copytree(original, workdir)  # the run is shared: write into a copy
    run = run_analysis("evolution", config, workdir)
    cells, labels, epochs = (run.result[k] for k in ("cells", "labels", "epochs"))
    rows = len(CONV_LAYERS) * PER_LAYER
    assert epochs == [1, 2]
    assert cells.shape == (rows, 2, 64, 64, 3)  # conv5's field covers the 64 px crop
    snaps = {e: np.load(os.path.join(workdir, "evolution", f"epoch_{e:03d}.npz")) for e in epochs}
    assert labels == [
        f"{layer} map {int(f)}" for layer in CONV_LAYERS for f in snaps[2][f"{layer}_features"]
    ]
    # Each cell, recomputed: the projection inside its receptive field, stretched on its own
    # to [0, 1], on a canvas of the field's side (7, 27, 64 px), upscaled to 64 px.
    for r, label in enumerate(labels):
        layer, j = label.split()[0], r % PER_LAYER
        for c, e in enumerate(epochs):
            y0, x0, y1, x1 = (int(b) for b in snaps[e][f"{layer}_box"][j])
            inside = snaps[e][f"{layer}_projection"][j][y0:y1, x0:x1].astype(np.float32)
            stretched = (inside - inside.min()) / max(inside.max() - inside.min(), 1e-12)
            side = min(int(snaps[e][f"{layer}_field"]), 64)
            top = side - (y1 - y0) if y0 == 0 else 0
            left = side - (x1 - x0) if x0 == 0 else 0
            canvas = np.full((side, side, 3), 0.5, np.float32)
            canvas[top : top + y1 - y0, left : left + x1 - x0] = stretched
            # Nearest upscale: canvas pixel j fills output pixels ceil(j*64/side) and on.
            starts = -(-np.arange(side + 1) * 64 // side)
            big = np.repeat(np.repeat(canvas, np.diff(starts), 0), np.diff(starts), 1)
            np.testing.assert_allclose(cells[r, c], big, atol=1e-6)
    assert printed_lines(capsys) == [
        f"Feature evolution grid: {rows} feature maps x 2 epochs",
        f"Wrote {os.path.join(workdir, 'evolution', 'evolution.png')}",
    ]
    assert run.paths == {"evolution.png": os.path.join(workdir, "evolution", "evolution.png")}
    png = np.asarray(Image.open(run.paths["evolution.png"]))
    assert png.ndim == 3 and png.shape[0] > png.shape[1] > 100  # tall: 10 rows, 2 columns
    tb = events(os.path.join(workdir, "logs", "evolution"))
    assert tb["evolution/grid"][-1][1].shape == png.shape[:2] + (3,)
    grid = tb["evolution/cells"][-1][1]
    pad = callbacks.CELL_PAD
    assert grid.shape == (rows * (64 + pad) - pad, 2 * (64 + pad) - pad, 3)
    np.testing.assert_array_equal(grid[:64, :64], (cells[0, 0] * 255).astype(np.uint8))
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("evolution", config, workdir)


def printed_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line]


def test_no_snapshot_of_a_diverged_epoch(tmp_path, tiny_config):
    callback = callbacks.FeatureEvolution(str(tmp_path), tiny_config)
    assert callback.epochs == [1, 2, 5, 10, 12]  # the paper's list, clipped to 12 epochs
    callback.on_epoch_end(0, {"loss": float("nan")})  # returns before touching a model
    assert not (tmp_path / "evolution").exists()


def test_mode_without_snapshots_says_to_train(tmp_path, tiny_config):
    with pytest.raises(UsageError, match="train a new run with this version first"):
        run_analysis("evolution", tiny_config, tmp_path)
    assert not (tmp_path / "evolution").exists()
