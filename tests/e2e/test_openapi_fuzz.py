"""The running edge against gateway/openapi.json: generated inputs, valid and not, never get a 5xx or an
undocumented answer."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
from schemathesis.specs.openapi.checks import unsupported_method

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, edge_metrics_url, wait_until

if TYPE_CHECKING:  # schemathesis declares its OpenAPI case type for type checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

DOCUMENT: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "gateway" / "openapi.json").read_text(encoding="utf-8"))

# Loaded at import: schemathesis.pytest.from_fixture (a schema built inside a fixture) reads
# `request.node._nodeid`, which pytest 9 no longer has, so the stack's address is given per call instead.
# The WebSocket's upgrade is not an HTTP exchange a fuzzer can judge: test_edge_websocket_* cover it.
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path="/v1/ws")
# Undeclared methods are test_edge_405_lists_allowed_methods' job (see EXCLUDED_CHECKS).
schema.config.phases.coverage.unexpected_methods = set()

FUZZ_SETTINGS = hypothesis.settings(
    max_examples=50, deadline=None, database=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much,
                           hypothesis.HealthCheck.data_too_large])

# The answer streams, as a client reads them: event name (None for bare `data:` frames) and data text.
SseEvent = tuple[str | None, str]


def parse_sse(content: bytes) -> list[SseEvent]:
    events: list[SseEvent] = []
    for frame in content.decode("utf-8").split("\n\n"):
        if not frame.strip():
            continue
        name: str | None = None
        data: list[str] = []
        for line in frame.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


def payload_validator(schema_name: str) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": DOCUMENT["components"]})


CHAT_EVENTS = {name: payload_validator(target) for name, target in (
    ("session", "SseSession"), ("message", "SseMessage"), ("done", "SseDone"), ("error", "SseError"))}
COMPLETION_FRAME = jsonschema.Draft202012Validator({
    "oneOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
              {"$ref": "#/components/schemas/CompletionStreamError"}],
    "components": DOCUMENT["components"]})


def assert_valid(validator: Any, instance: object, what: str) -> None:
    # An AssertionError is what schemathesis reports as a failed check (with the request to reproduce it).
    problems = [error.message for error in validator.iter_errors(instance)]
    assert not problems, f"{what} breaks its schema: {problems[:3]} in {json.dumps(instance)[:300]}"


def check_chat_stream(events: list[SseEvent], complete: bool) -> None:
    names = [name for name, _ in events]
    assert names[:1] == ["session"], f"the first event must be `session`, got {names[:3]}"
    assert all(name == "message" for name in names[1:-1]), f"only `message` events between: {names}"
    if complete:
        assert names[-1] in ("done", "error") and len(names) >= 2, f"the stream must end in done|error: {names}"
    for name, data in events:
        assert name in CHAT_EVENTS, f"undocumented event {name!r}"
        assert_valid(CHAT_EVENTS[name], json.loads(data), f"the data of a `{name}` event")


def check_completion_stream(events: list[SseEvent], complete: bool) -> None:
    assert all(name is None for name, _ in events), "completions frames carry no event name"
    frames = [data for _, data in events]
    if complete:
        last = json.loads(frames[-1]) if frames[-1] != "[DONE]" else "[DONE]"
        assert last == "[DONE]" or "error" in last, f"the stream must end in [DONE] or an error: {frames[-1]}"
    assert "[DONE]" not in frames[:-1], "[DONE] must be the last frame"
    chunks = [json.loads(data) for data in frames if data != "[DONE]"]
    for chunk in chunks:
        assert_valid(COMPLETION_FRAME, chunk, "a completions frame")
    assert chunks and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def event_streams_conform(ctx: object, response: schemathesis.Response, case: OpenApiCase) -> None:
    """The documented order of events and the schema of each event's JSON payload (contentSchema)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return None
    events = parse_sse(response.content)
    complete = not response.stream_cut_short
    if case.path == "/v1/chat":
        check_chat_stream(events, complete)
    else:
        check_completion_stream(events, complete)
    return None


# One edge bug answers every undeclared method without `Allow`; test_edge_405_lists_allowed_methods
# covers it once instead of failing each operation here and hiding what else the fuzzing finds.
EXCLUDED_CHECKS = [unsupported_method]


@pytest.fixture(scope="module")
def answer_route(kb_stack: Stack) -> str:
    """The route fuzzed completions ask: the knowledge base without its typing delay when the stack has it."""
    # Asked as `api`, the role completions are fuzzed with: a visitor is shown `default` only.
    listed = requests.get(f"{kb_stack.base_url}/v1/models", headers=auth(sub="openapi-fuzz", role="api"),
                          timeout=10).json()
    names = {model["id"] for model in listed["data"]}
    return "knowledge-base" if "knowledge-base" in names else "default"


def steer_completion_to_an_answer(case: OpenApiCase, route: str) -> None:
    """Make a schema-valid completions body one the edge answers, so fuzzing reaches the streams.

    The document cannot say which `model` routes exist or that the last message must be a non-blank
    user message; random valid bodies would almost all end in 404 or 422 before any answer starts.
    Nor that integers go without a fraction: JSON Schema counts 1.0 as an integer, the strict edge
    does not. Everything else the generator chose (stream, stream_options, limits, history, parts) is kept.
    """
    body: Any = case.body
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(body, dict):
        return
    body["model"] = route
    last = body["messages"][-1]
    last["role"] = "user"
    text = last["content"] if isinstance(last["content"], str) else "".join(p["text"] for p in last["content"])
    if not text.strip():
        last["content"] = "How long does delivery take?"
    for name in ("max_tokens", "max_completion_tokens", "n"):
        if isinstance(body.get(name), float):
            body[name] = int(body[name])


def read_whole_stream(case: OpenApiCase) -> bool:
    """Every completions stream and a third of the /v1/chat ones are read to their end, so the whole event
    order is checked; the other chat streams are dropped after a few events, which fuzzes client hang-ups and
    keeps the run short (the default route types its answer out in 20 ms steps)."""
    if case.operation.label != "POST /v1/chat":
        return True
    # Chosen by the input, never at random: Hypothesis replays an input and expects the same outcome.
    return zlib.crc32(json.dumps(case.body, sort_keys=True, default=str).encode()) % 3 == 0


@schema.parametrize()
@FUZZ_SETTINGS
def test_edge_conforms_to_openapi_document(case: OpenApiCase, kb_stack: Stack, answer_route: str) -> None:
    if case.operation.label == "POST /v1/chat/completions":
        steer_completion_to_an_answer(case, answer_route)
    # Read per call by schemathesis' transport (its default stops every stream after 20 events).
    case.operation.schema.config.max_stream_events = 100_000 if read_whole_stream(case) else 3
    # Completions are fuzzed with an `api` token: a visitor's may only ask `default` with user messages.
    role = "api" if case.operation.label == "POST /v1/chat/completions" else "visitor"
    case.call_and_validate(base_url=kb_stack.base_url, headers=auth(sub="openapi-fuzz", role=role), timeout=30,
                           excluded_checks=EXCLUDED_CHECKS, additional_checks=[event_streams_conform])


def test_edge_fuzzed_streams_are_all_closed(kb_stack: Stack) -> None:
    """After the fuzzing above (streams read whole or dropped early), the edge holds no stream open."""
    def open_streams() -> float:
        metrics = requests.get(edge_metrics_url(kb_stack), timeout=10).text
        found = re.search(r"^kefu_active_streams (\S+)$", metrics, re.MULTILINE)
        assert found is not None, metrics
        return float(found[1])

    wait_until(lambda: open_streams() == 0, timeout_s=10, what="kefu_active_streams back to 0")


def documented_methods(path: str) -> set[str]:
    return {method.upper() for method in DOCUMENT["paths"][path] if method != "parameters"}


def test_edge_405_lists_allowed_methods(kb_stack: Stack) -> None:
    """RFC 9110 §15.5.6: a 405 carries Allow with the methods the resource supports."""
    problems = []
    for path in sorted(DOCUMENT["paths"]):
        url = kb_stack.base_url + re.sub(r"\{[a-z_]+\}", "0" * 32, path)  # every path parameter
        response = requests.request("PATCH", url, headers=auth(sub="openapi-405"), timeout=10)
        allow = response.headers.get("Allow", "")
        allowed = {method.strip().upper() for method in allow.split(",") if method.strip()}
        if response.status_code != 405 or "X-Request-Id" not in response.headers:
            problems.append(f"PATCH {path}: {response.status_code} {dict(response.headers)}")
        elif not documented_methods(path) <= allowed:
            problems.append(f"PATCH {path}: 405 with Allow {allow!r}, documented {sorted(documented_methods(path))}")
    assert problems == []


async def test_edge_websocket_without_upgrade_is_documented_426(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{kb_stack.base_url}/v1/ws") as response:
        assert response.status == 426 and response.headers["Upgrade"] == "websocket"
        error = (await response.json())["error"]
    assert error["code"] == "websocket_required" and error["request_id"] == response.headers["X-Request-Id"]


async def test_edge_websocket_upgrade_is_documented_101(kb_stack: Stack) -> None:
    # A bare handshake, read up to the end of its headers: the client libraries hide the 101's headers.
    port = int(kb_stack.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                     f"Sec-WebSocket-Version: 13\r\nAuthorization: {auth(sub='openapi-ws')['Authorization']}\r\n"
                     f"\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)).decode("latin-1")
    finally:
        writer.close()
    status_line, *lines = head.strip().split("\r\n")
    headers = {name.strip().lower() for name, _, _ in (line.partition(":") for line in lines)}
    documented = DOCUMENT["paths"]["/v1/ws"]["get"]["responses"]["101"]["headers"]
    required = [name for name, header in documented.items()
                if DOCUMENT["components"]["headers"].get(header.get("$ref", "").rsplit("/", 1)[-1], header)["required"]]
    assert status_line.startswith("HTTP/1.1 101 ")
    assert [name for name in required if name.lower() not in headers] == [], head


JSON = {"Content-Type": "application/json"}
COMPLETION = b'{"model": "default", "messages": [%s]}'


# Inputs that JSON Schema generators do not produce but a hostile client can send: each must get a
# documented 4xx in the route's error shape, never the 500 of an unhandled exception. Where the body is
# JSON by RFC 8259 but not something Python can hold as sent (a 5000-digit integer, 100k nesting levels,
# a lone surrogate), either 400 `invalid_json` or 422 `invalid_request` is a fair answer.
EITHER = (400, 422)


@pytest.mark.parametrize(("path", "body", "statuses"), [
    pytest.param("/v1/chat", b'{"message": "hi", "stream": ' + b"1" * 5000 + b"}", EITHER, id="int-5000-digits"),
    pytest.param("/v1/chat", b"[" * 100_000 + b"]" * 100_000, EITHER, id="nesting-100k-deep"),
    pytest.param("/v1/chat", b'{"message": "hi"}   x', (400,), id="trailing-garbage"),
    pytest.param("/v1/chat", b'\xef\xbb\xbf{"message": "hi"}', (400,), id="utf8-bom"),
    pytest.param("/v1/chat", b'{"message": "hi", "stream": NaN}', (422,), id="nan"),
    pytest.param("/v1/chat", b'{"message": "hi", "message": 1}', (422,), id="duplicate-key"),
    pytest.param("/v1/chat", b'"just a string"', (422,), id="not-an-object"),
    pytest.param("/v1/chat", b'{"message": "\\ud800"}', EITHER, id="chat-lone-surrogate"),
    pytest.param("/v1/chat/completions", COMPLETION % b'{"role": "user", "content": "\\udc00hi"}', EITHER,
                 id="completion-lone-surrogate"),
    pytest.param("/v1/chat/completions",
                 COMPLETION % b'{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}', EITHER,
                 id="completion-part-lone-surrogate"),
    pytest.param("/v1/chat/completions",
                 COMPLETION % b'{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "hi"}',
                 EITHER, id="completion-history-lone-surrogate"),
    pytest.param("/v1/chat/completions", b'{"model": "default", "temperature": 1e999, "messages": '
                 b'[{"role": "user", "content": "hi"}]}', (422,), id="temperature-infinity"),
])
def test_edge_hostile_bodies_get_a_documented_4xx(kb_stack: Stack, path: str, body: bytes,
                                                  statuses: tuple[int, ...]) -> None:
    response = requests.post(kb_stack.base_url + path, data=body, headers={**auth(sub="openapi-hostile"), **JSON},
                             timeout=30)
    assert_documented_error(response, statuses)


# Header bytes that are not UTF-8 (HTTP allows any octet in a field value); aiohttp hands them on as
# surrogate escapes.
@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    pytest.param("GET", "/v1/models", {"Authorization": b"Bearer \xff\xfe"}, 401, id="authorization-not-utf8"),
    pytest.param("GET", "/v1/models", {"Authorization": b"Bearer a.\xc3\xa9.b"}, 401, id="authorization-non-ascii"),
    pytest.param("POST", "/v1/chat/completions", {"X-Session-Id": b"\xff" * 32}, 422, id="x-session-id-not-utf8"),
])
def test_edge_hostile_headers_get_a_documented_4xx(kb_stack: Stack, method: str, path: str,
                                                   headers: dict[str, bytes], status: int) -> None:
    body = b'{"model": "default", "messages": [{"role": "user", "content": "hi"}]}'
    response = requests.request(method, kb_stack.base_url + path, data=body if method == "POST" else None,
                                headers={**auth(sub="openapi-hostile"), **JSON, **headers}, timeout=30)
    assert_documented_error(response, (status,))


def assert_documented_error(response: requests.Response, statuses: tuple[int, ...]) -> None:
    assert response.status_code in statuses, f"{response.status_code} {response.text[:300]}"
    error = response.json()["error"]
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert error["code"] == {400: "invalid_json", 401: "unauthorized", 422: "invalid_request"}[response.status_code]
