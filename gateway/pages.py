"""The static pages of the edge: the demo shop (/), the embeddable widget (/widget.js) and the agent console."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent / "web"

# Only a plain host[:port] goes into the CSP; anything else (spaces, `;`) would let a Host header add directives.
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    file: str
    content_type: str
    framable: bool
    """The shop page and the widget may be embedded by other sites; the console never."""
    cache_control: str
    cross_origin: bool = False
    """widget.js is loaded by customers' sites: readable from any origin (CORS, CORP)."""


PAGES = (
    Page("/", "shop.html", "text/html", framable=True, cache_control="no-cache"),
    Page("/shop.css", "shop.css", "text/css", framable=True, cache_control="public, max-age=300"),
    Page("/widget.js", "widget.js", "text/javascript", framable=True,
         cache_control="public, max-age=300, stale-while-revalidate=86400", cross_origin=True),
    Page("/console/", "console/index.html", "text/html", framable=False, cache_control="no-cache"),
    Page("/console/console.js", "console/console.js", "text/javascript", framable=False,
         cache_control="no-cache"),
    Page("/console/knowledge.js", "console/knowledge.js", "text/javascript", framable=False,
         cache_control="no-cache"),
    Page("/console/console.css", "console/console.css", "text/css", framable=False, cache_control="no-cache"),
)


def content_security_policy(host: str, framable: bool) -> str:
    """No inline script, no other origin; the live chat's WebSocket on this same host."""
    connect = "'self'"
    if _HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"  # older engines do not count ws: as 'self'
    directives = [
        "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
        "font-src 'self'", f"connect-src {connect}", "base-uri 'none'", "form-action 'self'",
        "manifest-src 'self'",
    ]
    if not framable:
        directives.append("frame-ancestors 'none'")
    return "; ".join(directives)


def security_headers(request: web.Request, page: Page) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": content_security_policy(request.host, page.framable),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": page.cache_control,
    }
    if not page.framable:
        headers["X-Frame-Options"] = "DENY"
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if page.cross_origin:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    else:
        headers["Cross-Origin-Resource-Policy"] = "same-origin"
    return headers


def page_handler(page: Page) -> Callable[[web.Request], Awaitable[web.Response]]:
    # Read once at start: the files belong to the release, like the code that serves them.
    body = (WEB_DIR / page.file).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    async def serve(request: web.Request) -> web.Response:
        headers = security_headers(request, page)
        headers["ETag"] = etag
        if etag in (tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=page.content_type, charset="utf-8", headers=headers)

    return serve


async def console_redirect(request: web.Request) -> web.Response:
    # Returned, not raised: the middleware then gives it X-Request-Id like any answer. The browser carries a
    # fragment (#token=...) over to the new location by itself; it never reaches a server.
    return web.Response(status=308, headers={"Location": "/console/"})


def setup_pages(app: web.Application) -> None:
    """Register the page routes; each answers with the security headers of its kind."""
    for page in PAGES:
        app.router.add_get(page.path, page_handler(page))
    app.router.add_get("/console", console_redirect)
