"""The fake upstream's grounded mode: it answers from the prompt's numbered passages with [n], or declines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from devtools.fake_replies import grounded_reply, passages_in
from devtools.fake_upstream import DEFAULT_DECLINE_MARKER, FakeUpstream, FakeUpstreamConfig

pytestmark = pytest.mark.timeout(20)

SYSTEM = ("You are the shop's assistant.\n\n"
          "[1] 退换货政策 > 退货\n收到商品 7 天内可以申请退货。退货运费由买家承担。\n\n"
          "[2] Shipping\nOrders ship within 48 hours. Shipping is free over 99 yuan.\n\n"
          "Answer only from the passages above and cite them as [n].")


def grounded(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def test_passages_in_reads_each_numbered_passage_to_the_next_blank_line() -> None:
    found = passages_in(grounded("q"))
    assert found == {1: "退换货政策 > 退货\n收到商品 7 天内可以申请退货。退货运费由买家承担。",
                     2: "Shipping\nOrders ship within 48 hours. Shipping is free over 99 yuan."}


@pytest.mark.parametrize(("question", "expected"), [
    ("退货运费谁出？", "退货运费由买家承担。 [1]"),
    ("How long until my order ships?", "Orders ship within 48 hours. [2]"),
    ("量子色动力学是什么？", DEFAULT_DECLINE_MARKER),
    ("Explain quantum chromodynamics", DEFAULT_DECLINE_MARKER),
])
def test_grounded_reply_quotes_the_passage_sharing_the_questions_words_or_declines(
        question: str, expected: str) -> None:
    assert grounded_reply(grounded(question), question, DEFAULT_DECLINE_MARKER) == expected


def test_grounded_reply_without_passages_declines() -> None:
    messages = [{"role": "user", "content": "退货运费谁出？"}]
    assert grounded_reply(messages, "退货运费谁出？", "<<no>>") == "<<no>>"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_grounded_mode_over_the_wire_streams_the_cited_sentence(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(grounded=True, chunk_count=3)) as upstream:
        async with http.post(f"{upstream.base_url}/chat/completions", json={
                "model": "m", "messages": grounded("退货运费谁出？"), "stream": True}) as response:
            text = await response.text()
        async with http.post(f"{upstream.base_url}/chat/completions", json={
                "model": "m", "messages": grounded("量子色动力学是什么？")}) as response:
            declined = await response.json()
    chunks = [json.loads(line.removeprefix("data: ")) for line in text.split("\n\n")
              if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "退货运费由买家承担。 [1]"
    assert declined["choices"][0]["message"]["content"] == DEFAULT_DECLINE_MARKER


async def test_default_mode_still_echoes(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        async with http.post(f"{upstream.base_url}/chat/completions", json={
                "model": "m", "messages": grounded("退货运费谁出？")}) as response:
            body = await response.json()
    assert body["choices"][0]["message"]["content"] == "Echo: 退货运费谁出？"
