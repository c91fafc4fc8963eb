"""What a reader sees: the built site, opened page by page in headless Chromium.

Every page loads without a JavaScript error, its solutions stay folded until clicked,
its code blocks have copy buttons (which copy a command of several lines whole), its images
load and its links lead somewhere.

Playwright (pytest-playwright) drives Debian's Chromium (package `chromium`, installed by
.ci/run); no browser is downloaded. The site is served from a temporary build by Python's
http.server, as a reader's browser would get it.
"""

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium: apt-get install chromium (.ci/run installs it)")
pytest.importorskip("pytest_playwright", reason="needs pytest-playwright (in requirements.txt)")


# ------------------------------------------------------------------ the site

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as a reader gets it. Warnings are test_site.py's business, not this file's."""
    outdir = tmp_path_factory.mktemp("browser-site") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-c", str(REPO),
         str(REPO / "content"), str(outdir)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"the site does not build:\n{result.stderr[-3000:]}"
    return outdir


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site without logging to the terminal; remembers every error status."""

    errors: list  # (path, status), set per server

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:
            self.errors.append((self.path, code))

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # The browser drops connections it no longer needs when it moves to the next page.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server(site):
    handler = type("Handler", (QuietHandler,), {"errors": []})
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.errors = handler.errors
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# -------------------------------------------------------------- the browser

class Tab:
    """One browser tab that keeps what the console showed as errors since a page was opened."""

    def __init__(self, page):
        self.page = page
        self.found = []
        page.on("pageerror", lambda error: self.found.append(str(error)))
        page.on("console", self._console)

    def _console(self, message):
        # The browser's own request for /favicon.ico does not count: the site has no icon,
        # and on GitHub Pages that request goes to the top of the domain anyway.
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            self.found.append(f"{message.text} {message.location.get('url', '')}".strip())

    def open(self, url: str):
        """Load a page and wait until it and its scripts, styles and images have loaded."""
        self.found = []
        self.page.goto(url, wait_until="load")

    def errors(self) -> list[str]:
        return list(self.found)


@pytest.fixture(scope="module")
def tab(playwright):
    """A tab of Debian's Chromium, started by pytest-playwright's Playwright: no browser is
    downloaded. Without the background services, Chromium's calls home would fill the
    console with errors on a machine without internet."""
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    yield Tab(page)
    browser.close()


# ------------------------------------------------------------ what a page shows

INSPECT = """(() => {
    const hidden = el => getComputedStyle(el).visibility === "hidden" || el.getBoundingClientRect().height === 0;
    return {
        links: [...document.querySelectorAll("a[href]")]
            .filter(a => a.origin === location.origin).map(a => a.href),
        ids: [...document.querySelectorAll("[id]")].map(el => el.id),
        images: document.images.length,
        broken_images: [...document.images]
            .filter(img => !img.complete || img.naturalWidth === 0).map(img => img.getAttribute("src")),
        code_blocks: document.querySelectorAll("div.highlight pre").length,
        code_without_copy_button: [...document.querySelectorAll("div.highlight pre")]
            .filter(pre => !pre.parentElement.querySelector("button.copybtn"))
            .map(pre => pre.textContent.slice(0, 60)),
        solutions: document.querySelectorAll(".admonition.solution").length,
        open_solutions: [...document.querySelectorAll(".admonition.solution")]
            .filter(s => [...s.children].some(c => !c.classList.contains("admonition-title") && !hidden(c)))
            .map(s => s.textContent.slice(0, 60)),
    };
})()"""


def inspect(tab: Tab, url: str) -> dict:
    tab.open(url)
    findings = tab.page.evaluate(INSPECT)
    findings["errors"] = tab.errors()  # after evaluate: late errors have arrived too
    return findings


@pytest.fixture(scope="module")
def pages(site, server, tab) -> dict:
    """What every page of the site shows, by file name: one visit each."""
    names = sorted(p.name for p in site.glob("*.html"))
    assert "index.html" in names and len(names) > 5
    return {name: inspect(tab, server.base_url + name) for name in names}


def broken_links(links, pages: dict, base_url: str) -> list[str]:
    """Same-site links that give an HTTP error or point at an id their page does not have."""
    broken = []
    for link in sorted(set(links)):
        address, _, anchor = link.partition("#")
        try:
            urllib.request.urlopen(address, timeout=10).close()
        except urllib.error.HTTPError as err:
            broken.append(f"{link}: HTTP {err.code}")
            continue
        page = pages.get(address.removeprefix(base_url) or "index.html")
        if anchor and page is not None and urllib.parse.unquote(anchor) not in page["ids"]:
            broken.append(f"{link}: no element with id {anchor!r}")
    return broken


# ------------------------------------------------------------------------ tests

def test_every_page_loads_without_console_errors(pages):
    errors = {name: found["errors"] for name, found in pages.items() if found["errors"]}
    assert not errors, json.dumps(errors, indent=2)


def test_solutions_are_folded_until_clicked(pages, tab, server):
    assert sum(found["solutions"] for found in pages.values()) > 0, "no solutions on any page"
    open_at_load = {name: found["open_solutions"] for name, found in pages.items() if found["open_solutions"]}
    assert not open_at_load, f"solutions visible before a click: {open_at_load}"

    # A reader clicks the first solution's title, and it opens.
    tab.open(server.base_url + "why-lightning.html")
    tab.page.locator(".admonition.solution .admonition-title").first.click()
    tab.page.wait_for_function(f"({INSPECT}).open_solutions.length > 0", timeout=5000)
    assert len(tab.page.evaluate(INSPECT)["open_solutions"]) == 1, "clicking a solution's title opened more"


def test_every_code_block_has_a_copy_button(pages):
    assert sum(found["code_blocks"] for found in pages.values()) > 0, "no code blocks on any page"
    missing = {name: found["code_without_copy_button"]
               for name, found in pages.items() if found["code_without_copy_button"]}
    assert not missing, json.dumps(missing, indent=2)


def test_internal_links_and_downloads_resolve(pages, server):
    links = [link for found in pages.values() for link in found["links"]]
    assert any("_downloads/" in link for link in links), "no download links found"
    broken = broken_links(links, pages, server.base_url)
    assert not broken, "\n".join(broken)
    # Nothing the pages loaded themselves (scripts, styles, images) was missing either.
    assert not [e for e in server.errors if not e[0].endswith("favicon.ico")], server.errors


def test_images_load(pages):
    assert sum(found["images"] for found in pages.values()) > 0, "no images found on any page"
    broken = {name: found["broken_images"] for name, found in pages.items() if found["broken_images"]}
    assert not broken, json.dumps(broken, indent=2)


def test_the_checks_catch_a_broken_page(site, server, tab):
    """A page with a script error, a missing image, a dead link and a bare code block."""
    selftest = site / "_selftest"
    selftest.mkdir(exist_ok=True)
    (selftest / "broken.html").write_text(
        '<!doctype html><html><body>'
        '<img src="no-such-image.png"><a href="../no-such-page.html">dead</a>'
        '<a href="../index.html#no-such-anchor">anchor</a>'
        '<div class="highlight"><pre>$ echo no copy button</pre></div>'
        '<script>throw new Error("deliberate failure")</script>'
        '</body></html>', encoding="utf-8")
    index = inspect(tab, server.base_url + "index.html")
    found = inspect(tab, server.base_url + "_selftest/broken.html")

    assert any("deliberate failure" in e for e in found["errors"])
    # A file the page asked for and did not get is a console error too.
    assert any("404" in e and "no-such-image.png" in e for e in found["errors"]), found["errors"]
    assert found["broken_images"] == ["no-such-image.png"]
    assert found["code_without_copy_button"] == ["$ echo no copy button"]
    broken = "\n".join(broken_links(found["links"], {"index.html": index}, server.base_url))
    assert "no-such-page.html: HTTP 404" in broken
    assert "no element with id 'no-such-anchor'" in broken


def test_copy_button_copies_a_continued_command_whole(tab, server):
    """A long command goes on over indented lines after a line that ends in a backslash.
    A reader's click on the copy button copies all its lines without the prompt, and leaves
    the output shown after it behind."""
    tab.open(server.base_url + "training-pipeline.html")
    shown = tab.page.evaluate(r"""(() => {
        // The first console block with a continued command and an output line after it.
        const pre = [...document.querySelectorAll("div.highlight-console pre")].find(p => {
            const lines = p.textContent.split("\n");
            return lines.some(l => l.startsWith("$ ") && l.endsWith("\\"))
                && lines.some((l, i) => l.trim() && !l.startsWith("$ ") && !(lines[i - 1] || "").endsWith("\\"));
        });
        pre.closest("div.highlight").querySelector("button.copybtn").id = "copy-under-test";
        // clipboard.js copies from a text area of its own; its value is what lands on the clipboard.
        window.copied = [];
        document.addEventListener("copy", event => window.copied.push(event.target.value));
        return pre.textContent;
    })()""")
    tab.page.click("#copy-under-test")
    tab.page.wait_for_function("window.copied.length > 0", timeout=5000)
    # What a reader pastes: the "$ " lines less the prompt, each with the lines that continue it.
    expected, continues = [], False
    for line in shown.splitlines():
        if continues or line.startswith("$ "):
            expected.append(line if continues else line.removeprefix("$ "))
            continues = line.endswith("\\")
    assert 1 < len(expected) < len(shown.splitlines()), f"not a continued command with output:\n{shown}"
    assert tab.page.evaluate("window.copied") == ["\n".join(expected)]
