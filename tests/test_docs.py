"""The documentation: the README, the MkDocs site and its configuration reference.

- The site builds with ``mkdocs build --strict`` (a broken link, a missing
  anchor or page, or a docstring mkdocstrings cannot read fails it).
- The configuration reference (docs/configuration.md) is checked against the
  loader's own tables of keys, the defaults of its ``Config`` and its bounds.
- The README stays short, keeps the two set-up commands, and every relative
  link in the README, the CHANGELOG and bench/README.md reaches a file (and a
  heading, when it names one).
- The built site in a real headless Chromium: the index and the configuration
  reference render, with no broken image and nothing fetched from elsewhere
  (screenshots in the test's temporary folder).
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from markdown.extensions.toc import slugify

from distributex import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
CHROMIUM = os.environ.get("DISTRIBUTEX_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 15_000


def build_site(dest: Path, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(dest)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="pip install '.[docs]'")
    dest = tmp_path_factory.mktemp("site")
    result = build_site(dest)
    assert result.returncode == 0, result.stdout + result.stderr
    return dest


@pytest.mark.timeout(300)
def test_site_builds_strictly_with_every_page(site: Path) -> None:
    pages = {
        "index.html",
        "getting-started/index.html",
        "configuration/index.html",
        "http-api/index.html",
        "client/index.html",
        "library/index.html",
        "backends/index.html",
        "backends/inmemory/index.html",
        "backends/sqlite/index.html",
        "backends/memcache/index.html",
        "backends/redis/index.html",
        "backends/etcd/index.html",
        "security/index.html",
        "operations/index.html",
        "upgrading/index.html",
        "design/engine/index.html",
        "design/shared-state/index.html",
        "testing/index.html",
        "benchmarks/index.html",
        "bench-runs/index.html",
    }
    missing = {page for page in pages if not (site / page).is_file()}
    assert not missing
    # The library's API is generated from its docstrings.
    library = (site / "library/index.html").read_text()
    for name in ("sync.Client", "aio.AsyncClient", "errors.LockLost", "errors.LockTimeout"):
        assert f'id="distributex.client.{name}"' in library, name
    # bench/README.md is included whole, its latest section too.
    runs = (site / "bench-runs/index.html").read_text()
    assert "Fleet-sized queues (after" in runs


@pytest.mark.timeout(300)
def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    # The build is strict: a page linking to a page that does not exist fails it.
    # (On a copy of the sources, so the tree is never touched.)
    pytest.importorskip("mkdocs", reason="pip install '.[docs]'")
    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    (copy / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "README.md", copy / "bench")
    (copy / "src").symlink_to(ROOT / "src")
    assert build_site(tmp_path / "site-ok", copy).returncode == 0
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md)\n")
    result = build_site(tmp_path / "site", copy)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


# -- the configuration reference -------------------------------------------------------


def reference_rows(text: str) -> list[list[str]]:
    """The table rows of a Markdown page (header and rule rows left out), as cells."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|[-|: ]+\|", line):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in ("key", "option", "mode"):
            continue
        rows.append(cells)
    return rows


def documented_keys(text: str) -> dict[str, tuple[str, ...]]:
    """Each key named in a table's first column, with the row's other cells."""
    keys: dict[str, tuple[str, ...]] = {}
    for cells in reference_rows(text):
        names = re.findall(r"`([^`]+)`", cells[0])
        for i, name in enumerate(names):
            keys[name] = (str(i), str(len(names)), *cells[1:])
    return keys


def reference_text() -> str:
    """The reference page without its table of bounds (whose rows name keys again)."""
    head, _, rest = REFERENCE.read_text().partition("### Bounds")
    return head + "\n## " + rest.partition("\n## ")[2]


def loader_keys() -> set[str]:
    return (
        set(config._TOP_KEYS)
        | {f"pools[].{key}" for key in config._POOL_KEYS}
        | {f"tls.{key}" for key in config._TLS_KEYS}
        | {f"tokens[].{key}" for key in config._TOKEN_KEYS}
    )


def test_reference_lists_every_key_the_loader_knows() -> None:
    documented = set(documented_keys(reference_text()))
    missing = loader_keys() - documented
    assert not missing, f"keys the loader accepts but docs/configuration.md omits: {missing}"
    unknown = {key for key in documented - loader_keys() if re.fullmatch(r"[a-z_.\[\]]+", key)}
    assert not unknown, f"keys in docs/configuration.md the loader refuses: {unknown}"


def test_reference_defaults_are_the_loaders() -> None:
    keys = documented_keys(reference_text())
    defaults = {f.name: f.default for f in dataclasses.fields(config.Config)}
    checked = 0
    for key in config._TOP_KEYS:
        default = defaults.get(key)
        if key not in keys or not isinstance(default, bool | int | float | str):
            continue  # no default (None), or one that depends (autocreate: see its row)
        if key == "autocreate":
            continue
        position, count, cell = int(keys[key][0]), int(keys[key][1]), keys[key][2]
        parts = [part.strip() for part in re.split(r",(?![^()]*\))", cell)]
        assert len(parts) == count, f"{key}: the default cell {cell!r} gives {len(parts)} values"
        written = parts[position].strip("`").split(" ")[0].strip("`")
        if isinstance(default, bool):
            assert written == str(default).lower(), (key, written, default)
        elif isinstance(default, int | float):
            assert float(written.replace(",", "")) == default, (key, written, default)
        else:
            assert written == default, (key, written, default)
        checked += 1
    assert checked >= 20  # most keys have a plain default the page must agree with
    assert keys["pools[].expire"][2] == f"`{int(config.DEFAULT_EXPIRE)}`"


def bound_rows() -> list[tuple[str, str, str]]:
    text = REFERENCE.read_text().split("### Bounds", 1)[1].split("\n## ", 1)[0]
    rows = []
    for cells in reference_rows(text):
        for key in re.findall(r"`([^`]+)`", cells[0]):
            rows.append((key, cells[1], cells[2]))
    return rows


def loads(text: str) -> bool:
    try:
        config.parse_config(text)
    except config.ConfigError:
        return False
    return True


def test_reference_bounds_are_the_loaders() -> None:
    rows = bound_rows()
    assert {key for key, _, _ in rows} == {
        key for key in config._TOP_KEYS if key.startswith("max_") or key.endswith("_timeout")
    }
    for key, low, high in rows:
        top = int(high.replace(",", "")) if high != "10⁹" else 10**9
        assert loads(f"{key}: {top}"), key
        assert not loads(f"{key}: {top + 1}"), key
        if low == "more than 0":
            assert not loads(f"{key}: 0") and loads(f"{key}: 0.001"), key
        else:
            assert loads(f"{key}: {int(low)}"), key
            assert not loads(f"{key}: {int(low) - 1}"), key


# -- the README and links ---------------------------------------------------------------


def test_readme_is_short_and_keeps_the_set_up_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/distributexd" in text
    assert "\nbash scripts/test.sh\n" in text
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def anchors(page: Path) -> set[str]:
    found = set()
    fence = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(slugify(match.group(1).replace("`", ""), "-"))
    return found


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md", "bench/README.md"])
def test_relative_links_reach_their_files_and_headings(name: str) -> None:
    source = ROOT / name
    text = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve()
        heading_missing = anchor and file.suffix == ".md" and anchor not in anchors(file)
        if not file.exists() or heading_missing:
            broken.append(target)
    assert not broken, f"{name}: {broken}"


# -- the site in a real browser ---------------------------------------------------------


@pytest.fixture
def served(site: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.timeout(300)
def test_site_pages_render_in_chromium(served: str, tmp_path: Path) -> None:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/test.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    failed: list[str] = []
    elsewhere: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on(
                "response",
                lambda response: response.status >= 400 and failed.append(response.url),
            )
            page.on(
                "request",
                lambda request: (
                    (request.url.startswith(served) or request.url.startswith("data:"))
                    or elsewhere.append(request.url)
                ),
            )
            for path, shot, text in (
                ("/", "index.png", "What a lock service cannot promise"),
                ("/configuration/", "configuration.png", "max_waiters_per_host"),
            ):
                page.goto(served + path, wait_until="load", timeout=WAIT_MS)
                page.wait_for_selector("article h1", timeout=WAIT_MS)
                assert text in page.inner_text("article")
                images = page.evaluate(
                    "() => Array.from(document.images)"
                    ".map(i => [i.src, i.complete, i.naturalWidth])"
                )
                assert all(complete and width > 0 for _, complete, width in images), images
                if path == "/":
                    assert any(src.endswith("img/cycle.svg") for src, _, _ in images)
                page.screenshot(path=str(tmp_path / shot), full_page=True)
                assert (tmp_path / shot).stat().st_size > 10_000
        finally:
            browser.close()
    print(f"screenshots in {tmp_path}")
    assert not failed, failed
    assert not elsewhere, f"fetched from elsewhere: {elsewhere}"
