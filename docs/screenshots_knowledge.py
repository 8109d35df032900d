"""Take the README's knowledge-base screenshots: docs/images/knowledge.png and docs/images/widget-citations.png.

    .venv/bin/python docs/screenshots_knowledge.py

Starts the real stack in a temporary directory with the demo tenant's documents (the seed folder `make run`
uses), then drives Debian's headless Chromium with Playwright: an admin opens the console's Knowledge page,
uploads a Markdown page with the file picker, waits until every document is ready and asks the try box a
question; in a second browser context a visitor on the shop page asks the widget a question and waits for the
answer with its source. Both pages are saved; the stack is stopped at the end, whatever happens.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from devtools.devstack.__main__ import DEMO_KNOWLEDGE  # noqa: E402
from devtools.mint_token import mint  # noqa: E402
from tests.e2e.stack_helpers import SECRET, start_stack  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
IMAGES = REPO_ROOT / "docs" / "images"
TENANT = "demo"
WAIT_MS = 60_000
VIEWPORT = {"width": 1280, "height": 800}
TEAWARE = """# 茶具保修 Teaware warranty

紫砂壶和玻璃茶具自签收之日起保修一年，人为摔碎不在保修范围内。

## 如何申请保修

拍下茶具的照片发给客服，并写上订单号，我们会在两个工作日内回复。
"""
TRY_QUESTION = "茶具保修期多长？"
VISITOR_QUESTION = "玻璃茶具保修多久？"


def knowledge_page(browser: Browser, base_url: str) -> Page:
    token = mint(SECRET, tenant=TENANT, subject="ada", role="admin", ttl_s=3600, name="Ada")
    page = browser.new_context(viewport=VIEWPORT, locale="zh-CN").new_page()
    page.goto(f"{base_url}/console/#token={token}")
    expect(page.get_by_test_id("console-connection")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
    page.get_by_test_id("console-knowledge-tab").click()
    page.get_by_test_id("kb-upload-url").fill("https://shop.example/policies/teaware-warranty")
    page.get_by_test_id("kb-upload-input").set_input_files(
        {"name": "teaware-warranty.md", "mimeType": "text/markdown", "buffer": TEAWARE.encode()})
    documents = page.get_by_test_id("kb-document")
    expect(documents).to_have_count(4, timeout=WAIT_MS)  # the three seeded ones and the upload
    for index in range(4):
        expect(documents.nth(index)).to_have_attribute("data-status", "ready", timeout=WAIT_MS)
    page.get_by_test_id("kb-try-input").fill(TRY_QUESTION)
    page.get_by_test_id("kb-try-send").click()
    expect(page.get_by_test_id("kb-citation").first).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_test_id("kb-passage").first).to_be_visible()
    return page


def widget_with_sources(browser: Browser, base_url: str) -> Page:
    page = browser.new_context(viewport=VIEWPORT, locale="zh-CN").new_page()
    page.goto(f"{base_url}/")
    page.get_by_test_id("kefu-launcher").click()
    page.get_by_test_id("kefu-input").fill(VISITOR_QUESTION)
    page.get_by_test_id("kefu-send").click()
    answer = page.locator("[data-testid=kefu-message][data-sender=ai]")
    expect(answer.get_by_test_id("kefu-citation").first).to_be_visible(timeout=WAIT_MS)
    return page


def main() -> None:
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: `apt-get install chromium`")
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kefu-screenshots-") as data_dir:
        stack = start_stack(Path(data_dir), {"KEFU_WIDGET_TENANTS": TENANT, "KEFU_CACHE_ENABLED": "false",
                                             "KEFU_KB_SEED_DIR": str(DEMO_KNOWLEDGE)})
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    console = knowledge_page(browser, stack.base_url)
                    visitor = widget_with_sources(browser, stack.base_url)
                    for page in (visitor, console):
                        page.mouse.move(0, 0)  # no hover effect in the pictures
                        page.evaluate("() => document.activeElement && document.activeElement.blur()")
                    console.screenshot(path=str(IMAGES / "knowledge.png"), scale="css", animations="disabled")
                    visitor.screenshot(path=str(IMAGES / "widget-citations.png"), scale="css",
                                       animations="disabled")
                finally:
                    browser.close()
        finally:
            stack.stop()
    for name in ("knowledge.png", "widget-citations.png"):
        path = IMAGES / name
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
