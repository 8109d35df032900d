"""gateway/openapi.json: valid OpenAPI 3.1, exactly the app's routes, the request models' own constraints."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic
import pytest
from aiohttp import hdrs, web
from openapi_spec_validator import OpenAPIV31SpecValidator

from devtools.devstack.stack import free_port
from gateway import keys
from gateway.app import create_app
from gateway.handlers import openai_compat, openapi
from gateway.handlers.blacklist import BlacklistBody
from gateway.handlers.canned_replies import CannedReplyBody
from gateway.handlers.chat import ChatBody
from gateway.handlers.console_login import LoginBody
from gateway.handlers.knowledge import DocumentBody, SearchBody
from gateway.handlers.tenant_settings import TenantSettingsBody
from gateway.handlers.widget_token import WidgetTokenBody
from gateway.middlewares import PUBLIC_API_PATHS, PUBLIC_PATHS
from gateway.openai_format import CompletionRequest
from gateway.settings import GatewaySettings
from tests.gateway.live_http_support import EdgeClient

ClientFactory = Callable[[web.Application], Awaitable[EdgeClient]]
DOCUMENT: dict[str, Any] = json.loads(openapi.DOCUMENT_PATH.read_text(encoding="utf-8"))
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DEFAULT_MAX_MESSAGE_CHARS = GatewaySettings.model_fields["max_message_chars"].default


def settings(**overrides: object) -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: no test here reaches a backend
    values: dict[str, object] = {"jwt_secret": "test-secret-that-is-long-enough-for-hs256", "session_addr": dead,
                                 "moderation_addr": dead, "worker_addr": dead}
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]  # overrides of any field


def documented_operations() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item
            if method in HTTP_METHODS}


def registered_operations(app: web.Application) -> set[tuple[str, str]]:
    routes = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None}
    # add_get() also registers HEAD for the same handler; HEAD is implied by GET in the document.
    implicit_heads = {(hdrs.METH_HEAD, path) for method, path in routes if method == hdrs.METH_GET}
    return routes - implicit_heads


def test_openapi_document_is_valid_openapi_3_1() -> None:
    OpenAPIV31SpecValidator(DOCUMENT).validate()
    assert DOCUMENT["openapi"].startswith("3.1.")
    assert DOCUMENT["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"


def test_openapi_document_lists_exactly_the_registered_routes() -> None:
    assert documented_operations() == registered_operations(create_app(settings()))


def test_openapi_document_security_matches_the_auth_middleware() -> None:
    roles = create_app(settings())[keys.ROUTE_ROLES]
    for method, path in documented_operations():
        operation = DOCUMENT["paths"][path][method.lower()]
        if path in roles:  # auth_middleware: a verified JWT with one of these roles, then the rate limits
            assert operation["security"] == [{"bearerAuth": []}], (method, path)
            assert {"401", "429"} <= set(operation["responses"]), (method, path)
        elif path in PUBLIC_API_PATHS:  # they hand tokens out: no JWT needed (the widget token renews one)
            assert operation["security"] in ([], [{"bearerAuth": []}, {}]), (method, path)
            assert "429" in operation["responses"], (method, path)
        elif path.startswith("/v1/"):  # the WebSocket: the token in a header or in its first frame
            assert operation["security"] == [{"bearerAuth": []}, {}], (method, path)
            assert "401" not in operation["responses"], (method, path)
        else:
            assert operation["security"] == [], (method, path)
        assert (path in roles) <= path.startswith("/v1/"), path
    scheme = DOCUMENT["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert "/openapi.json" in PUBLIC_PATHS


def test_openapi_every_response_documents_x_request_id() -> None:
    responses = [response for item in DOCUMENT["paths"].values() for method, operation in item.items()
                 if method in HTTP_METHODS for response in operation["responses"].values()]
    for response in responses:
        if "$ref" in response:
            response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        assert response["headers"]["X-Request-Id"] == {"$ref": "#/components/headers/X-Request-Id"}
    assert DOCUMENT["components"]["headers"]["X-Request-Id"]["required"] is True


def test_openapi_rate_limited_responses_document_the_limit_headers() -> None:
    for name, response in DOCUMENT["components"]["responses"].items():
        if name.endswith("429"):
            assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(
                response["headers"]), name


# --- request bodies: the document against the pydantic models the handlers validate with -------------

# Keywords that constrain a value; titles and descriptions are free text.
CONSTRAINTS = ("type", "const", "enum", "minLength", "maxLength", "pattern", "minimum", "maximum",
               "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "default")

# What the handlers check beyond the pydantic model, which the document states as schema too:
# {(schema path): {keyword: the value the code uses}}.
EDGE_RULES: dict[tuple[str, ...], dict[str, Any]] = {
    ("ChatBody", "message"): {"maxLength": DEFAULT_MAX_MESSAGE_CHARS,  # chat(): settings.max_message_chars
                              "pattern": None},  # chat(): a blank message -> 422; see blank_rule()
    ("CompletionRequest", "messages"): {"maxItems": openai_compat.MAX_HISTORY_MESSAGES},
    ("CompletionRequest", "messages", "items", "content", "anyOf0"): {"maxLength": DEFAULT_MAX_MESSAGE_CHARS},
    ("CompletionRequest", "messages", "items", "content", "anyOf1", "items", "text"): {
        "maxLength": DEFAULT_MAX_MESSAGE_CHARS},
}


def resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, kind, name = schema["$ref"].split("/")
        schema = root[kind][name] if kind == "$defs" else SCHEMAS[name]
    return schema


def compare(model: dict[str, Any], doc: dict[str, Any], root: dict[str, Any], path: tuple[str, ...],
            problems: list[str]) -> None:
    model, doc = resolve(model, root), resolve(doc, root)
    extras = EDGE_RULES.get(path, {})
    for keyword in CONSTRAINTS:
        if keyword in model and model[keyword] != doc.get(keyword):
            problems.append(f"{'.'.join(path)}: {keyword} is {model[keyword]!r} in the model, "
                            f"{doc.get(keyword)!r} in the document")
        elif keyword not in model and keyword in doc:
            if keyword not in extras:
                problems.append(f"{'.'.join(path)}: the document adds {keyword}={doc[keyword]!r}")
            elif extras[keyword] is not None and extras[keyword] != doc[keyword]:
                problems.append(f"{'.'.join(path)}: {keyword} is {doc[keyword]!r} in the document, "
                                f"{extras[keyword]!r} in the code")
    if model.get("additionalProperties", True) != doc.get("additionalProperties", True):
        problems.append(f"{'.'.join(path)}: additionalProperties differs")
    if set(model.get("required", ())) != set(doc.get("required", ())):
        problems.append(f"{'.'.join(path)}: required {sorted(model.get('required', ()))} in the model, "
                        f"{sorted(doc.get('required', ()))} in the document")
    if set(model.get("properties", {})) != set(doc.get("properties", {})):
        problems.append(f"{'.'.join(path)}: properties {sorted(model.get('properties', {}))} in the model, "
                        f"{sorted(doc.get('properties', {}))} in the document")
    for name in set(model.get("properties", {})) & set(doc.get("properties", {})):
        compare(model["properties"][name], doc["properties"][name], root, (*path, name), problems)
    if "items" in model:
        compare(model["items"], doc.get("items", {}), root, (*path, "items"), problems)
    if "anyOf" in model:
        if len(model["anyOf"]) != len(doc.get("anyOf", ())):
            problems.append(f"{'.'.join(path)}: anyOf has other alternatives")
            return
        for index, (left, right) in enumerate(zip(model["anyOf"], doc["anyOf"], strict=True)):
            compare(left, right, root, (*path, f"anyOf{index}"), problems)


@pytest.mark.parametrize(("model", "document_schema"), [
    (ChatBody, "ChatRequest"), (CompletionRequest, "CompletionRequest"), (WidgetTokenBody, "WidgetTokenRequest"),
    (LoginBody, "ConsoleLoginRequest"), (CannedReplyBody, "CannedReplyRequest"), (BlacklistBody, "BlacklistRequest"),
    (TenantSettingsBody, "TenantSettingsRequest"), (DocumentBody, "KnowledgeDocumentRequest"),
    (SearchBody, "KnowledgeSearchRequest")])
def test_openapi_request_schema_matches_the_pydantic_model(model: type[pydantic.BaseModel],
                                                           document_schema: str) -> None:
    generated = model.model_json_schema()
    root = {"$defs": generated.get("$defs", {})}
    problems: list[str] = []
    compare(generated, SCHEMAS[document_schema], root, (model.__name__,), problems)
    assert problems == []


def blank_rule() -> re.Pattern[str]:
    # JSON Schema patterns are unanchored ECMA-262 regexes; this one (a class of \\t \\n \\f \\r \\uXXXX
    # escapes and ranges) means the same in Python's re.
    return re.compile(SCHEMAS["ChatRequest"]["properties"]["message"]["pattern"])


def test_openapi_blank_rule_is_pythons_str_strip() -> None:
    """chat() refuses a message that str.strip() empties; the pattern refuses exactly those."""
    rule = blank_rule()
    for code in range(0x110000):
        char = chr(code)
        assert char.isspace() != bool(rule.search(char)), f"U+{code:04X}"
    assert rule.search("  hi  ") and not rule.search(" \t\u3000\x1c\n")


# --- the served document -------------------------------------------------------------------------------

async def test_openapi_document_is_served_publicly(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings()))
    response = await client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    assert "X-Request-Id" in response.headers
    assert await response.json() == DOCUMENT


async def test_openapi_document_states_the_configured_message_limit(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(settings(max_message_chars=500)))
    served = await (await client.get("/openapi.json")).json()
    schemas = served["components"]["schemas"]
    assert schemas["ChatRequest"]["properties"]["message"]["maxLength"] == 500
    assert schemas["TextPart"]["properties"]["text"]["maxLength"] == 500
    assert schemas["CompletionMessage"]["properties"]["content"]["anyOf"][0]["maxLength"] == 500
    assert served == openapi.load_document({"max_message_chars": 500})
