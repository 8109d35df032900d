"""gateway/pages.py: the static pages, their security headers, caching, and the widget's size budget."""

from __future__ import annotations

import gzip
import re
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from devtools.devstack.stack import free_port
from gateway.app import create_app
from gateway.pages import PAGES, WEB_DIR, Page, content_security_policy
from gateway.settings import GatewaySettings

EdgeClient = TestClient[web.Request, web.Application]

ClientFactory = Callable[[web.Application], Awaitable[EdgeClient]]
WIDGET_BUDGET_BYTES = 30 * 1024


def settings() -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"  # no page needs a backend
    return GatewaySettings(jwt_secret="test-secret-that-is-long-enough-for-hs256", session_addr=dead,
                           moderation_addr=dead, worker_addr=dead, nats_url=f"nats://{dead}")


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> EdgeClient:
    return await aiohttp_client(create_app(settings()))


def directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.path)
async def test_pages_are_served_with_security_headers(client: EdgeClient, page: Page) -> None:
    response = await client.get(page.path)
    assert response.status == 200
    assert response.content_type == page.content_type
    assert await response.read() == (WEB_DIR / page.file).read_bytes()
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "X-Request-Id" in response.headers and "Cache-Control" in response.headers
    policy = directives(response.headers["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'", f"ws://{client.host}:{client.port}", f"wss://{client.host}:{client.port}"]
    assert not any("unsafe" in value for values in policy.values() for value in values)


async def test_pages_console_is_never_framed_the_shop_may_be(client: EdgeClient) -> None:
    console = await client.get("/console/")
    assert console.headers["X-Frame-Options"] == "DENY"
    assert directives(console.headers["Content-Security-Policy"])["frame-ancestors"] == ["'none'"]
    shop = await client.get("/")
    assert "X-Frame-Options" not in shop.headers
    assert "frame-ancestors" not in directives(shop.headers["Content-Security-Policy"])


async def test_pages_widget_is_loadable_cross_site_and_cacheable(client: EdgeClient) -> None:
    response = await client.get("/widget.js", headers={"Origin": "https://shop.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert "max-age=" in response.headers["Cache-Control"]
    again = await client.get("/widget.js", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""


async def test_pages_console_path_without_slash_redirects(client: EdgeClient) -> None:
    response = await client.get("/console", allow_redirects=False)
    assert response.status == 308 and response.headers["Location"] == "/console/"


def test_pages_csp_ignores_a_host_header_that_would_add_directives() -> None:
    assert "evil" not in content_security_policy("a; script-src evil", framable=True)
    assert "ws://[::1]:8080" in content_security_policy("[::1]:8080", framable=True)


def test_pages_widget_is_under_its_size_budget() -> None:
    size = len(gzip.compress((WEB_DIR / "widget.js").read_bytes(), compresslevel=9))
    assert size < WIDGET_BUDGET_BYTES, f"widget.js is {size} bytes gzipped"


def test_pages_have_no_inline_script_or_style_and_no_external_url() -> None:
    for path in WEB_DIR.rglob("*.html"):
        html = path.read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"{path.name}: inline script"
        assert "<style" not in html and " style=" not in html, f"{path.name}: inline style"
        assert not re.search(r"\son[a-z]+=", html), f"{path.name}: inline event handler"
    for path in WEB_DIR.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            # Only the SVG namespace name is an absolute URL; nothing is downloaded from another origin.
            assert set(re.findall(r"https?://[^\s'\"<>)]+", text)) <= {"http://www.w3.org/2000/svg"}, path.name


def test_pages_scripts_never_write_html() -> None:
    """All text goes in with textContent: no innerHTML, outerHTML, insertAdjacentHTML or document.write."""
    for path in WEB_DIR.rglob("*.js"):
        code = path.read_text(encoding="utf-8")
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function",
                             code), path.name
