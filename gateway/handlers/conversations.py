"""GET /v1/conversations (the agents' lists) and GET /v1/conversations/{id}/events (history pages)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypedDict

import grpc
from aiohttp import web

from gateway import keys
from gateway.clients import request_metadata, session_principal
from gateway.errors import ApiError, InvalidRequest, api_error_from_grpc
from gateway.live.frames import event_frame
from gateway.responses import json_response
from kefu.session.v1 import session_pb2

STATUSES = ("waiting_human", "human", "ai", "closed")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_SEQ = 2**63 - 1
MAX_ID_CHARS = 128
MAX_ASSIGNEE_CHARS = 256
_DIGITS = re.compile(r"^[0-9]{1,19}$")


def query_int(query: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    value = int(raw) if _DIGITS.fullmatch(raw) else -1
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{name}: must be an integer {minimum}..{maximum}")
    return value


def principal_of(request: web.Request) -> session_pb2.Principal:
    return session_principal(request[keys.REQUEST_PRINCIPAL])


class CallOptions(TypedDict):
    """The keyword arguments of every session call from a handler."""

    timeout: float
    metadata: tuple[tuple[str, str], ...]


def call_options(request: web.Request) -> CallOptions:
    return {"timeout": request.app[keys.SETTINGS].rpc_timeout_s,
            "metadata": request_metadata(request[keys.REQUEST_ID])}


def session_error(error: grpc.aio.AioRpcError) -> ApiError:
    if error.code() is grpc.StatusCode.UNIMPLEMENTED:
        # A session service older than this edge (during a rolling update): down for this purpose.
        return ApiError("session_unavailable", "session service: this call is not served yet", 503)
    return api_error_from_grpc(error, "session")


def visible_events(messages: Iterable[session_pb2.Message], *, staff: bool) -> list[session_pb2.Message]:
    """The log as a reader may see it (the session service filters the same way; this edge does not rely
    on it): no notes for visitors, no AI reply generated under a state version a later change voided."""
    version = 0
    visible = []
    for message in messages:
        if message.kind == "state":
            version = max(version, message.state.version)
        elif message.version and message.version < version:
            continue
        elif message.kind == "note" and not staff:
            continue
        visible.append(message)
    return visible


def said_messages(messages: Iterable[session_pb2.Message]) -> list[session_pb2.Message]:
    """Only what was said (kind "message"): no state events, no notes."""
    return [m for m in visible_events(messages, staff=False) if m.kind in ("", "message")]


def summary_json(summary: session_pb2.ConversationSummary) -> dict[str, object]:
    state = summary.state
    item: dict[str, object] = {"conversation_id": summary.session_id, "visitor_id": summary.owner,
                            "status": state.status, "version": state.version}
    if state.assignee:
        item["assignee"] = state.assignee
        item["assignee_name"] = state.assignee_name or state.assignee
    item.update(since=state.since, created_at=summary.created_at, updated_at=summary.updated_at)
    if state.status == "waiting_human":
        item["waiting_since"] = state.since
    item["preview"] = summary.preview
    return item


async def list_conversations(request: web.Request) -> web.Response:
    query = request.query
    status = query.get("status", "")
    if status and status not in STATUSES:
        raise InvalidRequest(f"status: must be one of {', '.join(STATUSES)}")
    assignee = query.get("assignee", "")
    if len(assignee) > MAX_ASSIGNEE_CHARS:
        raise InvalidRequest(f"assignee: at most {MAX_ASSIGNEE_CHARS} characters")
    limit = query_int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    try:
        reply = await request.app[keys.CLIENTS].session.ListConversations(
            session_pb2.ListConversationsRequest(principal=principal_of(request), status=status, assignee=assignee,
                                                 limit=limit), **call_options(request))
    except grpc.aio.AioRpcError as error:
        raise session_error(error) from None
    return json_response({"conversations": [summary_json(c) for c in reply.conversations[:limit]]})


async def conversation_events(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    after_seq = query_int(request.query, "after_seq", 0, 0, MAX_SEQ)
    limit = query_int(request.query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    if len(conversation_id) > MAX_ID_CHARS:
        raise ApiError("not_found", "no such conversation", 404)
    principal = request[keys.REQUEST_PRINCIPAL]
    try:
        reply = await request.app[keys.CLIENTS].session.ListMessages(
            session_pb2.ListMessagesRequest(principal=principal_of(request), session_id=conversation_id),
            **call_options(request))
    except grpc.aio.AioRpcError as error:
        raise session_error(error) from None
    staff = principal.role != "visitor"
    later = [m for m in visible_events(reply.messages, staff=staff) if m.seq > after_seq]
    page = later[:limit]
    owner = "" if staff else principal.subject
    return json_response({
        "conversation_id": conversation_id,
        "events": [event_frame(conversation_id, m, owner) for m in page],
        "next_after_seq": page[-1].seq if page else after_seq,
        "has_more": len(later) > limit})
