"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Against a running `lightbox api`, worker and scheduler on SQLite: sign in with a token, find a
study and its finding, open its heatmap, retry a dead job and watch it succeed, promote a
model, sign out. Screenshots go to ``$LIGHTBOX_TEST_SCREENSHOT_DIR`` (the README's come from here)
or the test's temp dir. Skips with the reason where Chromium or Selenium is missing; fails
instead under ``CI=true`` (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.model_registry import register_bundle
from db.session import session_scope
from tests.conftest import Backend, stop_processes, wait_for
from tests.peers import missing
from tests.test_api import OPERATOR, READER, TOKENS, Seeded, free_port, seed

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[object]:
    reason = _missing()
    if reason:
        missing("the dashboard's browser", reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1360,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _staging_copy(bundle: Path, tmp: Path) -> Path:
    """The shared bundle again under another version name (the manifest is not hashed)."""
    copy = tmp / "bundle-b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = manifest["version"] + "-b"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture
def running(sqlite_backend: Backend, model_bundle: Path,
            tmp_path: Path) -> Iterator[tuple[str, Seeded, str]]:
    backend = sqlite_backend
    with session_scope(backend.settings.sqlalchemy_url) as session:
        model = register_bundle(session, model_bundle, promote=True)
        staging = register_bundle(session, _staging_copy(model_bundle, tmp_path))
        model_id, staging_version = model.id, staging.version
    seeded = seed(backend, model_id, tmp_path)
    port = free_port()
    backend.env.update({"LIGHTBOX_API_PORT": str(port),
                        "LIGHTBOX_API_TOKENS": json.dumps(TOKENS)})
    procs = [backend.spawn(name, log=tmp_path / f"{name}.log")
             for name in ("api", "worker", "scheduler")]
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 120, what="lightbox api")
    yield base, seeded, staging_version
    stop_processes(procs)


def test_dashboard_in_chromium(browser, running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    base, seeded, staging_version = running
    shots = Path(os.environ.get("LIGHTBOX_TEST_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    driver = browser

    def page_has(text: str) -> bool:
        return text in driver.find_element(By.TAG_NAME, "body").text

    # Pages need a session: the overview sends us to sign in; a wrong token is refused.
    driver.get(base + "/")
    assert driver.current_url.endswith("/login")
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.ID, "signin").click()
    wait_for(lambda: "error=token" in driver.current_url, 60, what="the refusal")
    assert page_has("not known")
    driver.find_element(By.ID, "token").send_keys(OPERATOR)
    driver.find_element(By.ID, "signin").click()
    wait_for(lambda: driver.current_url == base + "/", 60, what="the overview")
    assert page_has("Jobs by state")
    cookie = driver.get_cookie("lightbox_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert OPERATOR not in cookie["value"]
    assert driver.find_element(By.CSS_SELECTOR, "svg.chart")  # throughput, drawn server-side
    driver.save_screenshot(str(shots / "dashboard-overview.png"))

    # Studies: find the study with the finding, open it: timeline, finding, heatmap.
    driver.get(base + "/studies?label=pneumonia&min_score=0.9")
    links = driver.find_elements(By.CSS_SELECTOR, "a.study-link")
    assert [a.get_attribute("title") for a in links] == [seeded.chest[0]]
    driver.get(base + "/studies")
    driver.save_screenshot(str(shots / "dashboard-studies.png"))
    assert "SYN0000" not in driver.page_source and "SYNTHETIC^" not in driver.page_source
    driver.find_element(By.CSS_SELECTOR, f"a.study-link[title='{seeded.chest[0]}']").click()
    wait_for(lambda: "/studies/" in driver.current_url, 60, what="the study page")
    assert page_has("pneumonia") and page_has("0.910") and page_has("positive")
    timeline = driver.find_element(By.ID, "timeline").text
    assert "quarantined" in timeline and "dead after 6 attempt(s)" in timeline
    image = driver.find_element(By.CSS_SELECTOR, ".heatmaps img")
    wait_for(lambda: driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", image), 60,
        what="the heatmap image")
    driver.save_screenshot(str(shots / "dashboard-study.png"))
    driver.find_element(By.CSS_SELECTOR, "a.heatmap-link").click()
    wait_for(lambda: driver.current_url.endswith(f"/{seeded.heatmap_sop}.png"), 60,
             what="the heatmap")
    assert driver.execute_script("return document.images.length && "
                                 "document.images[0].naturalWidth") > 0

    # The unrouted study says why.
    driver.get(base + f"/studies/{seeded.ct}")
    assert page_has("no routing rule matched")

    # Retry a dead job; the worker runs it and the page shows it succeeded.
    driver.get(base + "/jobs")
    assert page_has("decode_failed")
    driver.save_screenshot(str(shots / "dashboard-jobs.png"))
    driver.find_element(By.ID, f"retry-{seeded.dead_job}").click()
    wait_for(lambda: "message=" in driver.current_url, 60, what="the retry")
    assert page_has(f"job {seeded.dead_job} queued again")

    def succeeded() -> bool:
        driver.get(base + "/jobs")
        row = driver.find_elements(By.ID, f"recent-{seeded.dead_job}")
        return bool(row) and "succeeded" in row[0].text

    wait_for(succeeded, 300, interval=2, what=f"job {seeded.dead_job} to succeed after retry")

    # A model's page: metrics, thresholds and the bundle's ROC plot.
    driver.get(base + f"/models/chest/{staging_version}")
    assert page_has("auroc") and page_has("Thresholds")
    roc = driver.find_element(By.CSS_SELECTOR, "img[alt='roc.png']")
    wait_for(lambda: driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", roc), 60,
        what="the ROC plot")
    driver.save_screenshot(str(shots / "dashboard-model.png"))

    # Promote the staging version.
    driver.get(base + "/models")
    driver.save_screenshot(str(shots / "dashboard-models.png"))
    driver.find_element(By.ID, f"promote-chest-{staging_version}").click()
    wait_for(lambda: "message=" in driver.current_url, 60, what="the promotion")
    assert page_has(f"chest {staging_version} is now in production")
    row = driver.find_element(By.ID, f"model-chest-{staging_version}").text
    assert "production" in row

    # A form without its CSRF token is refused, even with the session cookie.
    status = driver.execute_script(
        "var x = new XMLHttpRequest(); x.open('POST', '/jobs/1/retry', false);"
        "x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');"
        "x.send('csrf=forged'); return x.status;")
    assert status == 403

    # Sign out: the session is gone.
    driver.find_element(By.ID, "signout").click()
    wait_for(lambda: driver.current_url.endswith("/login"), 60, what="signing out")
    driver.get(base + "/jobs")
    assert driver.current_url.endswith("/login")

    # A read-only token sees no Retry or Promote buttons.
    driver.find_element(By.ID, "token").send_keys(READER)
    driver.find_element(By.ID, "signin").click()
    wait_for(lambda: driver.current_url == base + "/", 60, what="the overview")
    driver.get(base + "/models")
    assert not driver.find_elements(By.CSS_SELECTOR, "button.promote")
