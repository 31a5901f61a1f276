"""`columnformer report`: the embedding of a 65,536-column sheet, a self-contained page, and a browser test.

The browser test needs headless Chromium + chromedriver (Debian `chromium`, `chromium-driver`) and
the `selenium` client: `scripts/install_browser.sh` installs them. Without them the test skips,
unless CI is set (CI=true), where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from columnformer.analysis.analyze import analyze_run
from columnformer.analysis.layout import sheet_layout
from columnformer.analysis.report import build_report, explorer_html, explorer_payload
from columnformer.geometry import grid, sphere

from test_analysis_e2e import QUICK, tiny_run

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _decode(spec: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(spec["b64"]))
    size = spec["itemsize"]
    planes = np.frombuffer(raw, np.uint8).reshape(size, -1).T.copy()
    return planes.view(np.dtype(spec["dtype"]).newbyteorder("<")).reshape(spec["shape"])


def _synthetic_local_edges(h: int, w: int, steps: int, m: int, seed: int = 0):
    """Top-m incoming edges of an h x w sheet with local wiring (sources within +-4 rows/cols)."""
    rng = np.random.default_rng(seed)
    n = h * w
    rows, cols = np.divmod(np.arange(n), w)
    dy = rng.integers(-4, 5, size=(steps, n, m))
    dx = rng.integers(-4, 5, size=(steps, n, m))
    src = np.clip(rows[None, :, None] + dy, 0, h - 1) * w + np.clip(cols[None, :, None] + dx, 0, w - 1)
    weight = np.sort(rng.exponential(size=(steps, n, m)), axis=-1)[..., ::-1]
    weight = (weight / weight.sum(-1, keepdims=True) * rng.uniform(0.3, 1.0, (steps, n, 1))).astype(np.float32)
    src[:, ::97, -1] = -1  # some columns with fewer real edges than m
    weight[:, ::97, -1] = 0.0
    return src, weight


def test_explorer_embedding_of_a_65536_column_sheet():
    h = w = 256
    steps, m = 4, 16
    src, weight = _synthetic_local_edges(h, w, steps, m)
    dprime = np.random.default_rng(1).standard_normal((10, h * w)).astype(np.float32)
    wiring = np.random.default_rng(2).random((steps, h * w)).astype(np.float32)
    layout = sheet_layout(grid(h, w))
    t0 = time.perf_counter()
    payload = explorer_payload(layout, src, weight, dprime, wiring)
    page = explorer_html(payload)
    size_mb = len(page.encode()) / 1e6
    print(f"\nexplorer for a 65,536-column sheet ({steps} steps, top {m}): {size_mb:.1f} MB in {time.perf_counter() - t0:.1f} s")
    assert payload["n"] == 65536 and payload["m"] == m and payload["steps"] == steps
    assert size_mb < 30, f"explorer section is {size_mb:.1f} MB"
    # the embedded arrays decode back to what went in (weights as float16)
    off = _decode(payload["arrays"]["src_offset"])
    back = np.where(off == np.iinfo(np.int32).min, -1, off + np.arange(h * w)[None, :, None])
    np.testing.assert_array_equal(back, src)
    np.testing.assert_allclose(_decode(payload["arrays"]["weight"]).astype(np.float32), weight, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(_decode(payload["arrays"]["xy"]), layout.xy.astype(np.float32))
    # fewer embedded edges per column on request
    small = explorer_payload(layout, src, weight, m=4)
    assert small["m"] == 4


def test_explorer_payload_sphere_layout():
    g = sphere(300)
    src, weight = _synthetic_local_edges(1, 300, 2, 8)
    src = np.clip(src, 0, 299)
    payload = explorer_payload(sheet_layout(g), src, weight)
    assert payload["projection"] == "equirectangular"
    xy = _decode(payload["arrays"]["xy"])
    assert (np.abs(xy[:, 0]) <= 180).all() and (np.abs(xy[:, 1]) <= 90).all()


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """Tiny stacked and sparse runs, analysed (quick options) and reported."""
    out = {}
    for kind in ("stacked", "sparse"):
        run = tiny_run(tmp_path_factory, kind)
        analyze_run(run, QUICK, quiet=True)
        out[kind] = (run, build_report(run))
    return out


def test_report_is_self_contained(reported):
    run, page_path = reported["stacked"]
    page = page_path.read_text()
    print(f"\nreport for a 48-column run: {len(page.encode()) / 1e6:.2f} MB")
    for needle in ('id="sheet"', 'id="step-slider"', 'id="panel"', 'id="explorer-data"', "data:image/png;base64,",
                   'id="config"', "<svg class=\"chart\""):
        assert needle in page, needle
    lowered = page.lower()
    for bad in ('src="http', "src='http", 'href="http', "<link", "url(http", "@import", "fetch("):
        assert bad not in lowered, bad
    analysis = json.loads((run / "analysis.json").read_text())
    assert f"{analysis['headline']['locality']:.4g}" in page


def _browser():
    """A headless Chromium WebDriver, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (run scripts/install_browser.sh)"
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if not chrome or not driver:
        return None, "chromium / chromedriver not installed (run scripts/install_browser.sh as root)"
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,1400"):
        opts.add_argument(arg)
    opts.binary_location = chrome
    try:
        return webdriver.Chrome(service=Service(driver), options=opts), None
    except Exception as exc:  # noqa: BLE001 - any start-up failure is a missing browser
        return None, f"chromium could not start: {exc}"


@pytest.fixture(scope="module")
def browser():
    drv, reason = _browser()
    if drv is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set but no browser is available: {reason}")
        pytest.skip(reason)
    yield drv
    drv.quit()


def _wait(cond, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def _panel_edges(drv):
    from selenium.webdriver.common.by import By

    items = drv.find_elements(By.CSS_SELECTOR, "#panel #incoming li")
    return [int(li.get_attribute("data-src")) for li in items], [float(li.get_attribute("data-weight")) for li in items]


def _expected(analysis, step, col):
    src = np.array(analysis["top_incoming"]["src"][step - 1][col])
    w = np.array(analysis["top_incoming"]["weight"][step - 1][col], dtype=float)
    keep = src >= 0
    return src[keep], w[keep]


def _check_panel(drv, analysis, step, col):
    from selenium.webdriver.common.by import By

    panel = drv.find_element(By.ID, "panel")
    _wait(lambda: panel.get_attribute("data-col") == str(col) and panel.get_attribute("data-step") == str(step))
    src, w = _panel_edges(drv)
    exp_src, exp_w = _expected(analysis, step, col)
    np.testing.assert_allclose(w, exp_w, rtol=2e-3, atol=1e-6)  # float16 in the page
    # equal weights may swap order: compare sources as multisets per distinct weight
    assert sorted(src) == sorted(exp_src.tolist())
    assert all(a >= b for a, b in zip(w, w[1:]))
    # the sources are highlighted on the sheet, the selected column outlined
    lit = drv.execute_script("return Array.from(document.querySelectorAll('#sheet rect.src')).map(r => +r.dataset.col)")
    assert sorted(lit) == sorted(set(exp_src.tolist()))
    assert drv.execute_script("return +document.querySelector('#sheet rect.sel').dataset.col") == col
    dprime = np.array(analysis["trained"]["topography"]["dprime"]["per_class_per_column"], dtype=float)[:, col]
    rows = drv.find_elements(By.CSS_SELECTOR, "#panel #selectivity tr[data-class]")
    np.testing.assert_allclose([float(r.get_attribute("data-dprime")) for r in rows], np.nan_to_num(dprime), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["stacked", "sparse"])
def test_report_in_browser(reported, browser, kind):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run, page_path = reported[kind]
    analysis = json.loads((run / "analysis.json").read_text())
    n, steps = analysis["model"]["columns"], analysis["trained"]["connectivity"]["steps"]
    drv = browser
    drv.get(page_path.resolve().as_uri())
    _wait(lambda: drv.find_element(By.TAG_NAME, "body").get_attribute("data-ready") in ("1", "error"))
    assert drv.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", drv.find_element(By.ID, "panel").text
    assert len(drv.find_elements(By.CSS_SELECTOR, "#sheet [data-col]")) == n

    # move the step slider to the first step with the keyboard
    slider = drv.find_element(By.ID, "step-slider")
    assert slider.get_attribute("value") == str(steps)
    drv.execute_script("arguments[0].focus()", slider)
    slider.send_keys(Keys.HOME)
    _wait(lambda: slider.get_attribute("value") == "1")

    # click a random column (seeded)
    col = int(np.random.default_rng(1234).integers(n))
    rect = drv.find_element(By.CSS_SELECTOR, f'#sheet [data-col="{col}"]')
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", rect)
    rect.click()
    _check_panel(drv, analysis, 1, col)

    # move the slider to the last step: the panel follows
    slider.send_keys(Keys.END)
    _check_panel(drv, analysis, steps, col)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / ("report.png" if kind == "stacked" else f"report_{kind}.png")
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_report_includes_model_brain_comparisons(reported, tmp_path):
    """`columnformer brain` writes RUN/brain/<name>/brain.md and figures; the report shows each comparison's
    tables and figures, and has no such section without one."""
    run, page_path = reported["stacked"]
    assert 'id="brain"' not in page_path.read_text()
    folder = run / "brain" / "synthetic-v1"
    (folder / "figures").mkdir(parents=True)
    (folder / "brain.md").write_text(
        "Encoding (cross-validated ridge, 5 folds): mean Pearson r per area (rows) and step (columns)\n\n"
        "| area | step 1 | step 2 |\n|---|---|---|\n| 0 | 0.125 | 0.375 |\n| 1 | 0.625 | 0.875 |\n"
    )
    shutil.copy(next((run / "figures" / "analysis").glob("*.png")), folder / "figures" / "brain_encoding.png")
    page = build_report(run, out=tmp_path / "report.html").read_text()
    section = page[page.index('id="brain"'):page.index('<h2>Summary')]
    assert "synthetic-v1" in section and "<td>0.875</td>" in section and "<th>step 2</th>" in section
    assert "|---|" not in section and section.count("data:image/png;base64,") == 1
    assert "Encoding (cross-validated ridge, 5 folds)" in section
