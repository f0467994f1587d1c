"""The report as a reader gets it: the HTML page in headless Chromium, the PDF through poppler.

Skipped only where the binaries are absent (CI installs Debian's chromium and poppler-utils).
"""

from __future__ import annotations

import contextlib
import http.server
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gradflow.report import load_runs, plan

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
needs_poppler = pytest.mark.skipif(shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None,
                                   reason="poppler-utils not installed")

# Written into a copy of the page (the report itself has no script): after load, record how many
# images there are, which did not decode and which sections are visible.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0));
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", bad.map(i => i.alt || i.src.slice(0, 40)).join("|"));
  const secs = Array.from(document.querySelectorAll("section")).filter(s => s.getBoundingClientRect().height > 0);
  document.body.setAttribute("data-visible-sections", secs.map(s => s.id).join(","));

});
</script>"""

FAILED_LOAD = re.compile(r"Failed to load resource|net::ERR_|Not allowed to load local resource|"
                         r"Refused to (load|connect)|ERR_FILE_NOT_FOUND", re.I)


class Body(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs = {}
        self.ids = set()
        self.imgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.attrs = a
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs += 1


@contextlib.contextmanager
def serve(root: Path):
    """A local HTTP server on ``root`` recording every path requested (the page must need none but
    itself: a request for anything else is a resource the self-contained report failed to inline)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/", requests
    finally:
        srv.shutdown()
        srv.server_close()


def chromium(args, tmp_path, timeout=90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_html_renders_in_chromium_with_every_section_and_figure(built, tmp_path):
    paths, study = built
    html = paths["html"]
    probe = html.with_name("probe.html")
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        with serve(html.parent) as (url, requests):
            out = chromium(["--virtual-time-budget=15000", "--dump-dom", url + "probe.html"], tmp_path)
    finally:
        probe.unlink()
    assert out.returncode == 0, out.stderr[-2000:]
    dom = Body()
    dom.feed(out.stdout)
    sections, omitted = plan(load_runs([study]))
    n_fig = sum(s.draw is not None for s in sections)
    assert dom.attrs.get("data-images") == str(n_fig), out.stdout[:500]
    assert dom.attrs.get("data-broken") == ""
    # the page asked the server for nothing but itself (the browser may ask for a favicon)
    assert set(requests) - {"/favicon.ico"} == {"/probe.html"}, requests
    visible = set(dom.attrs["data-visible-sections"].split(","))
    assert {s.id for s in sections} | {"runs", "data"} <= visible
    assert {f"fig-{s.id}" for s in sections if s.draw is not None} <= dom.ids
    assert not FAILED_LOAD.search(out.stderr), FAILED_LOAD.search(out.stderr).group(0)


@needs_poppler
def test_pdf_pages_convert_and_hold_every_section(built, tmp_path):
    paths, study = built
    pdf = paths["pdf"]
    sections, omitted = plan(load_runs([study]))
    subprocess.run(["pdftoppm", "-png", "-r", "20", str(pdf), str(tmp_path / "page")], check=True, timeout=120)
    pngs = sorted(tmp_path.glob("page-*.png"))
    # title page, one page per section (each table fits beside its figure here), the raw-table page
    assert len(pngs) == 1 + len(sections) + 1
    assert all(p.stat().st_size > 1000 for p in pngs)
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    pages = text.split("\f")
    assert "Contents" in pages[0] and "Runs that did not finish normally" in pages[0]
    assert "irnn: diverged at step 60" in pages[0]
    for i, s in enumerate(sections, 1):
        page = pages[i]
        assert f"{i}. {s.title}" in page
        assert re.search(rf"{re.escape(s.title)}\s+page {i + 1}", pages[0])  # contents point at it
        first_words = " ".join(s.explanation.split()[:6])
        assert first_words in " ".join(page.split())
    assert "Raw tables" in pages[len(sections) + 1]
    assert f"page {len(pngs)} of {len(pngs)}" in pages[len(pngs) - 1]
