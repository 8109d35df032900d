"""Browser tests: the real system, Debian's headless Chromium driven by Playwright, a TCP relay the test can cut."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from devtools.devstack.stack import Stack
from tests.browser.browser_helpers import CUSTOMER_ORIGIN, CUSTOMER_PORT_HOLD, TENANT, BrowserPages, Relay
from tests.e2e.stack_helpers import faq_plugins_env, start_stack

CHROMIUM = "/usr/bin/chromium"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"report_{report.when}", report)  # read by the `browser_pages` fixture to screenshot failures
    return report


@pytest.fixture(scope="session", autouse=True)
def customer_port_released() -> Iterator[None]:
    """The customer site's port is held for the whole run, let go at its end."""
    yield
    CUSTOMER_PORT_HOLD.close()


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole system with the widget enabled for the demo tenant (the knowledge base answers)."""
    data_dir = tmp_path_factory.mktemp("web-stack")
    stack = start_stack(data_dir, {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_WIDGET_TENANTS": TENANT, "KEFU_CACHE_ENABLED": "false",
        "KEFU_CORS_ORIGINS": CUSTOMER_ORIGIN, **faq_plugins_env(data_dir)})
    try:
        yield stack
    finally:
        stack.stop()


# Module scope, not session: while Playwright's sync driver runs, its event loop counts as running in this
# thread, and every asyncio test after it would fail with "Cannot run the event loop while another loop is running".
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Debian's chromium: Playwright's own browser download is not reachable from these machines.
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `apt-get install chromium` (make test does it)")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def browser_pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[BrowserPages]:
    pages = BrowserPages(browser, request.node.name)
    try:
        yield pages
    finally:
        failed = any(getattr(request.node, f"report_{when}", None) is not None
                     and getattr(request.node, f"report_{when}").failed for when in ("setup", "call"))
        if failed:
            pages.save_failure_artifacts()
        pages.close()


@pytest.fixture
def relay(web_stack: Stack) -> Iterator[Relay]:
    relay = Relay(web_stack.config.ports.http)
    try:
        yield relay
    finally:
        relay.close()

