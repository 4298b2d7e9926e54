"""--mode=correspondence (Table 1): Delta by hand, parts JSON and its errors, box mapping to
crop pixels, the embedded default parts, and the mode end to end on a tiny workdir."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_analysis, workdir_with_model
from tests.helpers import error_lines, events, main_py, with_aliases
from tests.images import encode, random_rgb, write
from tests.tiny_models import named_convnet, saved_bn_net
from zf_tf.analyses import base, correspondence, sources
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError, examples


def small_model(config):
    config.model.width = 0.125
    keras.utils.set_random_seed(0)
    return model_lib.build_model(config.model)


def test_delta_of_three_hand_made_sign_vectors():
    signs = np.array([[1, 0, -1, 1], [1, 1, -1, 0], [-1, 0, -1, 1]], np.int8)
    # H(0,1) = 2, H(0,2) = 1, H(1,2) = 3 differing positions out of 4.
    pairs = correspondence.pair_hamming(signs)
    np.testing.assert_array_equal(pairs, [0.5, 0.25, 0.5, 0.75, 0.25, 0.75])
    mean, std = correspondence.delta(signs)
    assert mean == pytest.approx(0.5)  # = Delta / (N (N-1) D) = 12 / (3 * 2 * 4)
    assert std == pytest.approx(np.sqrt(4 * 0.25**2 / 6))


def test_pair_hamming_equals_the_pairwise_loop():
    # The broadcast computation against the double loop it replaced, on many positions.
    sign = np.random.default_rng(0).integers(-1, 2, (5, 1000)).astype(np.int8)
    loop = [np.mean(sign[i] != sign[j]) for i in range(5) for j in range(5) if i != j]
    got = correspondence.pair_hamming(sign)
    assert got.dtype == np.float64 and got.shape == (20,)
    np.testing.assert_array_equal(got, loop)


def test_signs_are_three_valued_and_ignore_rounding():
    eps = np.array([[2.0, -1e-9, 0.0, -3.0], [1e-4, 5e-6, -2e-5, 0.0]])
    np.testing.assert_array_equal(
        correspondence.signs(eps, [1.0, 1.0]), [[1, 0, 0, -1], [1, 0, -1, 0]]
    )


def test_pixel_box_to_crop_by_hand():
    # 144 x 200: center square x from 28, scale 72/144 = 0.5, center crop offset 4.
    to_crop = examples.pixel_box_to_crop
    np.testing.assert_array_equal(to_crop([40, 60, 80, 100], 144, 200, 72, 64), [16, 12, 36, 32])
    # Fractional edges round outwards; the box is clipped to the crop.
    np.testing.assert_array_equal(to_crop([41, 61, 81, 101], 144, 200, 72, 64), [16, 12, 37, 33])
    np.testing.assert_array_equal(to_crop([0, 0, 144, 40], 144, 200, 72, 64), [0, 0, 64, 2])
    # Tall image: the offset is vertical.
    np.testing.assert_array_equal(to_crop([60, 40, 100, 80], 200, 144, 72, 64), [12, 16, 32, 36])


@pytest.mark.parametrize("shape", [(144, 200), (200, 144), (90, 90)])
def test_mapped_box_covers_the_part_in_the_loaded_crop(tiny_config, tmp_path, shape):
    h, w = shape
    box = [h // 4 + 1, w // 3, h // 2 + 3, w // 3 + 40]
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[box[0] : box[2], box[1] : box[3]] = 255
    path = write(str(tmp_path / "part.png"), encode(pixels, "PNG"))
    crop, size = correspondence.load_photo(path, tiny_config)
    assert crop.shape == (64, 64, 3) and size == shape
    bright = (crop + np.asarray(tiny_config.data.mean)).mean(axis=-1) > 127.5
    y0, x0, y1, x1 = examples.pixel_box_to_crop(box, h, w, 72, 64)
    assert bright[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].all()  # inside, off the blurred edge
    outside = np.ones_like(bright)
    outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
    assert not bright[outside].any()
    assert bright.sum() > 0.8 * (y1 - y0) * (x1 - x0)


def test_quarter_boxes_are_equal_and_inside():
    quarters = correspondence.quarter_boxes([10, 20, 31, 45])
    np.testing.assert_array_equal(
        quarters, [[10, 20, 20, 32], [10, 33, 20, 45], [21, 20, 31, 32], [21, 33, 31, 45]]
    )


def test_embedded_parts_and_random_regions(tiny_config):
    subjects = correspondence.embedded_subjects(tiny_config, "validation", 3, label=0)
    n = 3
    # The first images whose object is not clipped by the crop border, in split order.
    ex = examples.load_examples(tiny_config, "validation", 24, label=0)
    inside = [i for i, b in zip(ex.indices, ex.boxes) if min(b[:2]) > 0 and max(b[2:]) < 64]
    clipped = [i for i in ex.indices if i not in inside]
    assert 1 <= len(inside) < 3 <= len(ex)  # the tiny split has both kinds, and too few inside
    expected = sorted((inside + clipped)[:3])
    assert subjects.names == [f"validation #{i} (circle)" for i in expected]
    rows = [list(ex.indices).index(i) for i in expected]
    np.testing.assert_array_equal(subjects.images, ex.images[rows])
    np.testing.assert_array_equal(subjects.regions, ex.boxes[rows])
    assert subjects.parts == correspondence.QUARTERS and subjects.boxes.shape == (n, 4, 4)
    for boxes, obj in zip(subjects.boxes, subjects.regions):
        assert (boxes[:, :2] >= obj[:2]).all() and (boxes[:, 2:] <= obj[2:]).all()
        sizes = boxes[:, 2:] - boxes[:, :2]
        assert (sizes == sizes[0]).all() and (sizes > 0).all()
    random = correspondence.random_boxes(subjects, 6, seed=0, crop_size=64)
    assert random.shape == (6, n, 4)
    np.testing.assert_array_equal(
        random[..., 2:] - random[..., :2],
        np.broadcast_to(subjects.boxes[:, 0, 2:] - subjects.boxes[:, 0, :2], (6, n, 2)),
    )
    assert (random >= 0).all() and (random <= 64).all()
    centers = (random[..., :2] + random[..., 2:]) // 2
    assert len({tuple(c) for c in centers.reshape(-1, 2)}) > n  # draws differ
    np.testing.assert_array_equal(random, correspondence.random_boxes(subjects, 6, 0, 64))


def write_parts(tmp_path, parts, images=((120, 160), (100, 100))):
    for k, (h, w) in enumerate(images):
        write(str(tmp_path / f"img{k}.png"), encode(random_rgb(h, w, k), "PNG"))
    path = tmp_path / "parts.json"
    path.write_text(parts if isinstance(parts, str) else json.dumps(parts))
    return str(path)


GOOD = {
    "img0.png": {"eye": [10, 50, 30, 70], "nose": [40, 60, 70, 90]},
    "img1.png": {"nose": [50, 40, 70, 60], "eye": [20, 20, 35, 45]},
}


def test_json_subjects_read_relative_paths_and_map_boxes(tiny_config, tmp_path):
    path = write_parts(tmp_path, GOOD)
    subjects = correspondence.json_subjects(tiny_config, path)
    assert subjects.names == ["img0.png", "img1.png"] and subjects.parts == ("eye", "nose")
    expected = examples.pixel_box_to_crop(GOOD["img1.png"]["eye"], 100, 100, 72, 64)
    np.testing.assert_array_equal(subjects.boxes[1, 0], expected)
    np.testing.assert_array_equal(
        subjects.regions[0], [*subjects.boxes[0, :, :2].min(0), *subjects.boxes[0, :, 2:].max(0)]
    )
    crop, _ = correspondence.load_photo(str(tmp_path / "img0.png"), tiny_config)
    np.testing.assert_array_equal(subjects.images[0], crop)


@pytest.mark.parametrize(
    "parts, expected",
    [
        ("{not json", "is not valid JSON"),
        ([1, 2], "expected {image_path"),
        ({"img0.png": GOOD["img0.png"]}, "at least 2"),
        ({**GOOD, "img1.png": {"eye": [20, 20, 35, 45]}}, "image img1.png has no part 'nose'"),
        (
            {**GOOD, "img1.png": {**GOOD["img1.png"], "ear": [1, 1, 5, 5]}},
            "image img0.png has no part 'ear'",
        ),
        ({**GOOD, "img1.png": {"eye": [20, 20, 10, 45], "nose": [1, 1, 2, 2]}}, "y0 < y1"),
        ({**GOOD, "img1.png": {"eye": [20, 20, 35], "nose": [1, 1, 2, 2]}}, "[y0, x0, y1, x1]"),
        (
            {**GOOD, "img1.png": {"eye": [20, 20, 35, 101], "nose": [1, 1, 2, 2]}},
            "lies outside the 100x100 image",
        ),
        ({**GOOD, "missing.png": GOOD["img0.png"]}, "cannot read image"),
    ],
)
def test_bad_parts_files_are_one_line_errors(tiny_config, tmp_path, parts, expected):
    path = write_parts(tmp_path, parts)
    with pytest.raises(UsageError) as error:
        correspondence.json_subjects(tiny_config, path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def request(**fields):
    return base.Request(workdir="/nowhere", **fields)


def test_settings_refuse_bad_requests_before_anything_loads(tiny_config, tmp_path):
    with pytest.raises(UsageError, match="cannot read --parts file"):
        correspondence.load_parts(str(tmp_path / "nope.json"))
    with pytest.raises(UsageError, match="cannot read --parts file"):
        correspondence.settings(
            with_aliases(tiny_config, "correspondence", parts=str(tmp_path / "nope.json")),
            request(),
        )
    with pytest.raises(UsageError, match="--num_images=1: correspondence compares pairs"):
        correspondence.settings(
            with_aliases(tiny_config, "correspondence", num_images=1), request()
        )
    with pytest.raises(DataError, match="valid splits"):
        correspondence.settings(
            with_aliases(tiny_config, "correspondence", split="nope"), request()
        )
    tiny_config.analysis.correspondence.label = 10
    with pytest.raises(UsageError, match="label=10 is not a class: choose 0..9"):
        correspondence.settings(tiny_config, request())
    tiny_config.data.source = "folder"
    with pytest.raises(UsageError, match="needs --parts=FILE.json"):
        correspondence.settings(tiny_config, request())


def test_measure_matches_a_direct_computation(tiny_config):
    model = small_model(tiny_config)
    images = np.random.default_rng(0).normal(0, 60, (3, 64, 64, 3)).astype(np.float32)
    boxes = np.array([[[8, 8, 24, 24], [30, 30, 50, 50]]] * 3, np.int32)
    subjects = correspondence.Subjects(
        images, ["a", "b", "c"], ("p", "q"), boxes, np.array([[8, 8, 50, 50]] * 3, np.int32)
    )
    random = correspondence.random_boxes(subjects, 2, 0, 64)
    result = correspondence.measure(model, subjects, random, ("conv5", "fc7"), batch_size=4)
    for layer in ("conv5", "fc7"):
        tap = keras.Model(model.input, model.get_layer(layer).output)

        def feats(x, tap=tap):
            return np.asarray(tap(x[None]), np.float64).ravel()

        def eps(i, box):
            return feats(images[i]) - feats(correspondence.occlude(images[i], [box])[0])

        scale = [np.abs(feats(x)).max() for x in images]
        for p, part in enumerate(subjects.parts):
            e = np.stack([eps(i, boxes[i, p]) for i in range(3)])
            expected = correspondence.pair_hamming(correspondence.signs(e, scale))
            np.testing.assert_allclose(
                result[layer]["parts"][part],
                expected,
            )
        per_draw = [
            correspondence.pair_hamming(
                correspondence.signs(np.stack([eps(i, random[d, i]) for i in range(3)]), scale)
            ).mean()
            for d in range(2)
        ]
        np.testing.assert_allclose(
            result[layer]["random"],
            per_draw,
        )
    summary = correspondence.summarize(result)
    assert summary["fc7"]["p"][0] == pytest.approx(result["fc7"]["parts"]["p"].mean())
    assert summary["fc7"]["random"][1] == pytest.approx(result["fc7"]["random"].std())


def test_bad_layer_is_a_usage_error(tiny_config):
    with pytest.raises(UsageError) as error:
        correspondence.check_layers(small_model(tiny_config), ("conv5", "conv9"))
    assert str(error.value) == (
        "config.analysis.correspondence.layers: no layer 'conv9'; valid layers: conv1_pad, "
        "conv1, pool1, norm1, conv2, pool2, norm2, conv3, conv4, conv5, pool5, fc6, fc7"
    )


def test_mode_end_to_end_on_embedded_and_refuses_to_overwrite(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.analysis.correspondence.random_draws = 3
    model = small_model(config)
    workdir = workdir_with_model(config, model, tmp_path / "w")
    capsys.readouterr()
    paths = run_analysis("correspondence", config, workdir, num_images=3).paths
    assert list(paths) == list(correspondence.OUTPUTS)
    # An independent run of the pieces: the same images, seeded regions and distances.
    subjects = correspondence.embedded_subjects(config, "validation", 3, label=0)
    random = correspondence.random_boxes(subjects, 3, config.seed, 64)
    ref = correspondence.measure(model, subjects, random, ("conv5", "fc7"))
    record = json.loads(open(paths["correspondence.json"]).read())
    assert record["images"] == subjects.names and record["layers"] == ["conv5", "fc7"]
    assert record["parts"] == list(correspondence.QUARTERS)
    assert record["boxes"] == subjects.boxes.tolist()
    assert record["random_boxes"] == random.tolist()
    for layer in ("conv5", "fc7"):
        for part in correspondence.QUARTERS:
            values = np.asarray(record["pair_hamming"][layer][part])
            assert values.shape == (3 * 2,)  # ordered pairs of 3 images
            np.testing.assert_allclose(values, ref[layer]["parts"][part], atol=1e-12)
            cell = record["summary"][layer][part]
            assert (cell["mean"], cell["std"]) == pytest.approx((values.mean(), values.std()))
        draws = np.asarray(record["random_per_draw"][layer])
        np.testing.assert_allclose(draws, ref[layer]["random"], atol=1e-12)
        cell = record["summary"][layer]["random"]
        assert (cell["mean"], cell["std"]) == pytest.approx((draws.mean(), draws.std()))
    table = open(paths["correspondence.md"]).read()
    assert table.startswith(
        "# Correspondence (paper Table 1): 3 images, parts top_left, top_right, bottom_left, "
        "bottom_right\n\n"
    )
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == [*correspondence.QUARTERS, "random"]
    summary = record["summary"]
    expected_row = " | ".join(
        f"{summary[layer]['top_left']['mean']:.4f} ± {summary[layer]['top_left']['std']:.4f}"
        for layer in ("conv5", "fc7")
    )
    assert rows[1] == f"| top_left | {expected_row} |"
    # What is printed: the table, then the files.
    printed = capsys.readouterr().out
    assert printed.endswith(f"{table}\nWrote {', '.join(paths.values())}\n")
    assert Image.open(paths["correspondence.png"]).size[0] > 300
    assert "correspondence/parts" in events(f"{workdir}/logs/correspondence")
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis("correspondence", config, workdir, num_images=3)


@pytest.mark.slow
def test_parts_file_end_to_end_and_its_errors_through_main_py(tiny_config, tmp_path):
    config = tiny_config
    config.analysis.correspondence.random_draws = 2
    workdir = workdir_with_model(config, small_model(config), tmp_path / "w")
    path = write_parts(tmp_path, GOOD)
    out = run_analysis("correspondence", config, workdir, parts=path)
    record = json.loads(open(out.paths["correspondence.json"]).read())
    assert record["images"] == ["img0.png", "img1.png"] and record["parts"] == ["eye", "nose"]
    subjects = correspondence.json_subjects(config, path)
    assert record["boxes"] == subjects.boxes.tolist()
    # Two images: the pairs (0, 1) and (1, 0), the same distance.
    nose = record["pair_hamming"]["conv5"]["nose"]
    assert len(nose) == 2 and nose[0] == nose[1]
    bad = write_parts(tmp_path, {**GOOD, "img1.png": {"eye": [20, 20, 35, 45]}})
    proc = main_py("--mode=correspondence", f"--workdir={workdir}", f"--parts={bad}", "--overwrite")
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1 and "no part 'nose'" in lines[0], lines


# ---------------------------------------------------------------------------------------------
# Any model: layers 5 and 7 follow the model; unlabeled images are refused
# ---------------------------------------------------------------------------------------------


def test_resolve_picks_the_models_own_layers(tiny_config):
    s = correspondence.settings(tiny_config, request())
    assert s.layers == ("", "")
    model = named_convnet()
    brought = sources.Source(model=model, config=tiny_config, own_labels=False)
    assert correspondence.resolve(s, model, brought).layers == ("b", "h")
    named = dataclasses.replace(s, layers=("gap", ""))
    assert correspondence.resolve(named, model, brought).layers == ("gap", "h")
    with pytest.raises(UsageError) as error:
        correspondence.resolve(dataclasses.replace(s, layers=("conv5", "fc7")), model, brought)
    assert str(error.value) == (
        "config.analysis.correspondence.layers: no layer 'conv5'; valid layers: a, p, b, gap, h"
    )
    own = sources.Source(model=None, config=tiny_config)
    assert correspondence.resolve(s, small_model(tiny_config), own).layers == ("conv5", "fc7")


def test_unlabeled_images_are_refused_without_parts(tiny_config, tmp_path):
    for k in range(2):
        write(str(tmp_path / f"img{k}.png"), encode(random_rgb(40, 40, k), "PNG"))
    tiny_config.data.source, tiny_config.data.folder = "folder", str(tmp_path)
    with pytest.raises(UsageError) as error:
        correspondence.settings(tiny_config, request())
    message = str(error.value)
    assert "compares images of one class" in message and "holds unlabeled images" in message
    assert "--parts=FILE.json" in message and "\n" not in message


def test_mode_on_a_model_brought_along(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.analysis.correspondence.random_draws = 2
    path = saved_bn_net(tmp_path)
    out = run_analysis("correspondence", config, tmp_path / "w", model=path, num_images=3).paths
    assert list(out) == list(correspondence.OUTPUTS)
    record = json.loads(open(out["correspondence.json"]).read())
    assert record["layers"] == ["c2", "gap"] and len(record["images"]) == 3
    assert list(record["summary"]) == ["c2", "gap"]
    assert open(out["correspondence.md"]).read().startswith("# Correspondence")
    with Image.open(out["correspondence.png"]) as png:
        assert png.size[0] > 300
