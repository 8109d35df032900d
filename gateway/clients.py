"""gRPC channels and stubs to the three services, created once per process and reused.

Every call on these channels carries the internal credential (KEFU_INTERNAL_TOKEN), added by the
channel itself (services.common.grpc_client.InternalChannel), so no call site can forget it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import Principal
from gateway.call_streams import TurnCalls
from gateway.settings import GatewaySettings
from kefu.llm.v1 import knowledge_pb2_grpc, llm_pb2_grpc
from kefu.moderation.v1 import moderation_pb2_grpc
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.common.logs import REQUEST_ID_METADATA_KEY

# A call that fails before the backend answered anything (a restarted pod, a connection in
# reconnect backoff) is retried by gRPC itself; once a response has started it never is.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})

CHANNEL_OPTIONS: Sequence[tuple[str, int | str]] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # `dns:///host:port` targets resolve to every address; round robin spreads calls over
    # the replicas behind a headless Service instead of pinning one HTTP/2 connection.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


def session_principal(principal: Principal) -> session_pb2.Principal:
    """The caller as the session service's API names it (every session call is scoped to it)."""
    return session_pb2.Principal(tenant=principal.tenant, subject=principal.subject, role=principal.role)


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata of every backend call: the request id, so each service's logs carry it."""
    return ((REQUEST_ID_METADATA_KEY, request_id),)


@dataclass
class BackendClients:
    session_channel: grpc.aio.Channel
    moderation_channel: grpc.aio.Channel
    worker_channel: grpc.aio.Channel
    session: session_pb2_grpc.SessionServiceStub
    moderation: moderation_pb2_grpc.ModerationServiceStub
    llm: llm_pb2_grpc.LlmServiceStub
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub
    call_streams: int
    calls: TurnCalls = field(init=False)
    """A turn's session and moderation calls (SSE and live chat), over `call_streams` long-lived streams per
    service."""

    def __post_init__(self) -> None:
        self.calls = TurnCalls(self.session, self.moderation, self.call_streams)

    @classmethod
    def connect(cls, settings: GatewaySettings) -> BackendClients:
        token = settings.internal_token
        session = internal_channel(settings.session_addr, token, CHANNEL_OPTIONS)
        moderation = internal_channel(settings.moderation_addr, token, CHANNEL_OPTIONS)
        # Uploads travel whole to the worker's KnowledgeService. A client's sends are unlimited by
        # default (the worker raises its receive limit to KEFU_KB_MAX_DOCUMENT_BYTES); only say so here.
        worker = internal_channel(settings.worker_addr, token, (
            *CHANNEL_OPTIONS, ("grpc.max_send_message_length", -1)))
        return cls(session, moderation, worker, session_pb2_grpc.SessionServiceStub(session),
                   moderation_pb2_grpc.ModerationServiceStub(moderation), llm_pb2_grpc.LlmServiceStub(worker),
                   knowledge_pb2_grpc.KnowledgeServiceStub(worker), settings.call_streams)

    def channels(self) -> dict[str, grpc.aio.Channel]:
        return {"session": self.session_channel, "moderation": self.moderation_channel,
                "llm_worker": self.worker_channel}

    async def health(self, timeout_s: float) -> dict[str, bool]:
        """Whether each backend answers its health check with SERVING."""
        result: dict[str, bool] = {}
        for name, channel in self.channels().items():
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
                result[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                result[name] = False
        return result

    async def close(self) -> None:
        await self.calls.close()
        for channel in self.channels().values():
            await channel.close()
