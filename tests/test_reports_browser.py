"""The HTML leaderboard in headless Chromium: loads from file:// without console errors, sorts on
a header click, filters rows, expands a job's details, and renders a non-blank page.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`);
without them the test is skipped with a loud reason. Run only these: `pytest -m browser`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from merge_harness.reports import commands
from merge_harness.store.database import ResultStore
from tests.test_reports import EXPERIMENT, build_store

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--window-size=1400,1000"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("leaderboard")
    with ResultStore(build_store(root / "results.sqlite")) as store:
        commands.write_report(store, EXPERIMENT, root / "out", ["html"], normalized=True,
                              delta=True, with_plots=False)
    return root / "out" / commands.LEADERBOARD


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("!!! CHROMIUM IS NOT INSTALLED: the leaderboard browser test did NOT run. Install "
                    "it with `apt-get install -y chromium chromium-driver` !!!")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


ROWS_JS = """
return Array.from(document.querySelectorAll("tbody.entry")).filter(b => !b.hidden).map(b => [
  b.querySelector("td.name").textContent, b.querySelector('td[data-col="avg"]').dataset.value]);
"""


def visible_rows(driver) -> list[tuple[str, float]]:
    """(model, average) of the rows the page shows, in page order (one round trip)."""
    return [(name, float(avg)) for name, avg in driver.execute_script(ROWS_JS)]


def visible_names(driver) -> list[str]:
    return [name for name, _ in visible_rows(driver)]


def test_leaderboard_in_headless_chromium(driver, page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(page.as_uri())
    assert driver.title == "merge-harness leaderboard"
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe

    initial = visible_names(driver)
    assert initial[0] == "Pre-trained" and len(initial) == 10
    driver.find_element(By.CSS_SELECTOR, 'th[data-col="avg"]').click()
    by_average = visible_names(driver)
    assert by_average != initial
    averages = [avg for _, avg in visible_rows(driver)]
    assert averages == sorted(averages, reverse=True) and by_average[0] == "SLTA (attn/MLP)"
    driver.find_element(By.CSS_SELECTOR, 'th[data-col="avg"]').click()
    ascending = [avg for _, avg in visible_rows(driver)]
    assert ascending == sorted(averages) and visible_names(driver)[0] == "Pre-trained"

    Select(driver.find_element(By.ID, "filter-method")).select_by_value("slta")
    assert sorted(visible_names(driver)) == ["SLTA (attn/MLP)", "SLTA (layer)"]
    assert driver.find_element(By.ID, "count").text == "2 of 10 models"
    shown = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "td.name") if c.is_displayed()]
    assert sorted(shown) == ["SLTA (attn/MLP)", "SLTA (layer)"]  # really hidden, not just marked
    Select(driver.find_element(By.ID, "filter-method")).select_by_value("")
    Select(driver.find_element(By.ID, "filter-task")).select_by_value("HumanEval (fixture)")
    headers = driver.find_elements(By.CSS_SELECTOR, "thead th[data-task]")
    task_headers = [th for th in headers if th.is_displayed()]
    assert [th.text for th in task_headers] == ["HumanEval (fixture)"]
    Select(driver.find_element(By.ID, "filter-task")).select_by_value("")

    detail = driver.find_element(By.CSS_SELECTOR, "tbody.entry tr.detail")
    assert not detail.is_displayed()
    driver.find_element(By.CSS_SELECTOR, "tbody.entry button.toggle").click()
    assert detail.is_displayed() and "lm_eval 0.4.8" in detail.text and "evaluate 12.25 s" in detail.text

    screenshot = tmp_path / "leaderboard.png"
    assert driver.save_screenshot(str(screenshot))
    from PIL import Image

    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert image.size[0] >= 800
    assert colours is not None and len(colours) > 50, "the screenshot looks blank"
    assert max(count for count, _ in colours) < 0.95 * sum(count for count, _ in colours)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
