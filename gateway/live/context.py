"""What the visitor and agent handlers of one greeted socket share: who it is, its connection, and the
one place a refused request becomes a `nack` or a close."""

from __future__ import annotations

from dataclasses import dataclass

from msgspec import UNSET

from gateway.auth import Principal
from gateway.errors import LIMIT_CODES, ApiError, NotYours, Refused, SocketRefused
from gateway.live.connection import Connection
from gateway.live.feeds import Feeds
from gateway.live.frames import CLOSE_FORBIDDEN, Ack, Nack, Sender
from gateway.live.owed import answer_owed, owed_message
from gateway.live.service import LiveService
from gateway.settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class SocketContext:
    live: LiveService
    connection: Connection
    principal: Principal
    request_id: str

    @property
    def settings(self) -> GatewaySettings:
        return self.live.settings

    @property
    def feeds(self) -> Feeds:
        return self.live.hub.feeds

    def ack(self, cid: str | None, seq: int | None, *, duplicate: bool = False) -> None:
        self.connection.send(Ack(cid, seq or 0, duplicate))

    def fail(self, request_type: str, error: ApiError, *, cid: str | None = None,
             conversation_id: str | None = None) -> None:
        """A request refused: one `nack`, or the socket's close (see `refusal`)."""
        answer = refusal(request_type, error, staff=self.connection.is_staff, cid=cid,
                         conversation_id=conversation_id)
        if isinstance(answer, SocketRefused):
            self.connection.refuse(answer)
        else:
            self.connection.send(answer)

    async def ensure_joined(self, conversation_id: str) -> None:
        if not self.connection.follows(conversation_id):
            count = len(self.connection.conversations)
            if not self.connection.is_staff and count >= self.settings.visitor_max_conversations:
                raise Refused("limit", f"this socket follows {count} conversations already")
            await self.feeds.join(self.connection, conversation_id, None)

    def require_joined(self, conversation_id: str) -> None:
        if not self.connection.follows(conversation_id):
            raise Refused("forbidden", "not subscribed to this conversation")

    async def echoed(self, conversation_id: str, message_id: str) -> None:
        """Wait (bounded) until the stored event reached this socket's feed: the echo comes before
        the ack, and the feed's view of the state is current for the next frame."""
        if message_id:
            await self.feeds.find(self.principal, conversation_id, message_id, self.settings.rpc_timeout_s)

    def peer(self) -> Sender:
        """This socket's client, as `typing` and `read` name it."""
        principal = self.principal
        kind = "agent" if self.connection.is_staff else "visitor"
        return Sender(kind, principal.subject, principal.name) if principal.name else Sender(kind, principal.subject)

    def answer_if_owed(self, conversation_id: str) -> None:
        """A visitor message without its answer (an edge died while it streamed): answer it, once."""
        if owed_message(self.feeds.feed(self.principal.tenant, conversation_id)) is not None:
            live = self.live
            live.hub.spawn(answer_owed(live.hub, live.clients, live.settings, self.principal, conversation_id,
                                       self.request_id, live.tenant_settings))


def refusal(request_type: str, error: ApiError, *, staff: bool, cid: str | None = None,
            conversation_id: str | None = None) -> Nack | SocketRefused:
    """What a refused request becomes: a `nack` naming it; or the socket's close, for a refusal that ends it
    and for a visitor asking for someone else's conversation (agents are told there is no such one)."""
    if isinstance(error, NotYours) and not staff:
        return SocketRefused(CLOSE_FORBIDDEN, "forbidden", "not your conversation")
    if isinstance(error, SocketRefused):
        return error
    message = "no such conversation in your tenant" if isinstance(error, NotYours) else error.message
    code = "limit" if error.code in LIMIT_CODES else error.code  # the message says which limit
    return Nack(request_type, code, message, UNSET if cid is None else cid,
                UNSET if conversation_id is None else conversation_id)
