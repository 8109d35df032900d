"""SessionService.Calls: the edge's BeginTurn and Append calls multiplexed over one stream (issue 20 item 5)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from kefu.session.v1 import session_pb2
from services.common.call_streams import CallFailed, CallStatus, CallStreamSpec
from services.session.statuses import REFUSALS, status_of

BeginTurn = Callable[[session_pb2.BeginTurnRequest], Awaitable[session_pb2.BeginTurnResponse]]
Append = Callable[[session_pb2.AppendRequest], Awaitable[session_pb2.AppendResponse]]
log = logging.getLogger(__name__)

SessionCallSpec = CallStreamSpec[session_pb2.SessionCallBatch, session_pb2.SessionCall, session_pb2.SessionResult,
                                 session_pb2.SessionResultBatch]


def call_stream_spec(begin_turn: BeginTurn, append: Append) -> SessionCallSpec:
    """The stream's calls run the unary RPCs' own work (the servicer's begin_turn and append)."""

    async def run(call: session_pb2.SessionCall) -> session_pb2.SessionResult:
        kind = call.WhichOneof("call")
        log.debug("call %d: %s", call.id, kind)  # as the unary interceptor's "rpc" line: the request id's trace
        try:
            match kind:
                case "begin_turn":
                    return session_pb2.SessionResult(id=call.id, begin_turn=await begin_turn(call.begin_turn))
                case "append":
                    return session_pb2.SessionResult(id=call.id, append=await append(call.append))
        except REFUSALS as error:
            raise CallFailed(status_of(error)) from None
        raise CallFailed(CallStatus(grpc.StatusCode.INVALID_ARGUMENT, "the call names no request"))

    return CallStreamSpec(items=lambda batch: batch.calls, is_cancel=lambda call: call.cancel, run=run,
                          failed=failed_result, batch=lambda results: session_pb2.SessionResultBatch(results=results))


def failed_result(call_id: int, status: CallStatus) -> session_pb2.SessionResult:
    return session_pb2.SessionResult(id=call_id, status=session_pb2.CallStatus(
        code=status.code.value[0], message=status.message, trailers=dict(status.trailers)))
