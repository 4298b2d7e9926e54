"""--mode=atlas: the site's files, the cache (adding a layer scans only it; a killed run
resumes), the refusals, and the pages in headless Chromium."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests import browser
from tests.conftest import load_config, run_analysis, tiny, workdir_with_model
from zf_tf.core import deconv, topk
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError

WIDTH = 0.125  # conv1 12 maps, conv2 32, conv3 48


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
    for layer, units in summary["layers"].items():
        folder = os.path.join(atlas, "layers", layer)
        pages = sorted(f for f in os.listdir(folder) if f.startswith("unit_"))
        assert pages == [f"unit_{u:04d}.html" for u in range(units)]
        images = os.listdir(os.path.join(folder, "img"))
        assert len(images) == 2 * 4 * units  # k projections and k patches per unit
        side = min(deconv.receptive_field_size(model, layer), 64)
        with Image.open(os.path.join(folder, "img", "0000_p0.png")) as im:
            assert im.size == (side, side)
    cache = os.path.join(atlas, "cache")
    files = sum(len(f) for root, _, f in os.walk(atlas) if not root.startswith(cache))
    assert summary["files"] == files  # index, css, atlas.json, pages, images
    # The winners are the multi-layer scan's, and the pages show them.
    from pipelines import inputs

    best = topk.scan_layers(
        model, ["conv2"], inputs.build_inputs(config, "validation", mode="center"), k=4
    )["conv2"]
    page = open(os.path.join(atlas, "layers", "conv2", "unit_0005.html")).read()
    for r in range(4):
        assert f'<td class="num">{int(best.image[r, 5])}</td>' in page
    assert 'href="unit_0004.html"' in page and 'href="unit_0006.html"' in page
    assert "Classes of its top 4 images" in page


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


@pytest.mark.skipif(bool(browser.missing()), reason=browser.missing() or "browser present")
def test_pages_in_headless_chromium(site, tmp_path):
    from selenium.webdriver.common.by import By

    _, workdir, _ = site
    index = "file://" + os.path.join(workdir, "atlas", "index.html")
    driver = browser.start()
    try:
        driver.get(index)
        seen = []
        for link in ("td a[href^='layers/']", "a.unit"):  # index -> layer page -> unit page
            assert browser.console_errors(driver) == []
            assert browser.broken_images(driver) == []
            seen.append((driver.title, browser.image_count(driver)))
            driver.find_element(By.CSS_SELECTOR, link).click()
        assert browser.console_errors(driver) == []
        assert browser.broken_images(driver) == []
        seen.append((driver.title, browser.image_count(driver)))
        assert seen == [("Atlas", 0), ("conv1 · atlas", 12), ("conv1 unit 0 · atlas", 8)]
        assert driver.current_url.endswith("/atlas/layers/conv1/unit_0000.html")
        driver.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
        assert driver.current_url.endswith("/unit_0001.html") and not browser.broken_images(driver)
        shot = tmp_path / "unit.png"
        driver.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.size[0] > 0 and np.asarray(im).std() > 0
    finally:
        driver.quit()
