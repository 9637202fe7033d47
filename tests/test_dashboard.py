"""The live dashboard (GET /) in a real headless Chromium, driven by Playwright.

Debian's chromium is used (scripts/test.sh installs it); Playwright's own
browser download is not needed. The page must show a lock taken, a waiter
queueing and a release without being reloaded, on a phone-sized screen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.test_http import ParkedWait, q

pytestmark = pytest.mark.timeout(120)

CHROMIUM = os.environ.get("DISTRIBUTEX_CHROMIUM", "/usr/bin/chromium")
CONFIG = """\
pools:
  - name: deploy
    expire: 300
  - name: reboot
    maxlocks: 3
    expire: 0
"""
# Generous: the machine is shared with other test runs.
WAIT_MS = 15_000


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/test.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            # A phone: 390 x 844 CSS pixels, touch, as an iPhone 12-sized screen.
            context = browser.new_context(
                viewport={"width": 390, "height": 844},
                device_scale_factor=2,
                is_mobile=True,
                has_touch=True,
            )
            yield context.new_page()
        finally:
            browser.close()


def holder(page: Any, pool: str, host: str) -> str:
    return f'section[data-pool="{pool}"] li.holder[data-host="{host}"]'


def test_dashboard_shows_lock_queue_and_release_live(
    server_factory, page: Any, tmp_path: Path
) -> None:
    server: Server = server_factory(CONFIG)
    page.goto(server.url + "/")
    page.wait_for_selector("#conn.live", timeout=WAIT_MS)
    page.wait_for_selector('section[data-pool="deploy"]', timeout=WAIT_MS)
    page.evaluate("window.__notReloaded = true")
    assert page.inner_text('section[data-pool="deploy"] .slots') == "0 / 1 (mutex)"

    # A lock taken appears, with a countdown that runs.
    assert server.call(q("get", "alice", "deploy")).body == "YES"
    page.wait_for_selector(holder(page, "deploy", "alice"), timeout=WAIT_MS)
    left = page.inner_text(holder(page, "deploy", "alice") + " .left")
    assert left.endswith(" left") and "min" in left
    page.wait_for_function(
        "([sel, before]) => document.querySelector(sel).textContent !== before",
        arg=[holder(page, "deploy", "alice") + " .left", left],
        timeout=WAIT_MS,
    )

    # A queue forms, in order.
    bob = ParkedWait(server, "bob", "deploy")
    page.wait_for_selector(
        'section[data-pool="deploy"] li.waiter[data-host="bob"]', timeout=WAIT_MS
    )
    carol = ParkedWait(server, "carol", "deploy")
    page.wait_for_selector(
        'section[data-pool="deploy"] li.waiter[data-host="carol"]', timeout=WAIT_MS
    )
    queue = page.eval_on_selector_all(
        'section[data-pool="deploy"] li.waiter', "items => items.map(i => i.dataset.host)"
    )
    assert queue == ["bob", "carol"]
    # Nothing overflows sideways on a phone.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "dashboard-queue.png"), full_page=True)

    # The release hands the lock to bob; the page follows by itself.
    assert server.call(q("release", "alice", "deploy")).body == "OK"
    assert bob.answer()[2] == "YES"
    page.wait_for_selector(holder(page, "deploy", "bob"), timeout=WAIT_MS)
    page.wait_for_selector(holder(page, "deploy", "alice"), state="detached", timeout=WAIT_MS)
    page.wait_for_function(
        "() => [...document.querySelectorAll('section[data-pool=\"deploy\"] li.waiter')]"
        ".map(i => i.dataset.host).join() === 'carol'",
        timeout=WAIT_MS,
    )
    assert page.evaluate("window.__notReloaded === true")  # never reloaded

    # A pool whose leases never expire says so.
    assert server.call(q("get", "dave", "reboot")).body == "YES"
    page.wait_for_selector(holder(page, "reboot", "dave"), timeout=WAIT_MS)
    assert page.inner_text(holder(page, "reboot", "dave") + " .left") == "never expires"

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshots: {shot} and {tmp_path / 'dashboard-queue.png'}")
    carol.hang_up()


def test_dashboard_page_is_self_contained(server: Server) -> None:
    answer = server.call("/")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    html = answer.body
    assert "EventSource" in html
    # No asset from anywhere else: no external scripts, styles, fonts or images.
    for needle in ("http://", "https://", "//cdn", "<link", "src="):
        assert needle not in html, needle


def test_dashboard_shows_each_holders_mode(server_factory, page: Any) -> None:
    server: Server = server_factory(
        CONFIG.replace(
            "    expire: 300\n", "    expire: 300\n    max_shared: 4\n    lock_delay: 5\n"
        )
    )
    for host in ("r1", "r2"):
        assert server.call(q("get", host, "deploy", "&mode=shared")).body == "YES"
    writer = ParkedWait(server, "w", "deploy")
    page.goto(server.url + "/")
    page.wait_for_selector(holder(page, "deploy", "r2"), timeout=WAIT_MS)
    page.wait_for_selector('section[data-pool="deploy"] li.waiter[data-host="w"]', timeout=WAIT_MS)
    modes = page.eval_on_selector_all(
        'section[data-pool="deploy"] li.holder', "items => items.map(i => i.dataset.mode)"
    )
    assert modes == ["shared", "shared"]
    assert page.inner_text('section[data-pool="deploy"] .slots') == "2 / 4 shared"
    assert "shared" in page.inner_text(holder(page, "deploy", "r1") + " .fence")
    meta = page.inner_text('section[data-pool="deploy"] .meta')
    assert "lock-delay 5.0 s" in meta and "at most 4 shared" in meta
    writer.hang_up()
