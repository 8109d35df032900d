"""GET /v1/sessions/{id}/messages and DELETE /v1/sessions/{id}, scoped to the caller."""

from __future__ import annotations

import grpc
from aiohttp import web

from gateway import keys
from gateway.errors import api_error_from_grpc
from gateway.handlers.conversations import call_options, principal_of, said_messages
from gateway.live.frames import citations_json
from gateway.responses import json_response
from kefu.session.v1 import session_pb2


async def list_messages(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    try:
        reply = await request.app[keys.CLIENTS].session.ListMessages(
            session_pb2.ListMessagesRequest(principal=principal_of(request), session_id=session_id),
            **call_options(request))
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "session") from None
    return json_response({"session_id": session_id, "messages": [
        {"id": m.id, "role": m.role, "content": m.content, "created_at": m.created_at,
         **({"citations": citations_json(m.citations)} if m.role == "assistant" else {})}
        for m in said_messages(reply.messages) if m.role != "system"]})


async def delete_session(request: web.Request) -> web.Response:
    try:
        await request.app[keys.CLIENTS].session.DeleteSession(
            session_pb2.DeleteSessionRequest(principal=principal_of(request),
                                             session_id=request.match_info["session_id"]),
            **call_options(request))
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "session") from None
    hub = request.app.get(keys.LIVE_HUB)
    if hub is not None:  # its open sockets, on every edge, learn that it is gone
        hub.conversation_deleted(request[keys.REQUEST_PRINCIPAL].tenant, request.match_info["session_id"])
    return web.Response(status=204)
