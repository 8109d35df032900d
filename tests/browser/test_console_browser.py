"""The agent console and the widget together: handoff, queue, claim, replies, release, a cut connection."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests
from playwright.sync_api import Locator, Page, expect

from devtools.devstack.stack import Stack
from tests.browser.browser_helpers import BrowserPages, Relay, agent_token, csp_violations, stored_state

pytestmark = pytest.mark.timeout(300)

WAIT_MS = 30_000
QUESTION = "下单后多久发货？"
ANSWER_PART = "下午4点前付款的订单当天发货"
AGENT_NAME = "Alice"


def widget_messages(page: Page, sender: str) -> Locator:
    return page.locator(f"[data-testid=kefu-message][data-sender={sender}]")


def console_messages(page: Page, sender: str) -> Locator:
    return page.locator(f"[data-testid=console-message][data-sender={sender}]")


def visitor_asks_for_a_human(pages: BrowserPages, stack: Stack, base_url: str,
                             who: str = "visitor") -> tuple[Page, str]:
    """A visitor on the shop page asks a question, gets the AI's answer, then presses "talk to a human"."""
    page = pages.open(who)
    page.goto(f"{base_url}/")
    page.get_by_test_id("kefu-launcher").click()
    page.get_by_test_id("kefu-input").fill(QUESTION)
    page.get_by_test_id("kefu-send").click()
    expect(widget_messages(page, "ai").locator(".text")).to_contain_text(ANSWER_PART, timeout=WAIT_MS)
    expect(widget_messages(page, "ai")).not_to_have_attribute("data-streaming", "", timeout=WAIT_MS)
    page.get_by_test_id("kefu-handoff").click()
    expect(page.get_by_test_id("kefu-status")).to_have_attribute("data-status", "waiting_human", timeout=WAIT_MS)
    conversation_id = str(stored_state(page).get("conversationId") or "")
    assert conversation_id
    return page, conversation_id


def open_console(pages: BrowserPages, stack: Stack, sub: str = "agent-1", name: str = AGENT_NAME) -> Page:
    page = pages.open(f"console-{sub}", width=1400, height=900)
    page.goto(f"{stack.base_url}/console/#token={agent_token(sub, name)}")
    expect(page.get_by_test_id("console-connection")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
    assert "token=" not in page.url, "the token is taken out of the address bar"
    return page


def claim(console: Page, conversation_id: str) -> None:
    item = console.locator(f"[data-testid=console-queue-item][data-conversation-id='{conversation_id}']")
    expect(item).to_be_visible(timeout=WAIT_MS)
    item.click()
    # Before claiming, the agent reads what was said so far.
    expect(console_messages(console, "visitor").first.locator(".text")).to_have_text(QUESTION, timeout=WAIT_MS)
    expect(console_messages(console, "ai").first.locator(".text")).to_contain_text(ANSWER_PART)
    console.get_by_test_id("console-claim").click()
    expect(console.get_by_test_id("console-status")).to_have_attribute("data-status", "human", timeout=WAIT_MS)
    expect(item).to_have_count(0, timeout=WAIT_MS)  # out of the queue


def reply(console: Page, text: str) -> None:
    console.get_by_test_id("console-input").fill(text)
    console.get_by_test_id("console-send").click()


def test_console_agent_claims_replies_and_releases_to_the_ai(web_stack: Stack, browser_pages: BrowserPages) -> None:
    visitor, conversation_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url)
    console = open_console(browser_pages, web_stack)
    claim(console, conversation_id)
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "human", timeout=WAIT_MS)
    expect(visitor.get_by_test_id("kefu-status")).to_contain_text(AGENT_NAME)

    reply(console, "您好，我是客服 Alice，请问有什么可以帮您？")
    agent_message = widget_messages(visitor, "agent")
    expect(agent_message.locator(".text")).to_have_text(["您好，我是客服 Alice，请问有什么可以帮您？"], timeout=WAIT_MS)
    expect(agent_message.locator(".who")).to_have_text([AGENT_NAME])

    # The visitor types: the agent sees it; HTML from the visitor is text in the console.
    html = '<img src=x onerror="window.__pwned=1"><b>订单</b>'
    visitor.get_by_test_id("kefu-input").fill(html)
    expect(console.get_by_test_id("console-typing")).not_to_be_empty(timeout=WAIT_MS)
    visitor.get_by_test_id("kefu-send").click()
    expect(console_messages(console, "visitor").last.locator(".text")).to_have_text(html, timeout=WAIT_MS)
    assert console.locator("#history img, #history b").count() == 0
    assert console.evaluate("window.__pwned") is None
    expect(widget_messages(visitor, "ai")).to_have_count(1)  # the AI stays silent while an agent holds it

    console.get_by_test_id("console-release").click()
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "ai", timeout=WAIT_MS)
    visitor.get_by_test_id("kefu-input").fill("运费多少钱？")
    visitor.get_by_test_id("kefu-send").click()
    expect(widget_messages(visitor, "ai").last.locator(".text")).to_contain_text("满99元包邮", timeout=WAIT_MS)
    assert csp_violations(browser_pages) == []


def test_console_visitor_cut_off_gets_both_agent_messages_once_in_order(
        web_stack: Stack, relay: Relay, browser_pages: BrowserPages) -> None:
    # The visitor's page talks to the edge through a relay this test cuts: a real TCP drop, which
    # Chromium's offline emulation would not give an open WebSocket.
    visitor, conversation_id = visitor_asks_for_a_human(browser_pages, web_stack, relay.base_url)
    console = open_console(browser_pages, web_stack, sub="agent-2", name="Bob")
    claim(console, conversation_id)
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "human", timeout=WAIT_MS)

    relay.cut()
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "offline", timeout=WAIT_MS)
    reply(console, "第一条：已为您查询订单")
    reply(console, "第二条：包裹明天送达")
    sent = console_messages(console, "agent")
    expect(sent).to_have_count(2, timeout=WAIT_MS)
    expect(sent.nth(1)).not_to_have_attribute("data-pending", "", timeout=WAIT_MS)  # stored: acked by the edge
    assert widget_messages(visitor, "agent").count() == 0

    relay.restore()
    expect(visitor.get_by_test_id("kefu-status")).to_have_attribute("data-status", "human", timeout=WAIT_MS)
    expect(widget_messages(visitor, "agent").locator(".text")).to_have_text(
        ["第一条：已为您查询订单", "第二条：包裹明天送达"], timeout=WAIT_MS)
    # And nothing else was doubled by the resume.
    expect(widget_messages(visitor, "visitor")).to_have_count(1)
    expect(widget_messages(visitor, "ai")).to_have_count(1)
    seqs = visitor.evaluate("""() => Array.from(document.getElementById('kefu-widget').shadowRoot
        .querySelectorAll('[data-testid=kefu-message]')).map(n => Number(n.getAttribute('data-seq')))""")
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


def test_console_agent_holds_two_conversations_at_once(web_stack: Stack, browser_pages: BrowserPages) -> None:
    first, first_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url, who="visitor-a")
    second, second_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url, who="visitor-b")
    console = open_console(browser_pages, web_stack, sub="agent-3", name="Carol")
    claim(console, first_id)
    reply(console, "给第一位访客")
    claim(console, second_id)
    reply(console, "给第二位访客")
    expect(widget_messages(first, "agent").locator(".text")).to_have_text(["给第一位访客"], timeout=WAIT_MS)
    expect(widget_messages(second, "agent").locator(".text")).to_have_text(["给第二位访客"], timeout=WAIT_MS)

    # A visitor writes in the conversation not on screen: its entry in "mine" counts it as unread.
    first.get_by_test_id("kefu-input").fill("还在吗？")
    first.get_by_test_id("kefu-send").click()
    mine_first = console.locator(f"[data-testid=console-mine-item][data-conversation-id='{first_id}']")
    expect(mine_first.locator(".unread")).to_have_text(re.compile(r"[1-9]"), timeout=WAIT_MS)
    mine_first.click()
    expect(console_messages(console, "visitor").last.locator(".text")).to_have_text("还在吗？", timeout=WAIT_MS)
    reply(console, "在的")
    expect(widget_messages(first, "agent").locator(".text")).to_have_text(["给第一位访客", "在的"], timeout=WAIT_MS)
    expect(widget_messages(second, "agent")).to_have_count(1)


def test_console_canned_reply_is_picked_and_sent(web_stack: Stack, browser_pages: BrowserPages) -> None:
    created = requests.post(f"{web_stack.base_url}/v1/canned-replies", timeout=10,
                            headers={"Authorization": f"Bearer {agent_token('agent-4', 'Dave')}"},
                            json={"title": "退款时效", "text": "退款会在1个工作日内原路退回。", "shortcut": "refund"})
    assert created.status_code == 201, created.text
    visitor, conversation_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url)
    console = open_console(browser_pages, web_stack, sub="agent-4", name="Dave")
    claim(console, conversation_id)
    console.get_by_test_id("console-canned").click()
    console.get_by_role("searchbox").fill("退款")
    choice = console.get_by_test_id("console-canned-item").filter(has_text="退款时效")
    choice.click()
    expect(console.get_by_test_id("console-input")).to_have_value("退款会在1个工作日内原路退回。")
    console.get_by_test_id("console-send").click()
    expect(widget_messages(visitor, "agent").locator(".text")).to_have_text(["退款会在1个工作日内原路退回。"],
                                                                            timeout=WAIT_MS)


def test_console_private_note_never_reaches_the_visitor(web_stack: Stack, browser_pages: BrowserPages) -> None:
    visitor, conversation_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url)
    console = open_console(browser_pages, web_stack, sub="agent-5", name="Erin")
    claim(console, conversation_id)
    console.get_by_test_id("console-note-mode").check()
    console.get_by_test_id("console-input").fill("老客户，优先处理")
    console.get_by_test_id("console-send").click()
    note = console.get_by_test_id("console-note")
    expect(note.locator(".text")).to_have_text(["老客户，优先处理"], timeout=WAIT_MS)
    expect(note).not_to_have_attribute("data-pending", "", timeout=WAIT_MS)
    console.get_by_test_id("console-note-mode").uncheck()
    reply(console, "好的，马上为您处理")
    expect(widget_messages(visitor, "agent").locator(".text")).to_have_text(["好的，马上为您处理"], timeout=WAIT_MS)
    assert "老客户" not in visitor.evaluate("document.getElementById('kefu-widget').shadowRoot.textContent")


def test_console_login_with_an_account_the_cli_created(web_stack: Stack, browser_pages: BrowserPages) -> None:
    environment = {**os.environ, "KEFU_NATS_URL": web_stack.nats_url}
    subprocess.run([sys.executable, "-m", "gateway.accounts", "add", "--tenant", "demo", "--username", "frank",
                    "--name", "Frank", "--password-stdin"], input="correct horse battery\n", text=True,
                   env=environment, check=True, timeout=60, capture_output=True)
    console = browser_pages.open("console")
    console.goto(f"{web_stack.base_url}/console/")
    console.get_by_test_id("console-login-tenant").fill("demo")
    console.get_by_test_id("console-login-username").fill("frank")
    console.get_by_test_id("console-login-password").fill("wrong password")
    console.get_by_test_id("console-login-submit").click()
    expect(console.locator("#login-error")).not_to_be_empty(timeout=WAIT_MS)
    console.get_by_test_id("console-login-password").fill("correct horse battery")
    console.get_by_test_id("console-login-submit").click()
    expect(console.get_by_test_id("console-connection")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
    expect(console.locator("#me")).to_contain_text("Frank")


def test_a_deleted_conversation_leaves_the_console_and_the_widget(web_stack: Stack,
                                                                   browser_pages: BrowserPages) -> None:
    visitor, conversation_id = visitor_asks_for_a_human(browser_pages, web_stack, web_stack.base_url,
                                                        who="visitor-erased")
    console = open_console(browser_pages, web_stack, sub="agent-6", name="Fay")
    claim(console, conversation_id)
    mine = console.locator(f"[data-testid=console-mine-item][data-conversation-id='{conversation_id}']")
    expect(mine).to_be_visible(timeout=WAIT_MS)
    token = stored_state(visitor)["token"]
    # The visitor erases the conversation (from anywhere: here straight over HTTP).
    deleted = requests.delete(f"{web_stack.base_url}/v1/sessions/{conversation_id}",
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert deleted.status_code == 204
    expect(mine).to_have_count(0, timeout=WAIT_MS)
    expect(widget_messages(visitor, "visitor")).to_have_count(0, timeout=WAIT_MS)
    assert stored_state(visitor).get("conversationId") != conversation_id
