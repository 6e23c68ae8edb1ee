"""`/docs` (Swagger UI) and `/redoc` (ReDoc) work offline: their JavaScript and CSS come from the
service, and a real headless Chromium, with every host but the service's unresolvable, renders the
endpoints from them.

Chromium is Debian's `chromium` package (CI installs it). Without it these tests skip, unless the
`CI` environment variable is set: there a missing browser is a failure, not a silent skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.integration.conftest import ServedApp

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/images/generations", "/v1/models")
ASSETS = {
    "/docs/static/swagger-ui-bundle.js": "text/javascript",
    "/docs/static/swagger-ui.css": "text/css",
    "/docs/static/redoc.standalone.js": "text/javascript",
    "/docs/static/favicon.png": "image/png",
}
# Where a page names what it loads: <script src>, <link href> (stylesheets, icons), CSS @import.
LOADED = re.compile(
    r"<script\b[^>]*\bsrc=[\"']([^\"']+)|<link\b[^>]*\bhref=[\"']([^\"']+)|@import\s+(?:url\()?[\"']?([^\"')\s;]+)",
    re.IGNORECASE,
)
SCRIPTS = re.compile(r"<script\b.*?</script>", re.IGNORECASE | re.DOTALL)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "chromium is not installed (Debian: apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it (.ci/run does)")
    pytest.skip(reason)


def rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium. Every host name resolves to
    nothing (127.0.0.1 excepted), so a page that needs a CDN renders nothing here."""
    with tempfile.TemporaryDirectory(prefix="voltage-chromium-") as profile:
        result = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def external_loads(html: str, page_url: str) -> list[str]:
    """What the page loads (scripts, stylesheets, icons) from any host other than its own."""
    own = urlsplit(page_url).netloc
    found = (next(g for g in m.groups() if g) for m in LOADED.finditer(html))
    absolute = (urljoin(page_url, ref) for ref in found if not ref.startswith("data:"))
    return [ref for ref in absolute if urlsplit(ref).netloc != own]


@pytest.mark.parametrize("path", sorted(ASSETS))
def test_assets_are_served_without_a_key(served: ServedApp, path: str) -> None:
    r = httpx.get(served.base_url + path, timeout=30)
    assert r.status_code == 200, r.text[:200]
    assert r.headers["content-type"].split(";")[0] == ASSETS[path]
    assert len(r.content) > 1000


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_nothing_from_other_hosts(served: ServedApp, page: str) -> None:
    url = served.base_url + page
    r = httpx.get(url, timeout=30)  # no API key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = external_loads(r.text, url)
    assert not refs, f"{page} loads from other hosts: {refs}"
    own = [m for m in LOADED.finditer(r.text) if "/docs/static/" in m.group(0)]
    assert own, f"{page} names none of the service's own assets:\n{r.text}"


def test_swagger_ui_renders_the_endpoints(served: ServedApp) -> None:
    url = served.base_url + "/docs"
    dom = rendered_dom(url)
    assert not external_loads(dom, url)
    # Swagger UI's JS builds one `opblock` per operation; the page as served has none.
    for path in ENDPOINTS:
        assert f'class="opblock-summary-path" data-path="{path}"' in dom, (path, dom[-3000:])


def test_redoc_renders_the_endpoints(served: ServedApp) -> None:
    url = served.base_url + "/redoc"
    dom = rendered_dom(url)
    assert not external_loads(dom, url)
    # ReDoc's JS renders each operation as a verb badge followed by its path; scripts (where the
    # bundle itself lives) are dropped first, so only rendered text can match.
    text = SCRIPTS.sub("", dom)
    for path in ENDPOINTS:
        rendered = re.search(rf"http-verb[^>]*>\w+</span><span[^>]*>{re.escape(path)}</span>", text)
        assert rendered, (path, text[-3000:])
