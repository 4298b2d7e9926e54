"""--mode=deconv end to end: panels, index JSON, TensorBoard, --image, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.images import encode, random_rgb, write
from tests.test_cli import error_lines, main_py
from tests.test_train import events
from zf_tf import outputs
from zf_tf.analyses import deconv as visualize
from zf_tf.core.errors import UsageError


def deconv_args(data_dir, workdir, *extra):
    return [
        "--mode=deconv",
        "--untrained",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.tfds_config=tiny",
        "--config.train.eval_batch_size=16",
        *extra,
    ]


def test_top_k_panels_index_and_tensorboard(tiny_data_dir, tmp_path):
    workdir = tmp_path / "w"
    proc = main_py(*deconv_args(tiny_data_dir, workdir, "--layer=conv2", "--num_features=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = workdir / "deconv" / "conv2" / "top9_validation.png"
    index = json.loads((workdir / "deconv" / "conv2" / "top9_validation.json").read_text())
    assert Image.open(png).size[0] > 200
    assert index["num_images"] == 50 and len(index["features"]) == 3
    winners = index["winners"]
    assert len(winners) == 3 * 9
    for f in index["features"]:
        ranks = [w for w in winners if w["feature"] == f]
        assert [w["rank"] for w in ranks] == list(range(9))
        values = [w["activation"] for w in ranks]
        assert values == sorted(values, reverse=True)
        assert len({w["image"] for w in ranks}) == 9  # one entry per image
    assert any(tag.startswith("deconv/conv2/") for tag in events(workdir / "logs" / "deconv"))
    # Same command again: refused, nothing replaced.
    stamp = png.stat().st_mtime_ns
    again = main_py(*deconv_args(tiny_data_dir, workdir, "--layer=conv2", "--num_features=3"))
    assert again.returncode == 1 and "--overwrite" in error_lines(again)[-1]
    assert png.stat().st_mtime_ns == stamp


def test_single_image_of_any_size(tiny_data_dir, tmp_path):
    photo = write(str(tmp_path / "photo.jpg"), encode(random_rgb(150, 230), "JPEG", mode="L"))
    workdir = tmp_path / "w"
    proc = main_py(
        *deconv_args(
            tiny_data_dir, workdir, "--layer=conv5", f"--image={photo}", "--num_features=4"
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((workdir / "deconv" / "conv5" / "image_photo.json").read_text())
    acts = [r["activation"] for r in out["strongest"]]
    assert len(acts) == 4 and acts == sorted(acts, reverse=True)
    assert (workdir / "deconv" / "conv5" / "image_photo.png").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--layer=fc6"], "conv1|conv2|conv3|conv4|conv5"),
        (["--image=/nonexistent/photo.jpg"], "cannot read image /nonexistent/photo.jpg"),
    ],
)
def test_bad_input_is_one_line(tiny_data_dir, tmp_path, extra, expected):
    proc = main_py(*deconv_args(tiny_data_dir, tmp_path / "w", *extra))
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], lines


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = main_py("--mode=deconv", f"--workdir={tmp_path}/empty")
    assert proc.returncode == 1
    assert "run --mode=train first" in error_lines(proc)[-1]


def test_field_patch_keeps_geometry():
    image = np.arange(10 * 10, dtype=np.float32).reshape(10, 10, 1)
    inside = outputs.field_patch(image, (2, 3, 6, 7), 4)
    np.testing.assert_array_equal(inside, image[2:6, 3:7])
    top_left = outputs.field_patch(image, (0, 0, 2, 3), 4, fill=-1)
    np.testing.assert_array_equal(top_left[2:, 1:], image[:2, :3])
    assert (top_left[:2] == -1).all() and (top_left[:, :1] == -1).all()


def test_select_features():
    assert visualize.select_features(10, "3,1", 16, 0) == [3, 1]
    assert visualize.select_features(10, "", 0, 0) == list(range(10))
    chosen = visualize.select_features(100, "", 5, 0)
    assert len(chosen) == 5 and chosen == visualize.select_features(100, "", 5, 0)
    with pytest.raises(UsageError, match="0..9"):
        visualize.select_features(10, "12", 16, 0)
