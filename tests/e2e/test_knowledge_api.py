"""/v1/knowledge through the real processes: uploads in every format, ingestion, search, isolation, restarts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import docx
import pytest
from fpdf import FPDF

from devtools.devstack.__main__ import DEMO_KNOWLEDGE
from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, start_stack

MAX_DOCUMENT_BYTES = 200_000
ADMIN = auth(tenant="kbshop", sub="boss", role="admin")
AGENT = auth(tenant="kbshop", sub="agent-1", role="agent")
VISITOR = auth(tenant="kbshop", sub="visitor-1", role="visitor")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("knowledge-api"), {
        "KEFU_RATE_LIMIT_RPS": "1000", "KEFU_KB_MAX_DOCUMENT_BYTES": str(MAX_DOCUMENT_BYTES),
        "KEFU_KB_MAX_DOCUMENTS": "12", "KEFU_KB_MAX_TENANT_BYTES": "500000", "KEFU_KB_SEED_DIR": str(DEMO_KNOWLEDGE)})
    try:
        yield started
    finally:
        started.stop()


def pdf_bytes(text: str) -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def docx_bytes(heading: str, text: str) -> bytes:
    document = docx.Document()
    document.add_heading(heading, level=1)
    document.add_paragraph(text)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def file_body(filename: str, data: bytes, **fields: str) -> dict[str, str]:
    return {"filename": filename, "content_base64": base64.b64encode(data).decode(), **fields}


async def call(stack: Stack, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{stack.base_url}{path}", headers=headers, **kwargs) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


async def upload(stack: Stack, body: dict[str, str], headers: dict[str, str] = ADMIN) -> dict[str, Any]:
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers, json=body)
    assert status == 202, reply
    assert isinstance(reply, dict) and reply["status"] == "queued" and reply["version"] >= 1
    return reply


async def settled(stack: Stack, document_id: str, version: int, headers: dict[str, str] = ADMIN,
                  timeout_s: float = 60.0) -> dict[str, Any]:
    """The document once its `version` is ingested (ready or failed), polled with a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, document = await call(stack, "GET", f"/v1/knowledge/documents/{document_id}", headers)
        assert status == 200, document
        assert isinstance(document, dict)
        if document["version"] == version and document["status"] in ("ready", "failed"):
            return document
        if time.monotonic() > deadline:
            raise TimeoutError(f"document {document_id} still {document['status']}")
        await asyncio.sleep(0.1)


async def search(stack: Stack, query: str, headers: dict[str, str] = AGENT, k: int = 5) -> list[dict[str, Any]]:
    status, reply = await call(stack, "POST", "/v1/knowledge/search", headers, json={"query": query, "k": k})
    assert status == 200, (status, reply)
    results: list[dict[str, Any]] = reply["results"]
    return results


async def test_knowledge_every_format_is_ingested_and_found(stack: Stack) -> None:
    faq_csv = "question,answer,alternates\nDo you sell zebrawood teaboxes?,Yes: zebrawood boxes in three sizes.," \
              "zebrawood box|zebra box\n"
    faq_json = [{"question": "Can I pay with quokkacoin?", "answer": "No, quokkacoin is not accepted.",
                 "alternates": ["quokkacoin payment"]}]
    uploads = {
        "md": {"title": "Markdown page", "text": "# Aardvark care\n\nAardvarks drink oolong at dawn.\n"},
        "txt": file_body("notes.txt", b"Walrus orders ship by glacier express.\n"),
        "html": file_body("page.html", b"<html><body><nav>menu</nav><h1>Ocelot</h1><p>Ocelot tea is smoky."
                                       b"</p><script>x()</script></body></html>", url="https://shop.example/o"),
        "pdf": file_body("guide.pdf", pdf_bytes("Narwhal brewing guide: steep narwhal leaves for 3 minutes.")),
        "docx": file_body("manual.docx", docx_bytes("Pangolin", "Pangolin blend ships in tins.")),
        "faqjson": file_body("faq.json", json.dumps(faq_json).encode()),
        "faqcsv": file_body("faq.csv", faq_csv.encode()),
    }
    ids = {}
    for name, body in uploads.items():
        ids[name] = (await upload(stack, {**body, "document_id": f"fmt-{name}"}))["document_id"]
    # multipart/form-data with a file part and fields
    form = aiohttp.FormData()
    form.add_field("file", b"# Quetzal\n\nQuetzal jasmine is picked in spring.\n", filename="quetzal.md",
                   content_type="text/markdown")
    form.add_field("title", "Quetzal page")
    form.add_field("document_id", "fmt-multipart")
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", ADMIN, data=form)
    assert status == 202, reply
    ids["multipart"] = reply["document_id"]
    for document_id in ids.values():
        document = await settled(stack, document_id, 1)
        assert document["status"] == "ready", document
        assert document["chunks"] >= 1 and document["bytes"] > 0 and "error" not in document
    formats = {name: (await settled(stack, ids[name], 1))["format"] for name in ids}
    assert formats == {"md": "markdown", "txt": "text", "html": "html", "pdf": "pdf", "docx": "docx",
                       "faqjson": "faq_json", "faqcsv": "faq_csv", "multipart": "markdown"}
    for name, query in (("md", "aardvark oolong"), ("txt", "walrus glacier"), ("html", "ocelot smoky"),
                        ("pdf", "narwhal steep"), ("docx", "pangolin tins"), ("faqjson", "quokkacoin"),
                        ("faqcsv", "zebrawood"), ("multipart", "quetzal jasmine")):
        results = await search(stack, query)
        assert results and results[0]["document_id"] == ids[name], (name, results)
    html = (await search(stack, "ocelot"))[0]
    assert html["url"] == "https://shop.example/o" and "x()" not in html["text"] and "menu" not in html["text"]
    assert (await search(stack, "Quetzal"))[0]["title"] == "Quetzal page"
    status, listed = await call(stack, "GET", "/v1/knowledge/documents?limit=3", ADMIN)
    assert status == 200 and len(listed["documents"]) == 3 and listed["next_cursor"]
    status, rest = await call(stack, "GET", f"/v1/knowledge/documents?limit=100&cursor={listed['next_cursor']}",
                              ADMIN)
    assert {d["document_id"] for d in listed["documents"] + rest["documents"]} >= set(ids.values())
    assert rest["next_cursor"] is None


async def test_knowledge_the_seed_folder_gives_the_demo_tenant_its_documents(stack: Stack) -> None:
    admin = auth(tenant="demo", sub="boss", role="admin")
    expected = {"shop-faq": "faq_json", "shipping": "markdown", "returns-and-refunds": "markdown"}
    for document_id in expected:
        document = await settled(stack, document_id, 1, admin)
        assert document["status"] == "ready" and document["format"] == expected[document_id], document
    assert (await settled(stack, "shipping", 1, admin))["title"] == "配送政策 Shipping policy"
    results = await search(stack, "满多少包邮", auth(tenant="demo", sub="agent-1", role="agent"))
    assert results and results[0]["document_id"] in ("shop-faq", "shipping") and "99" in results[0]["text"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics",
                                     timeout=5).read().decode()
    assert 'kefu_kb_documents_total{status="ready"}' in metrics and "tenant=" not in metrics
    assert "kefu_kb_index_cache_bytes" in metrics


async def test_knowledge_a_broken_pdf_fails_alone_and_the_previous_version_serves(stack: Stack) -> None:
    headers = auth(tenant="kbbroken", sub="boss", role="admin")
    await upload(stack, {"document_id": "manual", "text": "# Manual\n\nThe kettle whistles at 95 degrees.\n"},
                 headers)
    await upload(stack, {"document_id": "other", "text": "# Other\n\nBiscuits pair with black tea.\n"}, headers)
    assert (await settled(stack, "manual", 1, headers))["status"] == "ready"
    await upload(stack, file_body("manual.pdf", b"%PDF-1.4 broken beyond repair", document_id="manual"), headers)
    failed = await settled(stack, "manual", 2, headers)
    assert failed["status"] == "failed" and failed["serving_version"] == 1
    assert "PDF" in failed["error"] and "\n" not in failed["error"]
    assert (await settled(stack, "other", 1, headers))["status"] == "ready"
    agent = auth(tenant="kbbroken", sub="agent-1", role="agent")
    results = await search(stack, "kettle whistles", agent)
    assert results and results[0]["document_id"] == "manual" and "95 degrees" in results[0]["text"]


async def test_knowledge_an_update_replaces_the_old_text(stack: Stack) -> None:
    headers = auth(tenant="kbupdate", sub="boss", role="admin")
    agent = auth(tenant="kbupdate", sub="agent-1", role="agent")
    await upload(stack, {"document_id": "hours", "text": "# Hours\n\nThe shop opens at nine o'clock.\n"}, headers)
    await settled(stack, "hours", 1, headers)
    assert "nine" in (await search(stack, "when does the shop open", agent))[0]["text"]
    second = await upload(stack, {"document_id": "hours", "text": "# Hours\n\nThe shop opens at eleven o'clock.\n"},
                          headers)
    assert second["version"] == 2
    assert (await settled(stack, "hours", 2, headers))["status"] == "ready"
    texts = [r["text"] for r in await search(stack, "when does the shop open", agent)]
    assert any("eleven" in t for t in texts) and not any("nine" in t for t in texts)


async def test_knowledge_delete_stops_search_at_once(stack: Stack) -> None:
    headers = auth(tenant="kbdelete", sub="boss", role="admin")
    agent = auth(tenant="kbdelete", sub="agent-1", role="agent")
    await upload(stack, {"document_id": "secret", "text": "# Promo\n\nThe axolotl coupon gives 30% off.\n"}, headers)
    await upload(stack, {"document_id": "kept", "text": "# Kept\n\nThe axolotl mug is sold out.\n"}, headers)
    await settled(stack, "secret", 1, headers)
    await settled(stack, "kept", 1, headers)
    assert "secret" in {r["document_id"] for r in await search(stack, "axolotl coupon", agent)}
    status, _ = await call(stack, "DELETE", "/v1/knowledge/documents/secret", headers)
    assert status == 204
    # No waiting: the very next search no longer returns it.
    assert {r["document_id"] for r in await search(stack, "axolotl coupon", agent, k=10)} == {"kept"}
    assert (await call(stack, "GET", "/v1/knowledge/documents/secret", headers))[0] == 404
    assert (await call(stack, "DELETE", "/v1/knowledge/documents/secret", headers))[0] == 404


async def test_knowledge_tenants_are_isolated(stack: Stack) -> None:
    owner = auth(tenant="kbtenant-a", sub="boss", role="admin")
    other = auth(tenant="kbtenant-b", sub="boss", role="admin")
    await upload(stack, {"document_id": "private", "text": "# Private\n\nThe flamingo discount code is PINK.\n"},
                 owner)
    await settled(stack, "private", 1, owner)
    status, listed = await call(stack, "GET", "/v1/knowledge/documents", other)
    assert status == 200 and listed["documents"] == []
    assert (await call(stack, "GET", "/v1/knowledge/documents/private", other))[0] == 404
    assert (await call(stack, "DELETE", "/v1/knowledge/documents/private", other))[0] == 404
    assert await search(stack, "flamingo discount code", other) == []
    assert (await settled(stack, "private", 1, owner))["status"] == "ready"  # untouched


async def test_knowledge_limits_and_bad_uploads(stack: Stack) -> None:
    headers = auth(tenant="kblimits", sub="boss", role="admin")
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers,
                               json=file_body("big.txt", b"x" * (MAX_DOCUMENT_BYTES + 1)))
    assert status == 413 and reply["error"]["code"] == "body_too_large", reply
    form = aiohttp.FormData()
    form.add_field("file", b"x" * (MAX_DOCUMENT_BYTES + 1), filename="big.txt")
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers, data=form)
    assert status == 413 and reply["error"]["code"] == "body_too_large"
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers,
                               json=file_body("photo.png", b"\x89PNG\r\n"))
    assert status == 415 and reply["error"]["code"] == "unsupported_media_type", reply
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", {**headers, "Content-Type": "text/plain"},
                               data=b"hello")
    assert status == 415 and reply["error"]["code"] == "unsupported_media_type"
    for bad in ({"text": "x", "content_base64": "eA==", "filename": "a.txt"}, {"title": "no content"},
                {"content_base64": "eA=="}, {"filename": "a.txt", "content_base64": "not base64!"},
                {"text": "x", "document_id": "bad.id"}):
        status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers, json=bad)
        assert status == 422 and reply["error"]["code"] == "invalid_request", (bad, reply)
    # Quotas: 12 documents (KEFU_KB_MAX_DOCUMENTS), 500 000 bytes (KEFU_KB_MAX_TENANT_BYTES).
    for n in range(12):
        await upload(stack, {"document_id": f"d{n}", "text": f"# Page {n}\n\nword{n}\n"}, headers)
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", headers, json={"text": "one more"})
    assert status == 409 and reply["error"]["code"] == "quota_exceeded" and "KEFU_KB_MAX_DOCUMENTS" in \
        reply["error"]["message"], reply
    await upload(stack, {"document_id": "d0", "text": "# Page 0\n\nan update is no new document\n"}, headers)
    bytes_tenant = auth(tenant="kbbytes", sub="boss", role="admin")
    for n in range(2):
        await upload(stack, file_body("big.txt", b"y" * MAX_DOCUMENT_BYTES, document_id=f"big{n}"), bytes_tenant)
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", bytes_tenant,
                               json=file_body("big.txt", b"z" * MAX_DOCUMENT_BYTES))
    assert status == 409 and "KEFU_KB_MAX_TENANT_BYTES" in reply["error"]["message"], reply


async def test_knowledge_roles(stack: Stack) -> None:
    for method, path, body in (("GET", "/v1/knowledge/documents", None),
                               ("POST", "/v1/knowledge/documents", {"text": "x"}),
                               ("GET", "/v1/knowledge/documents/fmt-md", None),
                               ("DELETE", "/v1/knowledge/documents/fmt-md", None),
                               ("POST", "/v1/knowledge/search", {"query": "x"})):
        status, reply = await call(stack, method, path, VISITOR, json=body)
        assert status == 403 and reply["error"]["code"] == "forbidden", (method, path)
        if path != "/v1/knowledge/search":
            assert (await call(stack, method, path, AGENT, json=body))[0] == 403, (method, path)
    assert (await call(stack, "POST", "/v1/knowledge/search", AGENT, json={"query": "x"}))[0] == 200
    assert (await call(stack, "POST", "/v1/knowledge/search", ADMIN, json={"query": "x"}))[0] == 200
    assert (await call(stack, "GET", "/v1/knowledge/documents", {}))[0] == 401


async def test_knowledge_documents_survive_a_restart_of_every_process(stack: Stack) -> None:
    headers = auth(tenant="kbrestart", sub="boss", role="admin")
    agent = auth(tenant="kbrestart", sub="agent-1", role="agent")
    await upload(stack, {"document_id": "durable", "text": "# Durable\n\nThe capybara blend is caffeine free.\n"},
                 headers)
    await settled(stack, "durable", 1, headers)
    stack.stop()
    stack.start()  # the same ports, the same nats-server store: every process is new
    document = await settled(stack, "durable", 1, headers)
    assert document["status"] == "ready"
    results = await search(stack, "capybara caffeine", agent)
    assert results and results[0]["document_id"] == "durable"
    # and ingestion works after the restart
    await upload(stack, {"document_id": "later", "text": "# Later\n\nThe wombat tin holds 50 g.\n"}, headers)
    assert (await settled(stack, "later", 1, headers))["status"] == "ready"


async def test_knowledge_hostile_requests_get_a_documented_4xx(stack: Stack) -> None:
    admin = auth(tenant="kbhostile", sub="boss", role="admin")
    json_headers = {**admin, "Content-Type": "application/json"}
    cases: list[tuple[str, str, dict[str, str], dict[str, Any], int]] = [
        ("POST", "/v1/knowledge/documents", json_headers, {"data": b"{not json"}, 400),
        ("POST", "/v1/knowledge/documents", json_headers, {"data": b"[1, 2]"}, 422),
        ("POST", "/v1/knowledge/documents", json_headers, {"data": b'{"text": "\\ud800"}'}, 422),
        ("POST", "/v1/knowledge/documents", admin, {"json": {"text": "x", "extra": 1}}, 422),
        ("POST", "/v1/knowledge/documents", admin, {"json": {"text": "x", "url": "javascript:alert(1)"}}, 422),
        ("POST", "/v1/knowledge/documents", admin, {"json": {"text": "x", "title": "t" * 301}}, 422),
        ("GET", "/v1/knowledge/documents?limit=abc", admin, {}, 422),
        ("GET", "/v1/knowledge/documents?limit=0", admin, {}, 422),
        ("GET", "/v1/knowledge/documents?cursor=%%%", admin, {}, 422),
        ("GET", "/v1/knowledge/documents/..%2F..%2Fetc", admin, {}, 404),
        ("GET", "/v1/knowledge/documents/" + "a" * 65, admin, {}, 404),
        ("POST", "/v1/knowledge/search", admin, {"json": {"query": ""}}, 422),
        ("POST", "/v1/knowledge/search", admin, {"json": {"query": "x", "k": 0}}, 422),
        ("POST", "/v1/knowledge/search", admin, {"json": {"query": "x", "k": 51}}, 422),
        ("POST", "/v1/knowledge/search", admin, {"json": {"query": "x" * 2001}}, 422),
    ]
    for method, path, headers, kwargs, expected in cases:
        status, reply = await call(stack, method, path, headers, **kwargs)
        assert status == expected, (method, path, kwargs, status, reply)
        assert set(reply["error"]) == {"code", "message", "request_id"}, reply
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("title", "no file")
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", admin, data=form)
    assert status == 422 and "file" in reply["error"]["message"]
    form = aiohttp.FormData()
    form.add_field("file", b"# x\n\ny\n", filename="x.md")
    form.add_field("colour", "blue")
    status, reply = await call(stack, "POST", "/v1/knowledge/documents", admin, data=form)
    assert status == 422 and "colour" in reply["error"]["message"]
    status, listed = await call(stack, "GET", "/v1/knowledge/documents", admin)
    assert listed["documents"] == []  # nothing stored by any of the above
