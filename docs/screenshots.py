"""Take the README's screenshots: docs/images/widget.png and docs/images/console.png.

    .venv/bin/python docs/screenshots.py

Starts the real stack in a temporary directory (tenant `demo` may get widget tokens), then drives Debian's
headless Chromium with Playwright: an agent ("Alice") opens the console; in a second browser context a
visitor on the shop page asks the widget a question, waits for the AI's answer and asks for a human; the
agent claims the conversation and replies; once the visitor sees the reply, both pages are saved. The stack
is stopped at the end, whatever happens.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright  # noqa: E402

from devtools.mint_token import mint  # noqa: E402
from tests.browser.browser_helpers import stored_state  # noqa: E402
from tests.e2e.stack_helpers import SECRET, start_stack  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
IMAGES = REPO_ROOT / "docs" / "images"
TENANT = "demo"
QUESTION = "下单后多久发货？"
AGENT_NAME = "Alice"
AGENT_REPLY = "您好，我是客服 Alice，请问有什么可以帮您？"
WAIT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 800}


def messages(page: Page, testid: str, sender: str) -> Locator:
    return page.locator(f"[data-testid={testid}][data-sender={sender}]")


def visitor_asks_for_a_human(browser: Browser, base_url: str) -> tuple[Page, str]:
    page = browser.new_context(viewport=VIEWPORT, locale="zh-CN").new_page()
    page.goto(f"{base_url}/")
    page.get_by_test_id("kefu-launcher").click()  # Playwright's locators pierce the widget's open shadow root
    page.get_by_test_id("kefu-input").fill(QUESTION)
    page.get_by_test_id("kefu-send").click()
    answer = messages(page, "kefu-message", "ai")
    expect(answer).to_have_count(1, timeout=WAIT_MS)
    expect(answer).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)  # the stream has finished
    page.get_by_test_id("kefu-handoff").click()
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "waiting_human", timeout=WAIT_MS)
    conversation_id = str(stored_state(page).get("conversationId") or "")
    if not conversation_id:
        raise RuntimeError("the widget stored no conversation id")
    return page, conversation_id


def open_console(browser: Browser, base_url: str) -> Page:
    """An agent online before the visitor asks for a human (otherwise the visitor gets the "no agent" notice)."""
    token = mint(SECRET, tenant=TENANT, subject="alice", role="agent", ttl_s=3600, name=AGENT_NAME)
    page = browser.new_context(viewport=VIEWPORT, locale="zh-CN").new_page()
    page.goto(f"{base_url}/console/#token={token}")
    expect(page.get_by_test_id("console-connection")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
    return page


def claim_and_reply(page: Page, conversation_id: str) -> None:
    item = page.locator(f"[data-testid=console-queue-item][data-conversation-id='{conversation_id}']")
    expect(item).to_be_visible(timeout=WAIT_MS)
    item.click()
    expect(messages(page, "console-message", "ai")).to_have_count(1, timeout=WAIT_MS)  # the history is shown
    page.get_by_test_id("console-claim").click()
    expect(page.get_by_test_id("console-status")).to_have_attribute("data-status", "human", timeout=WAIT_MS)
    page.get_by_test_id("console-input").fill(AGENT_REPLY)
    page.get_by_test_id("console-send").click()
    sent = messages(page, "console-message", "agent")
    expect(sent).to_have_count(1, timeout=WAIT_MS)
    expect(sent).not_to_have_attribute("data-pending", "", timeout=WAIT_MS)  # stored: acked by the edge


def main() -> None:
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: `apt-get install chromium`")
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kefu-screenshots-") as data_dir:
        stack = start_stack(Path(data_dir), {"KEFU_WIDGET_TENANTS": TENANT, "KEFU_CACHE_ENABLED": "false"})
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    console = open_console(browser, stack.base_url)
                    visitor, conversation_id = visitor_asks_for_a_human(browser, stack.base_url)
                    claim_and_reply(console, conversation_id)
                    reply = messages(visitor, "kefu-message", "agent").locator(".text")
                    expect(reply).to_have_text([AGENT_REPLY], timeout=WAIT_MS)
                    expect(visitor.get_by_test_id("kefu-status")).to_contain_text(AGENT_NAME, timeout=WAIT_MS)
                    for page in (visitor, console):
                        page.mouse.move(0, 0)  # no hover effect in the pictures
                        page.evaluate("() => document.activeElement && document.activeElement.blur()")
                    visitor.screenshot(path=str(IMAGES / "widget.png"), scale="css", animations="disabled")
                    console.screenshot(path=str(IMAGES / "console.png"), scale="css", animations="disabled")
                finally:
                    browser.close()
        finally:
            stack.stop()
    for name in ("widget.png", "console.png"):
        path = IMAGES / name
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
