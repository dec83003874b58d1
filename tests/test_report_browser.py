"""The report page in a real headless browser: Debian's ``chromium`` driven by Selenium through the
system's ``chromedriver`` (nothing is downloaded). Checks that the heat-maps decode and show, that the
mapping text is visible, and that the page asks the network for nothing: every request Chrome's
DevTools saw is the page itself or an inline ``data:`` image, nothing failed to load and no
Content-Security-Policy violation was reported. Skipped when chromium, chromedriver or selenium is
missing (``make install`` installs them where apt-get can)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clafuse import api
from clafuse.reporting.build import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', e => window.__cspViolations.push(e.blockedURI));
"""


def _mlp(widths: list[int], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([64, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 10))
    return {k: v.contiguous() for k, v in nn.Sequential(*layers).state_dict().items()}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("browser")
    save_file(_mlp([24, 24, 16], 0), root / "deep.safetensors")
    save_file(_mlp([24, 16], 1), root / "shallow.safetensors")
    api.align([root / "deep.safetensors", root / "shallow.safetensors"], root / "map.json", data="digits",
              samples=200)
    api.fuse(root / "map.json", root / "fused.safetensors")
    doc = build_report(root / "map.json", root / "report.html", fused=root / "fused.safetensors", data="digits")
    return root / "report.html", doc


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,2400", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _network_events(driver) -> list[dict]:
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e for e in events if e["method"].startswith("Network.")]


def test_page_shows_heatmaps_and_mapping_and_loads_nothing(page: tuple[Path, dict], browser, tmp_path: Path) -> None:
    path, doc = page
    browser.get_log("performance")  # drop the events of starting the browser
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"

    images = browser.find_elements("tag name", "img")
    assert len(images) == 2  # one heat-map (one group) and the similarity chart
    for image in images:
        width, complete = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].complete]", image)
        assert complete and width > 0
        assert image.is_displayed() and image.size["width"] > 0 and image.size["height"] > 0
    assert "cost heat-map of group hidden" in images[0].get_attribute("alt")

    words = doc["alignments"][0]["mapping"]["hidden"]
    shown = [p.text for p in browser.find_elements("css selector", "p.mapping")]
    assert shown == [words]
    assert browser.find_element("css selector", "p.mapping").is_displayed()
    body = browser.find_element("tag name", "body").text
    for change in doc["alignments"][0]["changes"]:
        assert change in body
    assert "Accuracy on digits" in body

    requested = [e["params"]["request"]["url"] for e in _network_events(browser)
                 if e["method"] == "Network.requestWillBeSent"]
    assert requested, "DevTools reported no request at all: the check would prove nothing"
    assert all(url == path.as_uri() or url.startswith("data:") for url in requested), requested
    failed = [e["params"] for e in _network_events(browser) if e["method"] == "Network.loadingFailed"]
    assert not failed
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert all(name.startswith("data:") for name in resources), resources
    assert browser.execute_script("return window.__cspViolations") == []

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
