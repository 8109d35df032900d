"""Answers the AI owes: a turn's lease kept while it streams, and an answer an edge's crash cut off given on
the visitor's resume or resend, once, by one edge (issue 17 item 7).

The session service holds the lease in the conversation's metadata: storing a visitor message in status
"ai" gives the storing edge `KEFU_ANSWER_LEASE_S`; that edge renews it while the answer streams; any
stored answer (or a change of state) ends it. An edge that finds the newest event of a conversation to be
a visitor message claims the lease with an id of its own, which succeeds only once it ran out: then the
edge that had it is gone, and this one answers from the stored conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import grpc

from gateway.auth import Principal
from gateway.chat_turn import ChatTurn, ContextMessage, StreamFailed, TurnDelta, TurnDone, TurnRequest
from gateway.clients import BackendClients, session_principal
from gateway.directory.tenants import TenantSettingsStore
from gateway.errors import ApiError
from gateway.live.feeds import Feed
from gateway.live.frames import AiDelta, MsgEvent
from gateway.live.hub import LiveHub
from gateway.settings import GatewaySettings
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 4
"""Leases one resume or resend waits out (a holder that keeps renewing is alive and answers itself)."""


def owed_message(feed: Feed | None) -> str | None:
    """Id of the visitor message the conversation's newest event is, in status "ai": maybe owed an answer."""
    if feed is None or feed.status != "ai" or not feed.buffer:
        return None
    newest = feed.buffer[-1]
    if not isinstance(newest, MsgEvent) or newest.sender.type != "visitor":
        return None
    return newest.message_id


class AnswerLease:
    """The lease on one owed answer, renewed in the background; `lost` is set if another edge took it."""

    def __init__(self, clients: BackendClients, settings: GatewaySettings, principal: Principal,
                 conversation_id: str, message_id: str, holder: str) -> None:
        self._clients = clients
        self._settings = settings
        self._request = session_pb2.ClaimAnswerRequest(
            principal=session_principal(principal.session_caller()), session_id=conversation_id,
            message_id=message_id, holder=holder, lease_s=settings.answer_lease_s)
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def claim(self) -> session_pb2.ClaimAnswerResponse:
        reply: session_pb2.ClaimAnswerResponse = await self._clients.session.ClaimAnswer(
            self._request, timeout=self._settings.rpc_timeout_s)
        return reply

    def keep(self) -> None:
        self._task = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._settings.answer_lease_s / 3)
            try:
                reply = await self.claim()
            except grpc.aio.AioRpcError as error:
                log.warning("answer lease not renewed: %s", error.code())
                continue  # the next try may still be in time
            if not reply.granted:
                self.lost.set()
                return

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def answer_owed(hub: LiveHub, clients: BackendClients, settings: GatewaySettings, principal: Principal,
                      conversation_id: str, request_id: str, tenant_settings: TenantSettingsStore | None = None,
                      ) -> None:
    """Answer the conversation's newest visitor message if the AI owes it and no live edge answers it."""
    holder = secrets.token_hex(8)
    for _ in range(CLAIM_ATTEMPTS):
        message_id = owed_message(hub.feeds.feed(principal.tenant, conversation_id))
        if message_id is None:
            return
        lease = AnswerLease(clients, settings, principal, conversation_id, message_id, holder)
        try:
            claim = await lease.claim()
        except grpc.aio.AioRpcError as error:
            log.warning("owed answer not claimed: %s", error.code())
            return
        if claim.granted:
            log.info("answering a visitor message whose answer was cut off")
            lease.keep()
            try:
                await _answer(hub, clients, settings, principal, conversation_id, message_id,
                              claim.state.version, request_id, lease, tenant_settings)
            finally:
                await lease.release()
            return
        if not claim.message_id or claim.held_for_s <= 0:
            return  # nothing owed
        await asyncio.sleep(claim.held_for_s + 0.1)  # its holder may be answering: look again once it ran out


async def _answer(hub: LiveHub, clients: BackendClients, settings: GatewaySettings, principal: Principal,
                  conversation_id: str, message_id: str, version: int, request_id: str, lease: AnswerLease,
                  tenant_settings: TenantSettingsStore | None) -> None:
    caller = session_principal(principal.session_caller())
    try:
        built = await clients.session.BuildContext(session_pb2.BuildContextRequest(
            principal=caller, session_id=conversation_id, system_prompt="", max_tokens=settings.context_max_tokens,
            model=settings.model), timeout=settings.rpc_timeout_s)
    except grpc.aio.AioRpcError as error:
        log.warning("owed answer: no context: %s", error.code())
        return
    if not built.messages or built.messages[-1].id != message_id:
        return  # something newer came meanwhile: its own turn answers it
    *earlier, last = built.messages
    # The stored conversation is the whole context: passed as the history of a turn that stores nothing
    # itself (the visitor's message is stored already); the tenant's system prompt goes before it.
    turn = ChatTurn(clients, settings, principal, request_id, tenant_settings)
    events = turn.run(TurnRequest(
        message=last.content, history=tuple(ContextMessage(m.role, m.content) for m in earlier),
        sticky_key=conversation_id))
    parts: list[str] = []
    answer_id = ""
    done: TurnDone | None = None
    try:
        async for event in events:
            if lease.lost.is_set():
                return  # another edge took over: it answers
            if isinstance(event, TurnDelta):
                parts.append(event.text)
                hub.feeds.send_live(principal.tenant, conversation_id,
                                    AiDelta(conversation_id, answer_id, event.text))
            elif isinstance(event, TurnDone):
                done = event
            else:
                answer_id = event.message_id
    except (StreamFailed, ApiError) as failure:
        log.warning("owed answer failed: %s", failure.code)
        return
    finally:
        await events.aclose()
    if done is None or not parts:
        return
    try:
        await clients.session.Append(session_pb2.AppendRequest(
            principal=caller, session_id=conversation_id, role="assistant", content="".join(parts),
            message_id=done.message_id, if_version=version,
            citations=[c.to_session() for c in done.citations]), timeout=settings.rpc_timeout_s)
    except grpc.aio.AioRpcError as error:
        # ABORTED: the conversation changed state meanwhile (an agent claimed): the answer is void.
        log.info("owed answer not stored: %s", error.code())
