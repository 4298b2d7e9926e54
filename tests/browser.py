"""Headless Chromium for the site tests (selenium + the Debian `chromium` and
`chromium-driver` packages; `.ci/run` installs them).

`python -m tests.browser SITE_DIR OUT_DIR [LAYER [UNIT]]` saves screenshots of a layer page
of an atlas (default: the first layer) and of one of its unit pages (README's pictures).
"""

from __future__ import annotations

import os
import shutil
import sys

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def missing() -> str:
    """Why no browser can run here ('' if one can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not any(shutil.which(name) for name in CHROMIUM):
        return "no Chromium (apt-get install chromium chromium-driver)"
    if not shutil.which(DRIVER):
        return "no chromedriver (apt-get install chromium-driver)"
    return ""


def require():
    """Skips the calling test where no browser can run, but fails it under CI=true: a CI
    machine without Chromium must not pass by skipping the atlas' only browser check."""
    import pytest

    why = missing()
    if why and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but the browser test cannot run: {why}")
    if why:
        pytest.skip(why)


def start(width: int = 1280, height: int = 900):
    """A headless Chromium WebDriver that records the console (no network needed: the
    driver is the system's, never downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(n) for n in CHROMIUM if shutil.which(n))
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which(DRIVER)))


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (failed loads included)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def broken_images(driver) -> list[str]:
    """The page's images that did not decode (naturalWidth 0), and how many there are."""
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
    )


def image_count(driver) -> int:
    return driver.execute_script("return document.images.length;")


def screenshots(site: str, out: str, layer: str = "", unit: int = 0):
    """Screenshots atlas_layer.png and atlas_unit.png of the atlas `site`: a layer page
    (default: the first layer's) and one of its unit pages."""
    from selenium.webdriver.common.by import By

    driver = start()
    try:
        driver.get("file://" + os.path.abspath(os.path.join(site, "index.html")))
        if layer:
            driver.find_element(By.CSS_SELECTOR, f"td a[href$='/{layer}/index.html']").click()
        else:
            driver.find_element(By.CSS_SELECTOR, "td a[href^='layers-']").click()
        driver.save_screenshot(os.path.join(out, "atlas_layer.png"))
        driver.find_element(By.CSS_SELECTOR, f"a.unit[href='unit_{unit:04d}.html']").click()
        driver.save_screenshot(os.path.join(out, "atlas_unit.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    screenshots(*sys.argv[1:4], *(int(u) for u in sys.argv[4:5]))
