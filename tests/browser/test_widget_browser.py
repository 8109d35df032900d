"""The visitor widget on the demo shop page, in headless Chromium against the real system."""

from __future__ import annotations

import time

import jwt
import pytest
from playwright.sync_api import Locator, Page, expect

from devtools.devstack.stack import Stack
from tests.browser.browser_helpers import (
    CUSTOMER_ORIGIN,
    BrowserPages,
    CustomerSite,
    Relay,
    csp_violations,
    stored_state,
)

pytestmark = pytest.mark.timeout(300)

QUESTION = "下单后多久发货？"
ANSWER_PART = "下午4点前付款的订单当天发货"
WAIT_MS = 30_000


def open_shop(pages: BrowserPages, stack: Stack, who: str = "visitor", base_url: str | None = None,
              **viewport: int) -> Page:
    page = pages.open(who, **viewport)
    page.goto(f"{base_url or stack.base_url}/")
    return page


def open_widget(page: Page) -> None:
    page.get_by_test_id("kefu-launcher").click()
    expect(page.get_by_test_id("kefu-input")).to_be_visible()


def say(page: Page, text: str) -> None:
    page.get_by_test_id("kefu-input").fill(text)
    page.get_by_test_id("kefu-send").click()


def messages(page: Page, sender: str) -> Locator:
    return page.locator(f"[data-testid=kefu-message][data-sender={sender}]")


def record_ai_text_lengths(page: Page) -> None:
    """Note every length the AI answer's text goes through, so the test can tell a stream from one write."""
    page.evaluate("""() => {
        const root = document.getElementById('kefu-widget').shadowRoot;
        window.__aiLengths = [];
        new MutationObserver(() => {
            const answers = root.querySelectorAll('[data-testid=kefu-message][data-sender=ai] .text');
            if (answers.length) window.__aiLengths.push(answers[answers.length - 1].textContent.length);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")


def test_widget_visitor_asks_and_sees_the_answer_stream_in(web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack)
    open_widget(page)
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "ai", timeout=WAIT_MS)
    record_ai_text_lengths(page)
    say(page, QUESTION)
    expect(messages(page, "visitor").locator(".text")).to_have_text([QUESTION], timeout=WAIT_MS)
    answer = messages(page, "ai")
    expect(answer).to_have_count(1, timeout=WAIT_MS)
    expect(answer.locator(".text")).to_contain_text(ANSWER_PART, timeout=WAIT_MS)
    expect(answer).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    expect(answer.locator(".who")).to_have_text("AI 助手")
    lengths: list[int] = page.evaluate("window.__aiLengths")
    final = len(answer.locator(".text").text_content() or "")
    assert len({n for n in lengths if 0 < n < final}) >= 2, f"the answer did not stream in: {lengths}"
    assert stored_state(page)["conversationId"], "the conversation id is kept for a reload"
    assert csp_violations(browser_pages) == []


def test_widget_reload_keeps_the_conversation(web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack)
    open_widget(page)
    say(page, QUESTION)
    expect(messages(page, "ai").locator(".text")).to_contain_text(ANSWER_PART, timeout=WAIT_MS)
    expect(messages(page, "ai")).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    before = stored_state(page)

    page.reload()
    # The panel was open: it opens again with the whole conversation, each message once.
    expect(messages(page, "visitor").locator(".text")).to_have_text([QUESTION], timeout=WAIT_MS)
    expect(messages(page, "ai")).to_have_count(1, timeout=WAIT_MS)
    expect(messages(page, "ai").locator(".text")).to_contain_text(ANSWER_PART)
    say(page, "运费多少钱？")
    expect(messages(page, "ai")).to_have_count(2, timeout=WAIT_MS)
    expect(messages(page, "ai").nth(1).locator(".text")).to_contain_text("满99元包邮", timeout=WAIT_MS)
    after = stored_state(page)
    assert after["conversationId"] == before["conversationId"]
    assert after["visitorId"] == before["visitorId"]
    assert after["outbox"] == []
    expect(messages(page, "visitor")).to_have_count(2)


def test_widget_shows_html_in_a_message_as_text(web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack)
    open_widget(page)
    html = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    say(page, html)
    visitor = messages(page, "visitor")
    expect(visitor.locator(".text")).to_have_text([html], timeout=WAIT_MS)
    expect(visitor).not_to_have_attribute("data-pending", "", timeout=WAIT_MS)  # the stored copy, not the draft
    expect(messages(page, "ai")).to_have_count(1, timeout=WAIT_MS)
    assert page.evaluate("document.getElementById('kefu-widget').shadowRoot.querySelectorAll('img, b').length") == 0
    assert page.evaluate("window.__pwned") is None


def test_widget_fits_a_phone_screen(web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack, width=375, height=667)
    open_widget(page)
    box = page.locator("#kefu-panel").bounding_box()
    assert box is not None and box["width"] == 375 and box["height"] == 667
    page.get_by_test_id("kefu-input").press("Escape")  # keyboard: Escape closes, focus back on the launcher
    expect(page.locator("#kefu-panel")).to_be_hidden()
    expect(page.get_by_test_id("kefu-launcher")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("kefu-input")).to_be_focused()
    page.keyboard.type(QUESTION)
    page.keyboard.press("Enter")
    expect(messages(page, "ai").locator(".text")).to_contain_text(ANSWER_PART, timeout=WAIT_MS)


def test_widget_answer_cut_mid_stream_arrives_once_after_reconnect(
        web_stack: Stack, relay: Relay, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack, base_url=relay.base_url)
    open_widget(page)
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "ai", timeout=WAIT_MS)
    say(page, QUESTION)
    expect(page.locator("[data-testid=kefu-message][data-streaming]")).to_have_count(1, timeout=WAIT_MS)
    relay.cut()  # the answer is still streaming: the rest is generated and stored without this socket
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "offline", timeout=WAIT_MS)
    relay.restore()
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "ai", timeout=WAIT_MS)
    answer = messages(page, "ai")
    expect(answer).to_have_count(1, timeout=WAIT_MS)
    expect(answer).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    expect(answer.locator(".text")).to_contain_text(ANSWER_PART)
    expect(messages(page, "visitor")).to_have_count(1)


def test_widget_message_typed_while_cut_off_is_sent_once_after_reconnect(
        web_stack: Stack, relay: Relay, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack, base_url=relay.base_url)
    open_widget(page)
    say(page, QUESTION)
    expect(messages(page, "ai")).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    relay.cut()
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "offline", timeout=WAIT_MS)
    say(page, "运费多少钱？")
    expect(messages(page, "visitor").nth(1)).to_have_attribute("data-pending", "", timeout=WAIT_MS)
    outbox = stored_state(page)["outbox"]
    assert isinstance(outbox, list) and len(outbox) == 1
    relay.restore()
    expect(messages(page, "ai")).to_have_count(2, timeout=WAIT_MS)
    expect(messages(page, "ai").nth(1).locator(".text")).to_contain_text("满99元包邮", timeout=WAIT_MS)
    expect(messages(page, "visitor")).to_have_count(2)
    expect(messages(page, "visitor").nth(1)).not_to_have_attribute("data-pending", "")
    assert stored_state(page)["outbox"] == []


HOSTILE_PAGE = """<!doctype html><html><head><style>
* { color: red !important; font-size: 40px !important; font-family: serif !important; }
button, textarea, div { display: block; border: 9px solid lime !important; background: yellow !important; }
</style></head><body><h1>A customer's own site</h1>
<script src="{edge}/widget.js" data-tenant="demo" data-lang="en" data-title="Tea help"></script></body></html>"""


def test_widget_embedded_cross_site_keeps_its_own_look_and_speaks_english(
        web_stack: Stack, browser_pages: BrowserPages) -> None:
    site = CustomerSite(HOSTILE_PAGE.replace("{edge}", web_stack.base_url))
    try:
        page = browser_pages.open("customer-site")
        page.goto(f"{CUSTOMER_ORIGIN}/")
        embedded_widget_answers_in_english(page)
    finally:
        site.close()


def embedded_widget_answers_in_english(page: Page) -> None:
    open_widget(page)
    send = page.get_by_test_id("kefu-send")
    expect(send).to_have_text("Send")
    expect(page.get_by_test_id("kefu-handoff")).to_have_text("Talk to a human")
    expect(page.get_by_role("dialog", name="Tea help")).to_be_visible()
    style = send.evaluate("b => { const s = getComputedStyle(b); return [s.color, s.fontSize, s.borderTopWidth]; }")
    assert style == ["rgb(255, 255, 255)", "14px", "0px"], style  # the host page's CSS does not reach in
    say(page, "How long does shipping take?")
    expect(messages(page, "ai").locator(".text")).to_contain_text("ship the same day", timeout=WAIT_MS)
    expect(messages(page, "ai").locator(".who")).to_have_text(["AI assistant"])


def test_widget_return_visit_after_the_token_expired_renews_it_and_continues(
        web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_shop(browser_pages, web_stack)
    open_widget(page)
    say(page, QUESTION)
    expect(messages(page, "ai")).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    before = stored_state(page)

    # An hour past the token's expiry for the page: the widget asks for a new one with the old one.
    expires = jwt.decode(str(before["token"]), options={"verify_signature": False})["exp"]
    skew_ms = int((expires - time.time() + 3600) * 1000)
    page.context.add_init_script(f"{{ const now = Date.now; Date.now = () => now() + {skew_ms}; }}")
    with page.expect_request(lambda request: request.url.endswith("/v1/widget/token"),
                             timeout=WAIT_MS) as renewal:
        page.reload()
    expect(messages(page, "ai")).to_have_count(1, timeout=WAIT_MS)
    expect(messages(page, "visitor").locator(".text")).to_have_text([QUESTION])
    assert renewal.value.headers.get("authorization") == f"Bearer {before['token']}"
    after = stored_state(page)
    assert (after["visitorId"], after["conversationId"]) == (before["visitorId"], before["conversationId"])
