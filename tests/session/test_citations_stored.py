"""An AI reply's citations are stored with it and come back on every read; only AI replies cite."""

from __future__ import annotations

import grpc

from kefu.session.v1 import session_pb2
from tests.session.live_helpers import Live, principal, refused

CITED = session_pb2.Citation(document_id="returns", title="退换货政策", url="https://shop.example/returns",
                             chunk_id="returns-3-0", quote="7 天内可以申请退货")


async def test_an_ai_replys_citations_are_stored_and_listed(live: Live) -> None:
    visitor = principal("v-cite")
    asked = await live.stub.Append(session_pb2.AppendRequest(principal=visitor, role="user", content="怎么退货？"))
    answered = await live.stub.Append(session_pb2.AppendRequest(
        principal=visitor, session_id=asked.session_id, role="assistant", content="7 天内可以申请退货 [1]",
        citations=[CITED]))
    assert list(answered.message.citations) == [CITED]
    listed = await live.stub.ListMessages(session_pb2.ListMessagesRequest(principal=visitor,
                                                                          session_id=asked.session_id))
    by_role = {m.role: list(m.citations) for m in listed.messages if m.kind in ("", "message")}
    assert by_role == {"user": [], "assistant": [CITED]}


async def test_only_an_ai_reply_cites_and_at_most_twenty(live: Live) -> None:
    visitor = principal("v-cite-2")
    asked = await live.stub.Append(session_pb2.AppendRequest(principal=visitor, role="user", content="hi"))
    message = await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=visitor, session_id=asked.session_id, role="user", content="x", citations=[CITED])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "assistant" in message
    await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=visitor, session_id=asked.session_id, role="assistant", content="x", citations=[CITED] * 21)),
        grpc.StatusCode.INVALID_ARGUMENT)
    await refused(live.stub.Append(session_pb2.AppendRequest(
        principal=visitor, session_id=asked.session_id, role="assistant", content="x",
        citations=[session_pb2.Citation(title="no document")])), grpc.StatusCode.INVALID_ARGUMENT)
