"""What live chat needs from the app, in one object the socket handlers share (one per edge process)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field

import grpc

from gateway.auth import JwtVerifier, Principal
from gateway.clients import BackendClients, session_principal
from gateway.directory.account_status import AccountStatus
from gateway.directory.blacklist import Blacklist
from gateway.directory.tenants import TenantSettingsStore
from gateway.errors import Refused
from gateway.live.connection import Connection
from gateway.live.desk import Desks
from gateway.live.feeds import Feed
from gateway.live.frames import CLOSE_AUTH_FAILED, CLOSE_FORBIDDEN, ErrorFrame
from gateway.live.handoff import HandoffRules
from gateway.live.holds import VisitorHolds
from gateway.live.hub import LiveHub
from gateway.metrics import EdgeMetrics
from gateway.settings import GatewaySettings
from gateway.state import EdgeState
from kefu.session.v1 import session_pb2

log = logging.getLogger(__name__)

DEFAULT_OFFLINE_TEXT = ("No agent is online right now; leave a message and we will reply soon. / "
                        "当前没有客服在线，请留言，我们会尽快回复您。")
DEFAULT_WELCOME_TEXT = "Hi! Ask me anything about our shop. / 您好！有什么可以帮您？"

# gRPC status of a refused Transition -> the `nack` code the client gets.
TRANSITION_CODES = {
    grpc.StatusCode.ABORTED: "conflict",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid_state",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.NOT_FOUND: "forbidden",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
}


@dataclass
class LiveService:
    clients: BackendClients
    settings: GatewaySettings
    hub: LiveHub
    desks: Desks
    metrics: EdgeMetrics
    state: EdgeState
    verifier: JwtVerifier
    handoff_rules: HandoffRules
    tenant_settings: TenantSettingsStore | None = None
    """gateway.directory's tenant settings store when present (welcome and offline texts)."""
    blacklist: Blacklist | None = None
    """gateway.directory's Blacklist when present: refuses and closes blocked visitors."""
    accounts: AccountStatus | None = None
    """gateway.directory's AccountStatus when present: a disabled agent account's tokens stop working."""
    visitor_sockets: dict[tuple[str, str], int] = field(default_factory=dict)
    """Open sockets per visitor (tenant, sub) on this process, against KEFU_VISITOR_MAX_SOCKETS."""
    message_holds: VisitorHolds = field(default_factory=lambda: VisitorHolds())
    """Visitors the session service found over their message rate, until one message is allowed again:
    their sends are refused here without a moderation or session call."""
    socket_holds: VisitorHolds = field(default_factory=lambda: VisitorHolds())
    """Visitors whose socket was closed for a frame flood: their new sockets are refused for a while,
    before any session call (a flood that reconnects costs a JWT check, not a history read)."""

    def __post_init__(self) -> None:
        self.desks.on_assigned = self._follow_assignment
        self.desks.on_unassigned = self._drop_assignment

    async def transition(self, principal: Principal, conversation_id: str, action: str, *,
                         reason: str = "", assignee: str = "", assignee_name: str = "",
                         expected_version: int = 0) -> session_pb2.TransitionResponse:
        try:
            reply: session_pb2.TransitionResponse = await self.clients.session.Transition(
                session_pb2.TransitionRequest(
                    principal=session_principal(principal), session_id=conversation_id, action=action,
                    reason=reason, assignee=assignee, assignee_name=assignee_name,
                    expected_version=expected_version),
                timeout=self.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            code = TRANSITION_CODES.get(error.code(), "unavailable")
            if action == "claim" and error.code() is grpc.StatusCode.ABORTED:
                code = "claim_conflict"
            raise Refused(code, error.details() or code) from None
        if not reply.unchanged:
            self.desks.announce(principal.tenant)
        return reply

    async def hand_off(self, principal: Principal, conversation_id: str, reason: str,
                       expected_version: int = 0) -> session_pb2.TransitionResponse:
        """ai -> waiting_human; tells the visitor when nobody is online to answer."""
        reply = await self.transition(principal, conversation_id, "handoff", reason=reason,
                                      expected_version=expected_version)
        if not reply.unchanged and await self.desks.agents_online(principal.tenant) == 0:
            text = await self.tenant_text(principal.tenant, "offline", DEFAULT_OFFLINE_TEXT)
            owner = principal if principal.role == "visitor" else None
            if owner is not None:
                await self._system_message(owner, conversation_id, text, f"offline:{reply.state.version}")
        return reply

    async def tenant_text(self, tenant: str, field: str, default: str) -> str:
        if self.tenant_settings is None:
            return default
        try:
            settings = await self.tenant_settings.get(tenant)
        except Exception:  # the text is a courtesy: never fail a handoff over it
            log.warning("tenant settings unavailable", exc_info=True)
            return default
        return str(getattr(settings, field, "") or default)

    async def _system_message(self, owner: Principal, conversation_id: str, text: str, key: str) -> None:
        # A deterministic id: the same notice for the same state version is stored once.
        message_id = hashlib.sha256(f"{owner.tenant}|{conversation_id}|{key}".encode()).hexdigest()[:32]
        try:
            await self.clients.session.Append(session_pb2.AppendRequest(
                principal=session_principal(owner), session_id=conversation_id, role="system", content=text,
                message_id=message_id), timeout=self.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            log.warning("system notice not stored: %s", error.code())

    def holds(self, connection: Connection, feed: Feed | None) -> bool:
        """May this staff socket speak in the conversation: it holds it (or is an admin)."""
        principal = connection.principal
        assert principal is not None
        if principal.role == "admin":
            return True
        return feed is not None and feed.status == "human" and feed.holder == principal.subject

    def take_socket(self, principal: Principal) -> bool:
        """Count a visitor's new socket; False (and not counted) when it already has the most allowed.

        Per edge process: sockets are this process's memory and file descriptors, and a visitor
        spread over N edges holds at most N times the limit (its messages are limited over all)."""
        if principal.role != "visitor":
            return True
        key = (principal.tenant, principal.subject)
        count = self.visitor_sockets.get(key, 0)
        if count >= self.settings.visitor_max_sockets:
            return False
        self.visitor_sockets[key] = count + 1
        return True

    def release_socket(self, principal: Principal) -> None:
        key = (principal.tenant, principal.subject)
        count = self.visitor_sockets.get(key, 0)
        if count <= 1:
            self.visitor_sockets.pop(key, None)
        else:
            self.visitor_sockets[key] = count - 1

    def blocked(self, principal: Principal, address: str | None) -> bool:
        return (self.blacklist is not None and principal.role == "visitor"
                and bool(self.blacklist.blocks(principal.tenant, principal.subject, address)))

    async def account_disabled(self, principal: Principal) -> bool:
        return self.accounts is not None and bool(await self.accounts.disabled(principal))

    async def watch_disabled_accounts(self, every_s: float) -> None:
        """Close the sockets of agents whose account was disabled since they connected (4001); runs until
        cancelled."""
        while True:
            await asyncio.sleep(every_s)
            try:
                for connection in [s for s in self.hub.connections if s.is_staff and not s.closing]:
                    principal = connection.principal
                    if principal is not None and await self.account_disabled(principal):
                        connection.send(ErrorFrame("unauthorized", "this account is disabled"))
                        connection.close(CLOSE_AUTH_FAILED, "account disabled")
            except Exception:  # the next round tries again; the check must never stop for good
                log.exception("checking agents' accounts failed")

    def close_blocked(self, tenant: str) -> None:
        """A blacklist change: close the tenant's visitor sockets it now refuses."""
        for connection in list(self.hub.connections):
            principal = connection.principal
            if principal is not None and principal.tenant == tenant and self.blocked(principal, connection.address):
                connection.send(ErrorFrame("blocked", "this visitor is blocked"))
                connection.close(CLOSE_FORBIDDEN, "blocked")

    def _drop_assignment(self, tenant: str, conversation_id: str, agent: str) -> None:
        # An agent follows the conversations it holds: after a release, transfer or close its
        # sockets leave (admins keep watching what they opened).
        feed = self.hub.feeds.feed(tenant, conversation_id)
        if feed is None:
            return
        for connection in list(feed.connections):
            principal = connection.principal
            if principal is not None and principal.role == "agent" and principal.subject == agent:
                self.hub.feeds.leave(connection, conversation_id)

    def _follow_assignment(self, tenant: str, conversation_id: str, agent: str) -> None:
        for connection in list(self.hub.connections):
            principal = connection.principal
            if (principal is not None and principal.tenant == tenant and principal.subject == agent
                    and principal.role in ("agent", "admin") and not connection.follows(conversation_id)
                    and not connection.closing):
                self.hub.spawn(self._join_quietly(connection, conversation_id))

    async def _join_quietly(self, connection: Connection, conversation_id: str) -> None:
        try:
            await self.hub.feeds.join(connection, conversation_id, 0)
        except Exception as error:  # the agent can still open it by hand
            log.warning("agent socket not subscribed to an assigned conversation: %s", type(error).__name__)
