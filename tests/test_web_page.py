"""The web page (GET /) in a real headless browser: Debian's chromium and chromium-driver
through selenium. Signing in, the live feed, versions and an old one downloaded, a folder
deleted by a client and restored from the trash, a point-in-time restore with its
preview, devices added and revoked, a file name that is HTML, and screenshots of the main
views at a laptop's and a phone's width (saved in artifacts/screenshots/)."""

from __future__ import annotations

import hashlib
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Clients, Daemon, http_request, tree, wait_until, write

ADMIN = "the-admin-key"
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(binary).exists():
            return f"{package} is not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if (why := browser_missing()) is not None:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(daemon: Any) -> Daemon:
    return daemon("--api-key", ADMIN)


def put(server: Daemon, path: str, data: bytes, client_id: str = "laptop") -> None:
    status, _, body = http_request(server.port, "PUT", "/files/" + urllib.request.quote(path),
                                   body=data, headers={"Authorization": f"Bearer {ADMIN}",
                                                       "X-Client-Id": client_id})
    assert status in (200, 201), body


def until(driver: Any, check: Any, what: str, timeout: float = 10) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda _: check(), message=f"waiting for {what}")


def text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By
    return str(driver.find_element(By.ID, element_id).text)


def sign_in(driver: Any, server: Daemon, key: str = ADMIN) -> None:
    from selenium.webdriver.common.by import By
    driver.get(server.url + "/")
    until(driver, lambda: driver.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "signin").click()


def signed_in(driver: Any, server: Daemon) -> None:
    sign_in(driver, server)
    until(driver, lambda: "(live)" in text(driver, "feed-state"), "the live feed")


def click_button(driver: Any, container_id: str, label: str, nth: int = 0) -> None:
    from selenium.webdriver.common.by import By
    buttons = [b for b in driver.find_element(By.ID, container_id).find_elements(By.TAG_NAME,
                                                                                   "button")
               if b.text == label]
    buttons[nth].click()


def accept_dialog(driver: Any) -> str:
    alert = until(driver, lambda: _alert(driver), "a dialog")
    message = str(alert.text)
    alert.accept()
    return message


def _alert(driver: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return False


def console_errors(driver: Any) -> list[str]:
    """Script errors and refusals (a CSP violation is one) the page caused."""
    try:
        entries = driver.get_log("browser")
    except Exception:
        return []
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"
            and "Failed to load resource" not in entry["message"]]   # a 401 is expected


def test_sign_in_status_and_a_wrong_key(browser: Any, server: Daemon) -> None:
    put(server, "a.txt", b"12345")
    sign_in(browser, server, "wrong")
    until(browser, lambda: "refused" in text(browser, "error"), "the refusal in plain words")
    browser.refresh()                                   # nothing kept of a wrong key
    signed_in(browser, server)
    status = text(browser, "status-list")
    assert "files\n1" in status and "bytes\n5 bytes" in status and "version" in status
    assert browser.execute_script("return sessionStorage.getItem('syncd-key')") == ADMIN
    assert ADMIN not in browser.current_url
    assert console_errors(browser) == []


def test_a_change_appears_in_the_live_feed_within_a_second(browser: Any,
                                                          server: Daemon) -> None:
    signed_in(browser, server)
    started = time.monotonic()
    put(server, "notes/live.txt", b"hello", client_id="phone")
    until(browser, lambda: "notes/live.txt" in text(browser, "feed-list"), "the change", 1.0)
    assert time.monotonic() - started < 1.0
    assert "by phone" in text(browser, "feed-list") and "just now" in text(browser, "feed-list")


def test_browse_to_a_file_and_download_an_old_version(browser: Any, server: Daemon) -> None:
    put(server, "docs/report.txt", b"first draft")
    put(server, "docs/report.txt", b"final version")
    signed_in(browser, server)
    click_button(browser, "files-body", "docs/")
    until(browser, lambda: "report.txt" in text(browser, "files-body"), "the folder")
    click_button(browser, "files-body", "report.txt")
    until(browser, lambda: "overwrite by laptop" in text(browser, "versions-body"), "versions")
    assert "2 (current)" in text(browser, "versions-body")
    click_button(browser, "versions-body", "Download", 1)       # revision 1
    target = browser.downloads / "report.txt"
    until(browser, lambda: target.exists() and target.read_bytes() == b"first draft",
          "the old version downloaded")


def test_a_folder_deleted_by_a_client_comes_back_from_the_trash(
        browser: Any, server: Daemon, tmp_path: Path) -> None:
    clients = Clients(tmp_path, server)
    try:
        write(clients.folder("A"), "photos/cat.jpg", b"meow")
        write(clients.folder("A"), "photos/dog.jpg", b"woof")
        write(clients.folder("A"), "keep.txt", b"k")
        clients.start("A", "--api-key", ADMIN)
        signed_in(browser, server)
        until(browser, lambda: "photos/" in text(browser, "files-body"), "the synced folder")
        shutil.rmtree(clients.folder("A") / "photos")
        wait_until(lambda: not (server.data / "photos").exists(), "the folder deleted")
        until(browser, lambda: "photos/dog.jpg" in text(browser, "trash-body"), "the trash")
        for _ in range(2):
            click_button(browser, "trash-body", "Restore")
            time.sleep(0.3)
        wait_until(lambda: tree(clients.folder("A")).get("photos/cat.jpg") == b"meow"
                   and tree(clients.folder("A")).get("photos/dog.jpg") == b"woof",
                   "the folder back on the device")
        until(browser, lambda: "dog.jpg" not in text(browser, "trash-body"), "an empty trash")
    finally:
        clients.stop()


def test_a_point_in_time_restore_is_previewed_then_done(browser: Any, server: Daemon) -> None:
    put(server, "work/a.txt", b"a1")
    put(server, "work/b.txt", b"b1")
    time.sleep(1.2)
    moment = time.time()
    time.sleep(1.2)
    put(server, "work/a.txt", b"a2 (a mistake)")
    put(server, "work/new.txt", b"created since")
    status, _, _ = http_request(server.port, "DELETE", "/files/work/b.txt?client_id=laptop",
                                headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    signed_in(browser, server)
    from selenium.webdriver.common.by import By
    browser.find_element(By.ID, "pit-prefix").send_keys("work")
    local = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(moment))
    browser.execute_script("document.getElementById('pit-time').value = arguments[0]", local)
    browser.find_element(By.ID, "pit-delete").click()
    browser.find_element(By.ID, "pit-preview").click()
    until(browser, lambda: "2 to restore, 1 to delete" in text(browser, "pit-summary"), "preview")
    preview = text(browser, "pit-list")
    assert "restore work/a.txt" in preview and "restore work/b.txt" in preview
    assert "delete work/new.txt" in preview
    assert (server.data / "work" / "a.txt").read_bytes() == b"a2 (a mistake)"   # nothing yet
    browser.find_element(By.ID, "pit-go").click()
    assert "Restore these files now?" in accept_dialog(browser)
    assert "2 restored, 1 deleted" in accept_dialog(browser)
    assert (server.data / "work" / "a.txt").read_bytes() == b"a1"
    assert (server.data / "work" / "b.txt").read_bytes() == b"b1"
    assert not (server.data / "work" / "new.txt").exists()


def test_add_and_revoke_a_device(browser: Any, server: Daemon) -> None:
    from selenium.webdriver.common.by import By
    signed_in(browser, server)
    browser.find_element(By.ID, "device-name").send_keys("tablet")
    browser.find_element(By.ID, "device-add").click()
    until(browser, lambda: text(browser, "token-value").startswith("syncd_"), "the token")
    token = text(browser, "token-value")
    browser.find_element(By.ID, "token-copy").click()
    until(browser, lambda: text(browser, "token-copy") in ("Copied", "Selected: press Ctrl+C"),
          "the copy")
    assert http_request(server.port, "GET", "/files",
                        headers={"Authorization": f"Bearer {token}"})[0] == 200
    until(browser, lambda: "tablet" in text(browser, "devices-body"), "the device listed")
    click_button(browser, "devices-body", "Revoke")
    assert "Revoke tablet?" in accept_dialog(browser)
    until(browser, lambda: "revoked" in text(browser, "devices-body"), "revoked")
    assert http_request(server.port, "GET", "/files",
                        headers={"Authorization": f"Bearer {token}"})[0] == 401
    assert token not in http_request(server.port, "GET", "/devices", headers={
        "Authorization": f"Bearer {ADMIN}"})[2].decode()


def test_a_file_name_that_is_html_shows_as_text_and_runs_nothing(browser: Any,
                                                                 server: Daemon) -> None:
    from selenium.webdriver.common.by import By
    name = "<img src=x onerror=alert(1)>.txt"
    put(server, name, b"x")
    signed_in(browser, server)
    put(server, "<b>bold</b>.txt", b"y", client_id="phone")
    until(browser, lambda: "<b>bold</b>.txt" in text(browser, "feed-list"), "the feed")
    assert name in text(browser, "files-body") and name in text(browser, "feed-list")
    assert _alert(browser) is False                             # nothing ran
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#feed-list b b") == []
    assert browser.execute_script("return window.alerted === undefined")


def test_the_page_sends_a_strict_content_security_policy(server: Daemon) -> None:
    for path in ("/", "/app.js", "/app.css"):
        status, headers, _ = http_request(server.port, "GET", path)   # open: no key needed
        assert status == 200
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    page = http_request(server.port, "GET", "/")[2].decode()
    assert "<script>" not in page and "http://" not in page and "https://" not in page


@pytest.mark.parametrize("width, height, label", [(1280, 900, "laptop"), (390, 844, "phone")])
def test_screenshots_of_the_main_views(browser: Any, server: Daemon, width: int, height: int,
                                       label: str) -> None:
    from selenium.webdriver.common.by import By
    for index, name in enumerate(["notes/todo.txt", "photos/2024/cat.jpg", "report.pdf"]):
        put(server, name, hashlib.sha256(name.encode()).digest() * (index + 1) * 100,
            client_id=["laptop", "phone", "desk"][index])
    put(server, "notes/todo.txt", b"updated")
    browser.set_window_size(width, height)
    signed_in(browser, server)
    until(browser, lambda: "report.pdf" in text(browser, "files-body"), "the files")
    click_button(browser, "files-body", "notes/")
    until(browser, lambda: "todo.txt" in text(browser, "files-body"), "the folder")
    click_button(browser, "files-body", "todo.txt")
    until(browser, lambda: "current" in text(browser, "versions-body"), "versions")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SCREENSHOTS / f"{label}-top.png"))
    browser.find_element(By.ID, "files").location_once_scrolled_into_view
    browser.save_screenshot(str(SCREENSHOTS / f"{label}-files.png"))
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a {label} screen"
    assert (SCREENSHOTS / f"{label}-top.png").stat().st_size > 10_000
