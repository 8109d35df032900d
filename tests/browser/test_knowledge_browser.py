"""The knowledge base in the browser: the console's Knowledge page, and the sources under AI answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from playwright.sync_api import FilePayload, Locator, Page, expect

from devtools.devstack.stack import Stack
from devtools.mint_token import mint
from tests.browser.browser_helpers import TENANT, BrowserPages, agent_token, csp_violations, stored_state
from tests.e2e.stack_helpers import SECRET, start_stack

pytestmark = pytest.mark.timeout(300)

WAIT_MS = 30_000
WARRANTY_URL = "https://shop.example/policies/warranty"
WARRANTY_MD = """# 茶具保修 Teaware warranty

紫砂壶和玻璃茶具自签收之日起保修一年，人为摔碎不在保修范围内。<img src=x onerror="window.__pwned=1">

## 如何申请保修

拍下茶具的照片发给客服，并写上订单号，我们会在两个工作日内回复。
"""
WARRANTY_QUESTION = "紫砂壶保修多久？"
WARRANTY_ANSWER = "保修一年"
POINTS_TITLE = "会员积分 <i>VIP</i>"
POINTS_URL = "https://shop.example/members/points"
POINTS_TEXT = """# 会员积分

每消费1元积1分。积分可以在结算时抵扣货款，每100积分抵扣1元，积分有效期两年。
"""
POINTS_QUESTION = "积分可以怎么抵扣货款？"
POINTS_ANSWER = "每100积分抵扣1元"
UNANSWERED_QUESTION = "你们支持用比特币付款吗？"


@pytest.fixture(scope="module")
def kb_web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole system as shipped: no FAQ for everyone, the demo tenant answers from its own documents."""
    stack = start_stack(tmp_path_factory.mktemp("kb-web-stack"), {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_WIDGET_TENANTS": TENANT, "KEFU_CACHE_ENABLED": "false"})
    try:
        yield stack
    finally:
        stack.stop()


def admin_token() -> str:
    return mint(SECRET, tenant=TENANT, subject="admin-1", role="admin", ttl_s=3600, name="Ada")


def admin_api(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.request(method, f"{stack.base_url}{path}", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {admin_token()}"})


def upload_and_wait(stack: Stack, body: dict[str, Any]) -> str:
    created = admin_api(stack, "POST", "/v1/knowledge/documents", body)
    assert created.status_code == 202, created.text
    document_id = str(created.json()["document_id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = admin_api(stack, "GET", f"/v1/knowledge/documents/{document_id}").json()["status"]
        if status == "ready":
            return document_id
        assert status != "failed"
        time.sleep(0.2)
    raise TimeoutError(f"document {document_id} not ready within 60 s")


def open_console(pages: BrowserPages, stack: Stack, token: str, who: str) -> Page:
    page = pages.open(who, width=1400, height=900)
    page.goto(f"{stack.base_url}/console/#token={token}")
    expect(page.get_by_test_id("console-connection")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
    return page


def document_row(console: Page, filename: str) -> Locator:
    return console.get_by_test_id("kb-document").filter(has_text=filename)


def drop_file(page: Page, name: str, mime: str, text: str) -> None:
    """What a drag and drop from the desktop delivers: a `drop` event whose DataTransfer holds the file."""
    page.evaluate("""([name, mime, text]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], name, {type: mime}));
        const zone = document.querySelector('[data-testid=kb-drop]');
        for (const type of ['dragenter', 'dragover', 'drop']) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", [name, mime, text])


def test_knowledge_admin_drops_a_markdown_file_sees_it_ready_and_asks_the_try_box(
        kb_web_stack: Stack, browser_pages: BrowserPages) -> None:
    console = open_console(browser_pages, kb_web_stack, admin_token(), "admin")
    console.get_by_test_id("console-knowledge-tab").click()
    expect(console.get_by_test_id("console-queue")).to_be_hidden()  # the page replaces the conversations
    console.get_by_test_id("kb-upload-url").fill(WARRANTY_URL)
    drop_file(console, "warranty.md", "text/markdown", WARRANTY_MD)

    # The list refreshes by itself while the document is queued and indexed.
    row = document_row(console, "warranty.md")
    expect(row).to_have_attribute("data-status", "ready", timeout=WAIT_MS)
    document_id = row.get_attribute("data-document-id")
    assert document_id
    stored = admin_api(kb_web_stack, "GET", f"/v1/knowledge/documents/{document_id}").json()
    assert stored["url"] == WARRANTY_URL and stored["chunks"] >= 1
    cells = row.locator("td.num")
    expect(cells.nth(0)).to_have_text("1")                      # version
    expect(cells.nth(1)).to_have_text(str(stored["chunks"]))    # chunks
    expect(row.get_by_test_id("kb-document-error")).to_have_count(0)

    console.get_by_test_id("kb-try-input").fill(WARRANTY_QUESTION)
    with console.expect_response(lambda r: r.url.endswith("/v1/chat")) as chat:
        console.get_by_test_id("kb-try-send").click()
    passage = console.get_by_test_id("kb-passage").first
    expect(passage).to_have_attribute("data-document-id", document_id, timeout=WAIT_MS)
    expect(passage).to_contain_text(WARRANTY_ANSWER)
    answer = console.get_by_test_id("kb-answer")
    expect(answer).to_contain_text(WARRANTY_ANSWER, timeout=WAIT_MS)
    citation = answer.get_by_test_id("kb-citation").first
    expect(citation).to_have_attribute("data-document-id", document_id)
    link = citation.locator("a")
    expect(link).to_have_attribute("href", WARRANTY_URL)
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    # Markup in a document is text wherever it is shown.
    assert console.locator("#knowledge img").count() == 0
    assert console.evaluate("window.__pwned") is None

    # The try box's conversation is deleted once answered: nothing of it is left for the agents.
    session_id = chat.value.json()["session_id"]
    deadline = time.monotonic() + 10
    while admin_api(kb_web_stack, "GET", f"/v1/sessions/{session_id}/messages").status_code != 404:
        assert time.monotonic() < deadline, "the try box left its conversation behind"
        time.sleep(0.1)

    # A question the documents do not answer: the page says a visitor would be handed to a human.
    console.get_by_test_id("kb-try-input").fill(UNANSWERED_QUESTION)
    console.get_by_test_id("kb-try-send").click()
    expect(answer).to_have_attribute("data-finish-reason", "handoff", timeout=WAIT_MS)
    expect(answer.locator(".kb-handoff")).to_be_visible()
    expect(answer.get_by_test_id("kb-citation")).to_have_count(0)
    assert csp_violations(browser_pages) == []


def test_knowledge_broken_pdf_shows_failed_with_its_error_and_delete_removes_a_document(
        kb_web_stack: Stack, browser_pages: BrowserPages) -> None:
    console = open_console(browser_pages, kb_web_stack, admin_token(), "admin")
    console.get_by_test_id("console-knowledge-tab").click()
    console.get_by_test_id("kb-upload-input").set_input_files(
        {"name": "broken.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.7\nthis is not a PDF at all\n"})

    row = document_row(console, "broken.pdf")
    expect(row).to_have_attribute("data-status", "failed", timeout=WAIT_MS)
    document_id = row.get_attribute("data-document-id")
    stored = admin_api(kb_web_stack, "GET", f"/v1/knowledge/documents/{document_id}").json()
    assert stored["status"] == "failed" and stored["error"]
    expect(row.get_by_test_id("kb-document-error")).to_have_text(stored["error"])  # the one-line reason

    # A type kefu cannot read is refused at once, with the API's reason; no document is made of it.
    photo: FilePayload = {"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n not parsed"}
    refused = requests.post(f"{kb_web_stack.base_url}/v1/knowledge/documents", timeout=30,
                            headers={"Authorization": f"Bearer {admin_token()}"},
                            files={"file": (photo["name"], photo["buffer"], photo["mimeType"])})
    assert refused.status_code == 415
    console.get_by_test_id("kb-upload-input").set_input_files(photo)
    expect(console.get_by_test_id("kb-upload-status")).to_contain_text(
        f"photo.png：{refused.json()['error']['message']}", timeout=WAIT_MS)
    expect(document_row(console, "photo.png")).to_have_count(0)

    # Deleting asks first: "cancel" keeps it.
    console.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_test_id("kb-delete").click()
    expect(row).to_have_count(1)
    console.once("dialog", lambda dialog: dialog.accept())
    row.get_by_test_id("kb-delete").click()
    expect(row).to_have_count(0, timeout=WAIT_MS)
    assert admin_api(kb_web_stack, "GET", f"/v1/knowledge/documents/{document_id}").status_code == 404


def test_knowledge_visitor_sees_the_source_under_the_answer_and_the_agent_sees_it_too(
        kb_web_stack: Stack, browser_pages: BrowserPages) -> None:
    document_id = upload_and_wait(kb_web_stack, {"title": POINTS_TITLE, "text": POINTS_TEXT, "url": POINTS_URL})

    visitor = browser_pages.open("visitor")
    visitor.goto(f"{kb_web_stack.base_url}/")
    visitor.get_by_test_id("kefu-launcher").click()
    visitor.get_by_test_id("kefu-input").fill(POINTS_QUESTION)
    visitor.get_by_test_id("kefu-send").click()
    answer = visitor.locator("[data-testid=kefu-message][data-sender=ai]")
    expect(answer.locator(".text")).to_contain_text(POINTS_ANSWER, timeout=WAIT_MS)
    expect(answer).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    source = answer.get_by_test_id("kefu-citation")
    expect(source).to_have_count(1)
    expect(source).to_have_attribute("data-document-id", document_id)
    expect(source).to_have_text(POINTS_TITLE)  # the title's markup is text
    assert source.locator("i").count() == 0
    link = source.locator("a")
    expect(link).to_have_attribute("href", POINTS_URL)
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")

    # A reload replays the conversation: the answer keeps its source.
    visitor.reload()
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "ai", timeout=WAIT_MS)
    expect(answer.get_by_test_id("kefu-citation")).to_have_text(POINTS_TITLE, timeout=WAIT_MS)

    visitor.get_by_test_id("kefu-handoff").click()
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "waiting_human", timeout=WAIT_MS)
    conversation_id = str(stored_state(visitor).get("conversationId") or "")
    assert conversation_id

    # The agent reads the conversation before claiming it: the AI answer shows what it was built on.
    console = open_console(browser_pages, kb_web_stack, agent_token("agent-kb", "Kim"), "agent")
    item = console.locator(f"[data-testid=console-queue-item][data-conversation-id='{conversation_id}']")
    expect(item).to_be_visible(timeout=WAIT_MS)
    item.click()
    ai_message = console.locator("[data-testid=console-message][data-sender=ai]")
    expect(ai_message.locator(".text")).to_contain_text(POINTS_ANSWER, timeout=WAIT_MS)
    agent_source = ai_message.get_by_test_id("console-citation")
    expect(agent_source).to_have_text(POINTS_TITLE)
    expect(agent_source.locator("a")).to_have_attribute("href", POINTS_URL)

    # Agents get the try box on the Knowledge page, not the documents (those are the admins').
    console.get_by_test_id("console-knowledge-tab").click()
    expect(console.get_by_test_id("kb-upload-input")).to_be_hidden()
    expect(console.get_by_test_id("kb-document")).to_have_count(0)
    console.get_by_test_id("kb-try-input").fill(POINTS_QUESTION)
    console.get_by_test_id("kb-try-send").click()
    expect(console.get_by_test_id("kb-passage").first).to_contain_text(POINTS_ANSWER, timeout=WAIT_MS)
    expect(console.get_by_test_id("kb-citation").first).to_have_attribute("data-document-id", document_id)
    assert csp_violations(browser_pages) == []


def test_knowledge_links_only_for_http_urls(kb_web_stack: Stack, browser_pages: BrowserPages) -> None:
    page = open_console(browser_pages, kb_web_stack, admin_token(), "admin")
    checks = page.evaluate("""() => ['https://a.example/x', 'http://a.example', 'javascript:alert(1)',
        'data:text/html,<b>x</b>', '/relative', ' java\\tscript:alert(1)'].map(window.kefuKnowledge.safeUrl)""")
    assert checks == ["https://a.example/x", "http://a.example/", None, None, None, None]
