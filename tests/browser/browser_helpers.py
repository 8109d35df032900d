"""Helpers of the browser tests: pages screenshotted on failure, agent tokens, a customer site, a TCP relay."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Page

from devtools.mint_token import mint
from tests.e2e.stack_helpers import SECRET

OUTPUT = Path(__file__).resolve().parent / "output"
TENANT = "demo"


def _held_port() -> socket.socket:
    """A loopback port kept bound (not listening, SO_REUSEPORT) from collection on: the browser tests run minutes
    later, and a port merely seen free then was taken meanwhile (CI: EADDRINUSE); while this socket holds it, no
    other socket gets it. CustomerSite listens on it beside this one."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    return held


CUSTOMER_PORT_HOLD = _held_port()
"""Closed at the end of the session (tests/browser/conftest.py)."""
CUSTOMER_PORT = CUSTOMER_PORT_HOLD.getsockname()[1]
CUSTOMER_ORIGIN = f"http://localhost:{CUSTOMER_PORT}"
"""A customer's site on another origin that embeds the widget from the edge (see `serve_customer_page`)."""


class BrowserPages:
    """Contexts opened by one test (one per person), screenshotted and logged if the test fails."""

    def __init__(self, browser: Browser, test_name: str) -> None:
        self._browser = browser
        self._name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
        self.pages: dict[str, Page] = {}
        self.logs: dict[str, list[str]] = {}
        self.contexts: list[BrowserContext] = []

    def open(self, who: str, *, width: int = 1280, height: int = 800) -> Page:
        context = self._browser.new_context(viewport={"width": width, "height": height}, locale="zh-CN")
        self.contexts.append(context)
        page = context.new_page()
        log = self.logs.setdefault(who, [])
        page.on("console", lambda message: log.append(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: log.append(f"pageerror: {error}"))
        self.pages[who] = page
        return page

    def save_failure_artifacts(self) -> None:
        OUTPUT.mkdir(exist_ok=True)
        for who, page in self.pages.items():
            try:
                page.screenshot(path=str(OUTPUT / f"{self._name}-{who}.png"), full_page=True)
            except Exception as error:  # a crashed page still gets its log written
                self.logs.setdefault(who, []).append(f"screenshot failed: {error}")
            (OUTPUT / f"{self._name}-{who}.log").write_text("\n".join(self.logs.get(who, [])), encoding="utf-8")

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def csp_violations(pages: BrowserPages) -> list[str]:
    return [line for lines in pages.logs.values() for line in lines
            if "Content Security Policy" in line or "Refused to" in line]


def agent_token(sub: str = "agent-1", name: str = "Alice") -> str:
    return mint(SECRET, tenant=TENANT, subject=sub, role="agent", ttl_s=3600, name=name)


# ---- a TCP relay between the browser and the edge that the test can cut for real --------------------------

class Relay:
    """127.0.0.1:<port> -> the edge. `cut()` closes every open connection and refuses new ones; `restore()`."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
            if down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        with self._lock:
            self._down = True
            sockets = list(self._open)
        for sock in sockets:
            self._drop(sock)

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


class CustomerSite:
    """One HTML page on CUSTOMER_ORIGIN: a real loopback server, as Chromium refuses a public-looking origin
    (a routed one) to load from a private address (Private Network Access)."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_port = True  # beside CUSTOMER_PORT_HOLD

        self._server = Server(("127.0.0.1", CUSTOMER_PORT), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def stored_state(page: Page) -> dict[str, object]:
    """What the widget keeps in localStorage (token, visitor, conversation, last seq, outbox); {} before it ran."""
    state: dict[str, object] = page.evaluate("""() => {
        const key = Object.keys(localStorage).find(k => k.startsWith('kefu:demo:'));
        return key ? JSON.parse(localStorage.getItem(key)) : {};
    }""")
    return state
