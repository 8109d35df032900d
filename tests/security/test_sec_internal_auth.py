"""Issue 17 item 5: a stranger inside the network can neither call the gRPC services nor use NATS as any role.

Against the running stack (real processes, real nats-server with its users): every service refuses a call
without the internal credential or with a wrong one (UNAUTHENTICATED) while health stays open for probes; NATS
refuses anonymous connections, and each process role's user is held to the subjects that role uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import nats
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.aio.client import Client as NatsClient

from devtools.devstack.stack import REPO_ROOT, Stack, free_port
from kefu.llm.v1 import llm_pb2, llm_pb2_grpc
from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from tests.e2e.stack_helpers import auth, start_stack

TENANT = "shop1"
OWNER = session_pb2.Principal(tenant=TENANT, subject="sec-owner", role="visitor")
Call = Callable[[grpc.aio.Channel], Awaitable[object]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("internal-auth"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def conversation(stack: Stack) -> str:
    """A visitor's conversation with one stored message, made through the edge as a real visitor would."""
    request = urllib.request.Request(
        f"{stack.base_url}/v1/chat", method="POST", headers={**auth(TENANT, OWNER.subject),
                                                             "Content-Type": "application/json"},
        data=json.dumps({"message": "我的订单什么时候发货？", "stream": False}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["session_id"])


def service_calls(stack: Stack, session_id: str) -> dict[str, tuple[int, Call]]:
    """Real RPCs of each service (unary, and streaming where it has one), each worth stealing: the owner's
    messages and context, a free moderation, a free model call."""
    ports = stack.config.ports

    async def list_messages(channel: grpc.aio.Channel) -> object:
        return await session_pb2_grpc.SessionServiceStub(channel).ListMessages(
            session_pb2.ListMessagesRequest(principal=OWNER, session_id=session_id), timeout=15)

    async def build_context(channel: grpc.aio.Channel) -> object:
        return await session_pb2_grpc.SessionServiceStub(channel).BuildContext(
            session_pb2.BuildContextRequest(principal=OWNER, session_id=session_id), timeout=15)

    async def check(channel: grpc.aio.Channel) -> object:
        return await moderation_pb2_grpc.ModerationServiceStub(channel).Check(
            moderation_pb2.CheckRequest(tenant=TENANT, text="你好"), timeout=15)

    async def check_stream(channel: grpc.aio.Channel) -> object:
        call = moderation_pb2_grpc.ModerationServiceStub(channel).CheckStream(timeout=15)
        try:
            await call.write(moderation_pb2.CheckStreamRequest(tenant=TENANT, delta="你好", final=True))
            return await call.read()
        finally:
            call.cancel()

    async def list_models(channel: grpc.aio.Channel) -> object:
        return await llm_pb2_grpc.LlmServiceStub(channel).ListModels(llm_pb2.ListModelsRequest(), timeout=15)

    async def generate(channel: grpc.aio.Channel) -> object:
        call = llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(
            tenant=TENANT, messages=[llm_pb2.ChatMessage(role="user", content="多久发货？")]), timeout=15)
        try:
            return await call.read()
        finally:
            call.cancel()

    return {"session.ListMessages": (ports.session, list_messages),
            "session.BuildContext": (ports.session, build_context),
            "moderation.Check": (ports.moderation, check), "moderation.CheckStream": (ports.moderation, check_stream),
            "llm_worker.ListModels": (ports.worker, list_models), "llm_worker.Generate": (ports.worker, generate)}


async def outcome(port: int, call: Call, token: str | None) -> grpc.StatusCode:
    """The status of `call` on a plain channel (token None: no credential at all) or one sending `token`."""
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target) if token is None else internal_channel(target, token)
    try:
        await call(channel)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        await channel.close()


async def test_every_service_refuses_a_caller_without_the_internal_credential(stack: Stack, conversation: str) -> None:
    token = stack.config.internal_token
    wrong = {"none": None, "wrong": secrets.token_urlsafe(32), "empty": "", "truncated": token[:-1],
             "longer": token + "x"}
    for name, (port, call) in service_calls(stack, conversation).items():
        # The real caller gets through: the refusals below are the credential's doing, nothing else's.
        assert await outcome(port, call, token) is grpc.StatusCode.OK, name
        for label, presented in wrong.items():
            assert await outcome(port, call, presented) is grpc.StatusCode.UNAUTHENTICATED, (name, label)


async def test_a_forged_principal_without_the_credential_reads_nothing(stack: Stack, conversation: str) -> None:
    # The attack of the issue: name the owner as principal and ask the session service for their messages.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.config.ports.session}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await session_pb2_grpc.SessionServiceStub(channel).ListMessages(
                session_pb2.ListMessagesRequest(principal=OWNER, session_id=conversation), timeout=15)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "我的订单" not in (refused.value.details() or "")
    async with internal_channel(f"127.0.0.1:{stack.config.ports.session}", stack.config.internal_token) as channel:
        reply = await session_pb2_grpc.SessionServiceStub(channel).ListMessages(
            session_pb2.ListMessagesRequest(principal=OWNER, session_id=conversation), timeout=15)
    assert any("我的订单" in message.content for message in reply.messages)


async def test_health_answers_without_a_credential_and_reflection_does_not(stack: Stack) -> None:
    ports = stack.config.ports
    for port in (ports.session, ports.moderation, ports.worker):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=15)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=15)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in listing:
                    pass
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        async with internal_channel(f"127.0.0.1:{port}", stack.config.internal_token) as channel:
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=15)
            names = [s.name async for reply in listing for s in reply.list_services_response.service]
            assert "grpc.health.v1.Health" in names


# ------------------------------------------------------------------------------------------------- NATS


class Connection:
    """A NATS connection that records the server's permission errors (nats-py reports them asynchronously)."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def denied(self, what: str) -> bool:
        """Whether the server refused something matching `what` (a subject), once pending traffic is flushed."""
        await self.nc.flush(timeout=15)
        for _ in range(20):
            if any("permissions violation" in e and what.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str, str], Awaitable[Connection]]]:
    opened: list[NatsClient] = []

    async def open_as(url: str, user: str) -> Connection:
        errors: list[str] = []

        async def on_error(error: Exception) -> None:
            errors.append(str(error).lower())

        nc = await nats.connect(url, name=f"sec-test-{user}", inbox_prefix=f"_INBOX.{user}", error_cb=on_error,
                                connect_timeout=2, max_reconnect_attempts=1, allow_reconnect=False)
        opened.append(nc)
        return Connection(nc, errors)

    yield open_as
    for nc in opened:
        await nc.close()


async def test_nats_refuses_a_connection_without_a_user_or_with_a_wrong_password(stack: Stack) -> None:
    address = stack.nats_address
    wrong_password = address.replace("nats://", f"nats://edge:{secrets.token_urlsafe(24)}@")
    for url in (address, wrong_password):
        errors: list[str] = []

        async def on_error(error: Exception, seen: list[str] = errors) -> None:
            seen.append(str(error))

        nc = NatsClient()
        try:
            with pytest.raises((nats.errors.Error, OSError)):
                await nc.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                                 error_cb=on_error)
        finally:
            await nc.close()  # a refused connect leaves nats-py's socket open otherwise
        assert any("Authorization Violation" in e for e in errors), (url.split("@")[-1], errors)


async def test_the_edges_nats_user_cannot_touch_streams_or_subjects_it_does_not_need(
        stack: Stack, conversation: str, connect: Callable[[str, str], Awaitable[Connection]]) -> None:
    edge = await connect(stack.nats_url_as("edge"), "edge")
    admin = await connect(stack.nats_url, "admin")
    js = edge.nc.jetstream(timeout=1)
    before = await admin.nc.jetstream().stream_info("KEFU_MESSAGES")
    # What the edge needs works: it reads the conversation log and fans frames out on its own subjects.
    assert (await js.stream_info("KEFU_MESSAGES")).config.name == "KEFU_MESSAGES"
    live = await edge.nc.subscribe("kefu.live.shop1.c.x")
    await edge.nc.flush()  # the server has the subscription before anything is published
    await admin.nc.publish("kefu.live.shop1.c.x", b"{}")
    assert (await live.next_msg(timeout=15)).data == b"{}"
    # What it does not need is refused: deleting or purging the log, forging a stored message,
    # poisoning the answer cache, creating streams of other roles.
    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "$js.api.stream.delete.kefu_messages": lambda: js.delete_stream("KEFU_MESSAGES"),
        "$js.api.stream.purge.kefu_messages": lambda: js.purge_stream("KEFU_MESSAGES"),
        f"kefu.msg.{TENANT}.{conversation}": lambda: js.publish(f"kefu.msg.{TENANT}.{conversation}", b'{"x": 1}'),
        "$kv.kefu_cache.": lambda: js.publish(f"$KV.kefu_cache.{TENANT}.x", b"forged answer"),
        "$js.api.stream.info.kv_kefu_sessions": lambda: js.stream_info("KV_kefu_sessions"),
    }
    for subject, attempt in attempts.items():
        with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.Error)):
            await attempt()
        assert await edge.denied(subject), (subject, edge.errors)
    after = await admin.nc.jetstream().stream_info("KEFU_MESSAGES")
    assert after.state.messages == before.state.messages  # nothing deleted, purged or forged


async def test_a_role_cannot_listen_to_another_roles_subjects(
        stack: Stack, connect: Callable[[str, str], Awaitable[Connection]]) -> None:
    admin = await connect(stack.nats_url, "admin")
    edge = await connect(stack.nats_url_as("edge"), "edge")
    # The edge may not eavesdrop on the session's replies (message bodies) nor on the worker's commands.
    for subject in ("_INBOX.session.>", "kefu.cache.invalidate", ">"):
        subscription = await edge.nc.subscribe(subject)
        assert await edge.denied(f'subscription to "{subject}"'), (subject, edge.errors)
        await admin.nc.publish(subject.replace(">", "probe"), b"secret")
        with pytest.raises(nats.errors.TimeoutError):
            await subscription.next_msg(timeout=0.3)
    # The worker may not read conversations; the session may not speak on the edges' live subjects.
    worker = await connect(stack.nats_url_as("llm_worker"), "llm_worker")
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await worker.nc.jetstream(timeout=1).get_last_msg("KEFU_MESSAGES", f"kefu.msg.{TENANT}.x")
    assert await worker.denied("$js.api.stream.msg.get.kefu_messages"), worker.errors
    session = await connect(stack.nats_url_as("session"), "session")
    await session.nc.publish("kefu.live.shop1.c.x", b'{"frame": "forged"}')
    assert await session.denied('publish to "kefu.live.shop1.c.x"'), session.errors


def test_a_process_with_a_wrong_nats_password_stops_at_start_with_one_line(stack: Stack) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    env.update({"KEFU_NATS_URL": stack.nats_address, "KEFU_NATS_USER": "session",
                "KEFU_NATS_PASSWORD": "not-the-password", "KEFU_INTERNAL_TOKEN": stack.config.internal_token,
                "KEFU_SESSION_PORT": str(free_port()), "KEFU_SESSION_METRICS_PORT": str(free_port())})
    result = subprocess.run([sys.executable, "-m", "services.session"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("session: NATS at ") and "refused user 'session'" in last and "KEFU_NATS_PASSWORD" in last
    assert "Traceback" not in result.stderr and "not-the-password" not in result.stdout + result.stderr
