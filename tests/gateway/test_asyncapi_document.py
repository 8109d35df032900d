"""docs/asyncapi.yaml: AsyncAPI 3.0 structure, valid schemas, the code's limits, and the frame decoder's verdicts."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from gateway.errors import FrameError
from gateway.live import desk, frames
from gateway.settings import GatewaySettings
from services.session.conversation import REASONS
from services.session.models import STATUSES
from tests.gateway.asyncapi_support import (
    CLIENT_VALIDATORS,
    DOCUMENT,
    inline,
    matching_messages,
    operation_messages,
    pointer,
    refs,
)

SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]
MAX_TEXT = GatewaySettings.model_fields["max_message_chars"].default


# --- (a) the document itself ------------------------------------------------------------------------

def test_asyncapi_document_has_the_required_asyncapi_3_structure() -> None:
    assert DOCUMENT["asyncapi"] == "3.0.0"
    assert isinstance(DOCUMENT["info"]["title"], str) and isinstance(DOCUMENT["info"]["version"], str)
    for server in DOCUMENT["servers"].values():
        assert {"host", "protocol"} <= set(server) and server["protocol"] in ("ws", "wss")
    (channel,) = DOCUMENT["channels"].values()
    assert channel["address"] == "/v1/ws"
    assert {operation["action"] for operation in DOCUMENT["operations"].values()} == {"send", "receive"}
    for name, operation in DOCUMENT["operations"].items():
        assert pointer(operation["channel"]["$ref"]) is channel, name
        for message in operation["messages"]:
            # AsyncAPI 3: an operation's messages are a subset of its channel's.
            assert message["$ref"].startswith(operation["channel"]["$ref"] + "/messages/"), (name, message)
    for name, message in DOCUMENT["components"]["messages"].items():
        assert "payload" in message and message["name"], name


# AsyncAPI 3.0.0's fixed fields of the objects this document uses (any `x-` extension is allowed too).
FIXED_FIELDS = {
    "document": {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations", "components"},
    "info": {"title", "version", "description", "termsOfService", "contact", "license", "tags", "externalDocs"},
    "server": {"host", "protocol", "protocolVersion", "pathname", "description", "title", "summary", "variables",
               "security", "tags", "externalDocs", "bindings"},
    "channel": {"address", "messages", "title", "summary", "description", "servers", "parameters", "tags",
                "externalDocs", "bindings"},
    "operation": {"action", "channel", "title", "summary", "description", "security", "tags", "externalDocs",
                  "bindings", "traits", "messages", "reply"},
    "message": {"headers", "payload", "correlationId", "contentType", "name", "title", "summary", "description",
                "tags", "externalDocs", "bindings", "examples", "traits"},
    "components": {"schemas", "servers", "channels", "operations", "messages", "securitySchemes", "serverVariables",
                   "parameters", "correlationIds", "replies", "replyAddresses", "externalDocs", "tags",
                   "operationTraits", "messageTraits", "serverBindings", "channelBindings", "operationBindings",
                   "messageBindings"},
}
COMPONENT_KEY = re.compile(r"^[a-zA-Z0-9.\-_]+$")


def unknown_fields(node: dict[str, Any], kind: str) -> set[str]:
    return {key for key in node if key not in FIXED_FIELDS[kind] and not key.startswith("x-")}


def test_asyncapi_objects_use_only_the_specifications_fields() -> None:
    problems = [("document", unknown_fields(DOCUMENT, "document")), ("info", unknown_fields(DOCUMENT["info"], "info")),
                ("components", unknown_fields(DOCUMENT["components"], "components"))]
    problems += [(name, unknown_fields(server, "server")) for name, server in DOCUMENT["servers"].items()]
    problems += [(name, unknown_fields(channel, "channel")) for name, channel in DOCUMENT["channels"].items()]
    problems += [(name, unknown_fields(op, "operation")) for name, op in DOCUMENT["operations"].items()]
    problems += [(name, unknown_fields(m, "message")) for name, m in DOCUMENT["components"]["messages"].items()]
    assert not [problem for problem in problems if problem[1]]
    for kind, entries in DOCUMENT["components"].items():
        assert all(COMPONENT_KEY.fullmatch(key) for key in entries), kind


@pytest.mark.parametrize("name", sorted(DOCUMENT["components"]["messages"]))
def test_asyncapi_examples_match_their_message(name: str) -> None:
    message = DOCUMENT["components"]["messages"][name]
    assert message["examples"], "every message shows an example"
    validator = Draft202012Validator(inline(message["payload"]))
    for example in message["examples"]:
        assert not [error.message for error in validator.iter_errors(example["payload"])]
        if name.startswith("Client"):
            assert decoder_accepts(example["payload"])


def test_asyncapi_every_ref_resolves() -> None:
    found = refs(DOCUMENT)
    assert len(found) > 50
    for ref in found:
        pointer(ref)  # KeyError names the broken one


def test_asyncapi_every_component_is_used() -> None:
    used = set(refs(DOCUMENT))
    unused = [f"#/components/{kind}/{name}" for kind in ("messages", "schemas")
              for name in DOCUMENT["components"][kind] if f"#/components/{kind}/{name}" not in used]
    assert not unused
    channel_messages = set(DOCUMENT["channels"]["live"]["messages"])
    in_operations = {ref["$ref"].rsplit("/", 1)[-1] for op in DOCUMENT["operations"].values() for ref in op["messages"]}
    assert channel_messages == in_operations


@pytest.mark.parametrize("name", sorted(DOCUMENT["components"]["messages"]))
def test_asyncapi_payload_is_a_valid_json_schema(name: str) -> None:
    payload = inline(DOCUMENT["components"]["messages"][name]["payload"])
    # The payloads use only keywords Draft 7 (AsyncAPI's schema format) and Draft 2020-12 share.
    Draft202012Validator.check_schema(payload)
    Draft7Validator.check_schema(payload)


def test_asyncapi_each_message_is_told_apart_by_its_type() -> None:
    for action in ("receive", "send"):
        types = [message["payload"]["properties"]["type"]["const"]
                 for message in operation_messages(action).values()]
        assert len(types) == len(set(types)), action
        for message in operation_messages(action).values():
            assert "type" in message["payload"]["required"]
            assert message["name"] == message["payload"]["properties"]["type"]["const"]


def test_asyncapi_client_frames_are_exactly_the_decoders() -> None:
    types = {message["payload"]["properties"]["type"]["const"] for message in operation_messages("receive").values()}
    assert types == frames.CLIENT_TYPES
    nack = SCHEMAS["Nack"]["properties"]["request_type"]["enum"]
    assert set(nack) == frames.CLIENT_TYPES - {"hello"}  # hello is never nacked: it closes or welcomes


def test_asyncapi_limits_are_the_codes() -> None:
    assert SCHEMAS["Text"]["maxLength"] == MAX_TEXT
    assert SCHEMAS["Note"]["properties"]["text"]["maxLength"] == MAX_TEXT
    assert SCHEMAS["Cid"]["maxLength"] == SCHEMAS["OptionalCid"]["maxLength"] == frames.MAX_CID_CHARS
    assert SCHEMAS["ConversationId"]["maxLength"] == frames.MAX_ID_CHARS
    assert SCHEMAS["Send"]["properties"]["conversation_id"]["maxLength"] == frames.MAX_ID_CHARS
    assert SCHEMAS["Seq"]["maximum"] == frames.MAX_SEQ
    assert SCHEMAS["Hello"]["properties"]["resume"]["maxItems"] == frames.MAX_RESUME
    assert SCHEMAS["Handoff"]["properties"]["reason"]["maxLength"] == frames.MAX_REASON_CHARS
    assert SCHEMAS["Transfer"]["properties"]["agent"]["maxLength"] == frames.MAX_AGENT_ID_CHARS
    queue_item = SCHEMAS["QueueUpdate"]["properties"]["conversations"]
    assert queue_item["maxItems"] == desk.QUEUE_LIMIT
    assert queue_item["items"]["properties"]["preview"]["maxLength"] == desk.PREVIEW_CHARS
    assert set(SCHEMAS["State"]["properties"]["reason"]["enum"]) == REASONS
    assert set(SCHEMAS["Status"]["enum"]) == set(STATUSES)
    assert str(frames.MAX_FRAME_BYTES) in DOCUMENT["info"]["description"].replace(",", "")
    for close_code in (frames.CLOSE_AUTH_FAILED, frames.CLOSE_FORBIDDEN, frames.CLOSE_RATE_LIMITED,
                       frames.CLOSE_BAD_FRAMES, frames.CLOSE_TOO_BIG, frames.CLOSE_DRAINING, frames.CLOSE_TOO_SLOW):
        assert str(close_code) in DOCUMENT["info"]["description"], close_code


# --- (b) the decoder accepts exactly what the schema accepts ----------------------------------------

C = "c" * 32
"""A conversation id."""

# (frame, accepted): each is given to gateway.live.frames.decode and to the client message schemas.
CLIENT_SAMPLES: list[tuple[object, bool]] = [
    # hello
    ({"type": "hello"}, True),
    ({"type": "hello", "token": "a.b.c"}, True),
    ({"type": "hello", "token": None, "resume": None}, True),
    ({"type": "hello", "token": ""}, False),
    ({"type": "hello", "token": 7}, False),
    ({"type": "hello", "resume": []}, True),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": 12}, {"conversation_id": "d"}]}, True),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": -1}]}, False),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": None}]}, False),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": True}]}, False),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": 2**63 - 1}]}, True),
    ({"type": "hello", "resume": [{"conversation_id": C, "after_seq": 2**63}]}, False),
    ({"type": "hello", "resume": [{"after_seq": 1}]}, False),
    ({"type": "hello", "resume": [{"conversation_id": ""}]}, False),
    ({"type": "hello", "resume": ["c1"]}, False),
    ({"type": "hello", "resume": {"conversation_id": C}}, False),
    ({"type": "hello", "resume": [{"conversation_id": f"c{n}"} for n in range(32)]}, True),
    ({"type": "hello", "resume": [{"conversation_id": f"c{n}"} for n in range(33)]}, False),
    # send
    ({"type": "send", "cid": "c1", "text": "多久发货？"}, True),
    ({"type": "send", "cid": "c1", "text": "hi", "conversation_id": C, "extra": [1, 2]}, True),
    ({"type": "send", "cid": "c1", "text": "hi", "conversation_id": None}, True),
    ({"type": "send", "cid": "c1", "text": "hi", "conversation_id": ""}, False),
    ({"type": "send", "cid": "c1", "text": "hi", "conversation_id": "x" * 129}, False),
    ({"type": "send", "cid": "c1", "text": "hi", "conversation_id": "x" * 128}, True),
    ({"type": "send", "cid": "x" * 64, "text": "hi"}, True),
    ({"type": "send", "cid": "x" * 65, "text": "hi"}, False),
    ({"type": "send", "cid": "", "text": "hi"}, False),
    ({"type": "send", "cid": 5, "text": "hi"}, False),
    ({"type": "send", "text": "hi"}, False),
    ({"type": "send", "cid": "c1"}, False),
    ({"type": "send", "cid": "c1", "text": ""}, False),
    ({"type": "send", "cid": "c1", "text": " \n\t\u3000"}, False),
    ({"type": "send", "cid": "c1", "text": "字" * MAX_TEXT}, True),
    ({"type": "send", "cid": "c1", "text": "字" * (MAX_TEXT + 1)}, False),
    ({"type": "send", "cid": "c1", "text": ["hi"]}, False),
    # typing, read
    ({"type": "typing", "conversation_id": C}, True),
    ({"type": "typing", "conversation_id": C, "on": False}, True),
    ({"type": "typing", "conversation_id": C, "on": "yes"}, False),
    ({"type": "typing", "conversation_id": C, "on": None}, False),
    ({"type": "typing"}, False),
    ({"type": "read", "conversation_id": C, "up_to_seq": 0}, True),
    ({"type": "read", "conversation_id": C, "up_to_seq": 41}, True),
    ({"type": "read", "conversation_id": C}, False),
    ({"type": "read", "conversation_id": C, "up_to_seq": "41"}, False),
    # handoff
    ({"type": "handoff", "conversation_id": C}, True),
    ({"type": "handoff", "conversation_id": C, "reason": "想找人工", "cid": "h1"}, True),
    ({"type": "handoff", "conversation_id": C, "reason": None, "cid": None}, True),
    ({"type": "handoff", "conversation_id": C, "reason": "r" * 200}, True),
    ({"type": "handoff", "conversation_id": C, "reason": "r" * 201}, False),
    ({"type": "handoff", "conversation_id": C, "reason": 3}, False),
    ({"type": "handoff", "conversation_id": C, "cid": ""}, False),
    ({"type": "handoff", "conversation_id": None}, False),
    # ping
    ({"type": "ping"}, True),
    ({"type": "ping", "t": 1}, True),
    # agents' frames (a visitor sending them is refused later, with a nack: the decoder accepts them)
    ({"type": "claim", "conversation_id": C, "cid": "k1"}, True),
    ({"type": "claim", "conversation_id": C}, True),
    ({"type": "claim", "cid": "k1"}, False),
    ({"type": "release", "conversation_id": C}, True),
    ({"type": "release", "conversation_id": C, "to": "queue", "cid": "r"}, True),
    ({"type": "release", "conversation_id": C, "to": "ai"}, True),
    ({"type": "release", "conversation_id": C, "to": "human"}, False),
    ({"type": "release", "conversation_id": C, "to": None}, False),
    ({"type": "transfer", "conversation_id": C, "agent": "bob"}, True),
    ({"type": "transfer", "conversation_id": C, "agent": "b" * 256, "cid": "t"}, True),
    ({"type": "transfer", "conversation_id": C, "agent": "b" * 257}, False),
    ({"type": "transfer", "conversation_id": C, "agent": ""}, False),
    ({"type": "transfer", "conversation_id": C}, False),
    ({"type": "close", "conversation_id": C, "cid": "x"}, True),
    ({"type": "close"}, False),
    ({"type": "note", "conversation_id": C, "cid": "n1", "text": "VIP"}, True),
    ({"type": "note", "conversation_id": C, "text": "VIP"}, False),
    ({"type": "note", "conversation_id": C, "cid": "n1", "text": "  "}, False),
    ({"type": "note", "conversation_id": C, "cid": "n1"}, False),
    ({"type": "presence", "status": "online"}, True),
    ({"type": "presence", "status": "away"}, True),
    ({"type": "presence", "status": "busy"}, False),
    ({"type": "presence"}, False),
    # not frames at all
    ({"type": "dance"}, False),
    ({"type": "welcome"}, False),  # a server frame
    ({"type": 1}, False),
    ({"cid": "c1", "text": "hi"}, False),
    ([{"type": "ping"}], False),
    ("ping", False),
    (None, False),
]


def decoder_accepts(frame: object) -> bool:
    try:
        frames.decode(json.dumps(frame), max_text_chars=MAX_TEXT)
    except FrameError:
        return False
    return True


@pytest.mark.parametrize(("frame", "accepted"), CLIENT_SAMPLES, ids=lambda v: json.dumps(v)[:60] if not
                         isinstance(v, bool) else str(v))
def test_asyncapi_client_schema_and_decoder_agree(frame: object, accepted: bool) -> None:
    matched = matching_messages(frame, CLIENT_VALIDATORS)
    assert len(matched) <= 1, matched
    assert (bool(matched), decoder_accepts(frame)) == (accepted, accepted)


def test_asyncapi_decoder_refuses_what_no_json_schema_can_see() -> None:
    """Rules the document states in prose (info.description) because JSON Schema cannot express them: the
    schema lets these through and the decoder refuses them. If the decoder changes, change the prose."""
    duplicate_resume = {"type": "hello", "resume": [{"conversation_id": C}, {"conversation_id": C, "after_seq": 3}]}
    fraction = {"type": "read", "conversation_id": C, "up_to_seq": 4.0}  # JSON Schema's integer includes 4.0
    for frame in (duplicate_resume, fraction):
        assert len(matching_messages(frame, CLIENT_VALIDATORS)) == 1
        assert not decoder_accepts(frame)
    description = DOCUMENT["info"]["description"]
    assert "names each conversation once" in description and "`1.0` is refused" in description
    for raw in ("{not json", "", "[1,"):
        with pytest.raises(FrameError) as refused:
            frames.decode(raw, max_text_chars=MAX_TEXT)
        assert refused.value.code == "invalid_json"
