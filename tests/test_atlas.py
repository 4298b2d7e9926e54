"""--mode=atlas: the site's files, the cache (adding a layer scans only it; a killed run
resumes), the refusals, and the pages in headless Chromium."""

import copy
import glob
import json
import os
import re
import shutil
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from tests import browser
from tests.conftest import ROOT, load_config, run_analysis, tiny, workdir_with_model
from tests.helpers import run_workers, with_aliases
from zf_tf.analyses import atlas, atlas_site
from zf_tf.core import deconv, graph, topk
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError

WIDTH = 0.125  # conv1 12 maps, conv2 32, conv3 48
SETTINGS = dict(
    layers=(),
    split="validation",
    top_k=4,
    num_images=50,
    pixels=None,
    crop_size=64,
    resize_size=72,
    cache_dir="",
    data={},
)


@pytest.fixture(scope="module")
def site(tiny_data_dir, tmp_path_factory):
    """(config, workdir, model) with an atlas of conv1 and conv2 (k=4)."""
    config = tiny(load_config(), tiny_data_dir, width=WIDTH, batch_size=16)
    model = model_lib.build_model(config.model)
    workdir = workdir_with_model(config, model, tmp_path_factory.mktemp("atlas") / "w")
    run_analysis("atlas", config, workdir, layers="conv1,conv2", top_k=4)
    return config, workdir, model


def test_site_files_and_winners(site):
    config, workdir, model = site
    atlas = os.path.join(workdir, "atlas")
    summary = json.load(open(os.path.join(atlas, "atlas.json")))
    assert summary["layers"] == {"conv1": 12, "conv2": 32} and summary["units"] == 44
    assert summary["k"] == 4 and summary["num_images"] == 50
    assert [r["layer"] for r in summary["way_down"]["conv2"]] == ["conv1", "conv2"]
    index = open(os.path.join(atlas, "index.html"), encoding="utf-8").read()
    assert "relu \u00d7 2: ReLU of the signal (the paper&#x27;s rule)" in index
    for layer, units in summary["layers"].items():
        folder = os.path.join(atlas_site.pages_folder(atlas), layer)
        pages = sorted(f for f in os.listdir(folder) if f.startswith("unit_"))
        assert pages == [f"unit_{u:04d}.html" for u in range(units)]
        images = os.listdir(os.path.join(folder, "img"))
        assert len(images) == 2 * 4 * units  # k projections and k patches per unit
        side = min(graph.receptive_field_size(model, layer), 64)
        with Image.open(os.path.join(folder, "img", "0000_p0.png")) as im:
            assert im.size == (side, side)
    cache = os.path.join(atlas, "cache")
    files = sum(len(f) for root, _, f in os.walk(atlas) if not root.startswith(cache))
    assert summary["files"] == files  # index, css, atlas.json, pages, images
    # The winners are the multi-layer scan's, and the pages show them.
    from zf_tf.pipelines import inputs

    best = topk.scan_layers(
        model, ["conv2"], inputs.build_inputs(config, "validation", mode="center"), k=4
    )["conv2"]
    page = open(os.path.join(atlas_site.pages_folder(atlas), "conv2", "unit_0005.html")).read()
    for r in range(4):
        assert f'<td class="num">{int(best.image[r, 5])}</td>' in page
    assert 'href="unit_0004.html"' in page and 'href="unit_0006.html"' in page
    assert "Classes of its top 4 images" in page


@pytest.mark.slow
def test_adding_a_layer_scans_only_it_and_a_killed_run_resumes(site, monkeypatch, tmp_path):
    config, original, _ = site
    workdir = str(tmp_path / "w")
    shutil.copytree(original, workdir)
    scanned, projected = [], []
    real_scan, real_project = topk.scan_layers, deconv.project
    monkeypatch.setattr(
        topk,
        "scan_layers",
        lambda m, layers, *a, **kw: scanned.append(list(layers)) or real_scan(m, layers, *a, **kw),
    )
    monkeypatch.setattr(
        deconv,
        "project",
        lambda dn, images, index, *a, **kw: (
            projected.append(len(index)) or real_project(dn, images, index, *a, **kw)
        ),
    )
    with pytest.raises(UsageError, match="index.html exists; pass --overwrite"):
        run_analysis("atlas", config, workdir, layers="conv1,conv2,conv3", top_k=4)
    result = run_analysis(
        "atlas", config, workdir, layers="conv1,conv2,conv3", top_k=4, overwrite=True
    )
    assert scanned == [["conv3"]] and sum(projected) == 48 * 4
    assert result.report.summary["units"] == 92
    # conv3's canvas (its 64 px crop: more than atlas_site.EXACT) is JPEG, at its own size.
    pages = atlas_site.pages_folder(os.path.join(workdir, "atlas"))
    img = os.path.join(pages, "conv3", "img")
    assert sorted(os.listdir(img))[:2] == ["0000_p0.jpg", "0000_p1.jpg"]
    with Image.open(os.path.join(img, "0000_x0.jpg")) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    layer_page = open(os.path.join(pages, "conv3", "index.html")).read()
    assert 'src="img/0047_p0.jpg"' in layer_page
    # A kill after the scan and some projections: no index.html, a chunk missing.
    cache = os.path.join(workdir, "atlas", "cache", "conv3")
    os.remove(os.path.join(workdir, "atlas", "index.html"))
    os.remove(os.path.join(cache, "units_00016.npz"))
    scanned.clear(), projected.clear()
    run_analysis("atlas", config, workdir, layers="conv1,conv2,conv3", top_k=4)
    assert scanned == [] and sum(projected) == 16 * 4
    # Another k is another scan (the cache key holds it).
    scanned.clear()
    run_analysis("atlas", config, workdir, layers="conv1", top_k=3, overwrite=True)
    assert scanned == [["conv1"]]


def whole_site(atlas_dir: str) -> str:
    """The page folder index.html links to, after checking that every link and image of
    the index and of each layer page resolves to a file."""
    index = open(os.path.join(atlas_dir, "index.html")).read()
    links = re.findall(r'(?:href|src)="([^"#]+)"', index)
    folders = {link.split("/")[0] for link in links if link.startswith("layers")}
    assert len(folders) == 1, folders
    for link in links:
        assert os.path.exists(os.path.join(atlas_dir, link)), link
    for page in glob.glob(os.path.join(atlas_dir, folders.pop(), "*", "index.html")):
        for link in re.findall(r'(?:href|src)="([^"#]+)"', open(page).read()):
            assert os.path.exists(os.path.join(os.path.dirname(page), link)), (page, link)
    return re.search(r'href="(layers-\d+)/', index).group(1)


def test_a_killed_render_leaves_the_old_site_or_the_new_one(site, tmp_path, monkeypatch):
    config, original, _ = site
    workdir = tmp_path / "w"
    shutil.copytree(original, workdir)
    atlas_dir = str(workdir / "atlas")
    old = whole_site(atlas_dir)
    replace = os.replace
    for kill_at in (1, 2, 3):  # the new pages, index.html, atlas.json moved into place
        calls = []

        def killed(src, dst, kill_at=kill_at, calls=calls):
            if ".site-tmp" in str(src):
                calls.append(src)
                if len(calls) == kill_at:
                    raise KeyboardInterrupt
            return replace(src, dst)

        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            run_analysis("atlas", config, workdir, layers="conv1,conv2", top_k=4, overwrite=True)
        monkeypatch.undo()
        now = whole_site(atlas_dir)
        assert now == old if kill_at <= 2 else now != old, (kill_at, old, now)
        old = now
    run_analysis("atlas", config, workdir, layers="conv1,conv2", top_k=4, overwrite=True)
    assert atlas_site.pages_folders(atlas_dir) == [whole_site(atlas_dir)]  # the old ones gone


@pytest.mark.parametrize("density", [1, 2])
def test_images_exact_when_small_and_shrunk_jpeg_when_large(tmp_path, density):
    s = atlas.Settings(**{**SETTINGS, "pixel_density": density})
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (atlas_site.EXACT, atlas_site.EXACT, 3), np.uint8)
    atlas_site._save(str(tmp_path / "small.png"), small, atlas_site.CELL, s)
    with Image.open(tmp_path / "small.png") as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), small)
    assert atlas_site._ext(atlas_site.EXACT) == "png" and atlas_site._ext(49) == "jpg"
    large = np.full((224, 224, 3), 200, np.uint8)
    for shown in (atlas_site.CELL, atlas_site.THUMB):
        atlas_site._save(str(tmp_path / "large.jpg"), large, shown, s)
        with Image.open(tmp_path / "large.jpg") as im:
            assert im.format == "JPEG" and im.size == (shown * density,) * 2
            assert np.abs(np.asarray(im).astype(int) - 200).max() <= 2
    # A layer page reuses the strongest projection while it is small enough to be one.
    assert atlas_site._thumbnail(3, 64 * density, s) == "0003_p0.jpg"
    assert atlas_site._thumbnail(3, 64 * density + 1, s) == "0003_t.jpg"
    assert atlas_site._thumbnail(3, 7, s) == "0003_p0.png"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("pixel_density", 0, "pixel_density=0: give 1, 2, 3 or 4"),
        ("pixel_density", 5, "pixel_density=5: give 1, 2, 3 or 4"),
        ("jpeg_quality", 100, "jpeg_quality=100: give an integer from 1 to 95"),
    ],
)
def test_bad_image_settings(tiny_data_dir, tmp_path, field, value, message):
    config = tiny(load_config(), tiny_data_dir, width=WIDTH)
    config.analysis.atlas[field] = value
    from zf_tf.analyses import base

    with pytest.raises(UsageError, match=message):
        atlas.settings(config, base.Request(workdir=str(tmp_path)))


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"layers": "conv9"}, "'conv9' is not a layer of the model: choose from conv1, "),
        ({"layers": "fc6"}, "'fc6' has no deconvnet inverse"),
        ({"layers": "conv1,,conv2"}, "has an empty entry"),
        ({"top_k": 51}, "--top_k=51 exceeds the 50 images of split 'validation'"),
        ({"top_k": 4}, "index.html exists; pass --overwrite"),
    ],
)
def test_bad_input_writes_nothing(site, request_, message):
    config, workdir, _ = site
    before = sorted(os.walk(os.path.join(workdir, "atlas")))
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        run_analysis("atlas", config, workdir, **request_)
    assert sorted(os.walk(os.path.join(workdir, "atlas"))) == before


def test_the_model_is_loaded_in_the_strategys_scope(site, tmp_path, monkeypatch):
    """Under --strategy=mirrored the atlas' model holds mirrored variables (one copy per
    replica), as the distributed scan needs: it is loaded inside strategy.scope()."""
    import tensorflow as tf

    from zf_tf import analyses
    from zf_tf.analyses import base

    config, original, _ = site
    workdir = tmp_path / "w"
    shutil.copytree(original, workdir, ignore=shutil.ignore_patterns("atlas"))
    seen = []

    def scan_layers(model, *a, **k):
        seen.append(model)
        raise KeyboardInterrupt  # enough: the model is what this test looks at

    monkeypatch.setattr(topk, "scan_layers", scan_layers)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    config = with_aliases(config, "atlas", layers="conv1", top_k=2)
    request = base.Request(workdir=str(workdir))
    with pytest.raises(KeyboardInterrupt):
        base.run(analyses.get("atlas"), config, request, strategy)
    assert all(isinstance(w.value, tf.distribute.DistributedValues) for w in seen[0].weights)


@pytest.mark.slow
def test_two_workers_make_the_atlas_one_device_makes(site, tmp_path):
    """--mode=atlas --strategy=multi_worker as 2 local processes: each reads and scans its
    share of the split, the chief writes the atlas, whose scan equals the single-device
    one."""

    _, original, _ = site
    workdir = tmp_path / "w"
    shutil.copytree(original, workdir, ignore=shutil.ignore_patterns("atlas"))
    command = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--mode=atlas",
        "--strategy=multi_worker",
        f"--workdir={workdir}",
        "--layers=conv1,conv2",
        "--top_k=4",
    ]
    outs = run_workers(tmp_path, command, timeout=300)
    for returncode, _, err in outs:
        assert returncode == 0, err[-3000:]
    assert "Wrote" in outs[0][1] and "Scanned as a non-chief worker" in outs[1][1]
    for _, _, err in outs:  # each worker reads and scans its own 25 of the 50 images
        assert re.search(r"scan 2 layer\(s\) on validation: 100%\S* 25/25 ", err), err[-2000:]
    scans = lambda w, layer: np.load(os.path.join(w, "atlas", "cache", layer, "scan.npz"))
    for layer in ("conv1", "conv2"):
        one, two = scans(original, layer), scans(workdir, layer)
        for name in ("image", "y", "x"):
            np.testing.assert_array_equal(two[name], one[name], err_msg=f"{layer} {name}")
        np.testing.assert_allclose(two["activation"], one["activation"], rtol=1e-6)
    summary = json.load(open(os.path.join(workdir, "atlas", "atlas.json")))
    assert summary["units"] == 44 and summary["files"] > 2 * 4 * 44


def test_a_missing_browser_fails_the_browser_test_under_ci(monkeypatch):
    monkeypatch.setattr(browser, "missing", lambda: "no Chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but .*: no Chromium"):
        browser.require()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        browser.require()


@pytest.fixture(scope="module")
def featvis_site(tiny_data_dir, tmp_path_factory):
    """(config, workdir) with an atlas of conv1 (k=2) holding each unit's feature
    visualizations (8 steps): maximized, negative, and a diverse pair."""
    config = tiny(load_config(), tiny_data_dir, width=WIDTH, batch_size=16)
    config.analysis.atlas.featvis = True
    config.analysis.featvis.steps = 8
    config.analysis.featvis.color_images = 16
    config.analysis.featvis.negative = True
    config.analysis.featvis.diversity = 2
    keras.utils.set_random_seed(1)
    model = model_lib.build_model(config.model)
    workdir = workdir_with_model(config, model, tmp_path_factory.mktemp("fv") / "w")
    run_analysis("atlas", config, workdir, layers="conv1", top_k=2)
    return config, workdir


@pytest.mark.slow  # an atlas with 12 optimized images
def test_the_atlas_shows_each_units_feature_visualization(featvis_site):
    """Unit pages show the unit's optimized image (and the objective reached), with
    featvis.negative its most inhibiting pattern, with featvis.diversity=2 a diverse pair;
    layer pages a switch between projections and feature visualizations; the images are
    --mode=featvis' for every unit (the same cache: the mode then computes nothing)."""
    config, workdir = featvis_site
    folder = os.path.join(atlas_site.pages_folder(os.path.join(workdir, "atlas")), "conv1")
    images = os.listdir(os.path.join(folder, "img"))
    # 64 px images: JPEG (canvases above atlas_site.EXACT), at their own size
    for suffix in ("f", "fn", "fd0", "fd1"):
        names = sorted(f for f in images if f"_{suffix}." in f)
        assert names == [f"{u:04d}_{suffix}.jpg" for u in range(12)], suffix
    unit = open(os.path.join(folder, "unit_0003.html"), encoding="utf-8").read()
    assert '<img src="img/0003_f.jpg" alt="unit 3 feature visualization (maximized)">' in unit
    assert "optimized image: the unit's map mean" in unit
    assert '<img src="img/0003_fn.jpg"' in unit and "the pattern that most inhibits it" in unit
    assert '<img src="img/0003_fd1.jpg"' in unit and "a diverse set of 2: map means" in unit
    layer = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    assert 'id="show-f"' in layer and layer.count('class="f"') == 12
    cache = os.path.join(workdir, "featvis", "cache")
    stamps = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    assert len(stamps) == 3  # one batch of 12 units per kind
    config = copy.deepcopy(config)
    config.analysis.featvis.negative = False
    config.analysis.featvis.diversity = 1
    mode = run_analysis("featvis", config, workdir, layer="conv1", num_features=0).result
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == stamps
    with Image.open(os.path.join(folder, "img", "0003_f.jpg")) as im:
        shown = np.asarray(im).astype(np.float32)
    assert shown.shape == (64, 64, 3)
    assert np.abs(shown - mode["image"][3]).mean() < 6  # JPEG quality 90


def test_pages_in_headless_chromium(site, tmp_path):
    browser.require()
    from selenium.webdriver.common.by import By

    _, workdir, _ = site
    index = "file://" + os.path.join(workdir, "atlas", "index.html")
    driver = browser.start()
    try:
        driver.get(index)
        seen = []
        for link in ("td a[href^='layers-']", "a.unit"):  # index -> layer page -> unit page
            assert browser.console_errors(driver) == []
            assert browser.broken_images(driver) == []
            seen.append((driver.title, browser.image_count(driver)))
            driver.find_element(By.CSS_SELECTOR, link).click()
        assert browser.console_errors(driver) == []
        assert browser.broken_images(driver) == []
        seen.append((driver.title, browser.image_count(driver)))
        assert seen == [("Atlas", 0), ("conv1 · atlas", 12), ("conv1 unit 0 · atlas", 8)]
        assert re.search(r"/atlas/layers-\d+/conv1/unit_0000.html$", driver.current_url)
        driver.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
        assert driver.current_url.endswith("/unit_0001.html") and not browser.broken_images(driver)
        shot = tmp_path / "unit.png"
        driver.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.size[0] > 0 and np.asarray(im).std() > 0
    finally:
        driver.quit()


@pytest.mark.slow  # an atlas with 12 optimized images
def test_the_feature_visualization_switch_in_headless_chromium(featvis_site):
    """On a layer page the projections show until the switch is clicked, then the
    feature visualizations (every image decoded); the unit page shows its own."""
    browser.require()
    from selenium.webdriver.common.by import By

    _, workdir = featvis_site
    folder = atlas_site.pages_folder(os.path.join(workdir, "atlas"))
    driver = browser.start()
    try:
        driver.get("file://" + os.path.join(folder, "conv1", "index.html"))
        assert browser.console_errors(driver) == [] and browser.broken_images(driver) == []
        shown = lambda kind: [  # noqa: E731
            i.is_displayed() for i in driver.find_elements(By.CSS_SELECTOR, f"a.unit img.{kind}")
        ]
        assert shown("p") == [True] * 12 and shown("f") == [False] * 12
        driver.find_element(By.CSS_SELECTOR, "label[for=show-f]").click()
        assert shown("p") == [False] * 12 and shown("f") == [True] * 12
        driver.find_element(By.CSS_SELECTOR, "a.unit").click()
        assert browser.broken_images(driver) == []
        pictures = driver.find_elements(By.CSS_SELECTOR, ".featvis img")
        assert len(pictures) == 4  # maximized, negative, a diverse pair
        for picture in pictures:
            assert picture.is_displayed() and picture.get_attribute("naturalWidth") == "64"
    finally:
        driver.quit()
