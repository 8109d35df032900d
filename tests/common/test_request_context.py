"""RequestContextInterceptor: wrapped once per method, yet every call logs under its own request id and is timed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from services.common.grpc_server import bind, create_grpc_server
from services.common.logs import REQUEST_ID_METADATA_KEY, request_id_var

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WATCHED = 3
HealthContext = grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


def _seen(request: health_pb2.HealthCheckRequest) -> int:
    """SERVING when the handler runs under the request id the caller put in `service`."""
    status: int = SERVING if request_id_var.get() == request.service else NOT_SERVING  # grpc_health is untyped
    return status


async def check(request: health_pb2.HealthCheckRequest,
                context: HealthContext) -> health_pb2.HealthCheckResponse:
    await asyncio.sleep(0.01)  # calls overlap: a shared context would show here
    return health_pb2.HealthCheckResponse(status=_seen(request))


async def watch(request: health_pb2.HealthCheckRequest,
                context: HealthContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    for _ in range(WATCHED):
        await asyncio.sleep(0.005)
        yield health_pb2.HealthCheckResponse(status=_seen(request))


def handlers() -> grpc.GenericRpcHandler:
    de, se = health_pb2.HealthCheckRequest.FromString, health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler("probe.Probe", {
        "Check": grpc.unary_unary_rpc_method_handler(check, de, se),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, de, se),
    })


async def test_request_context_each_call_gets_its_own_request_id_and_is_timed() -> None:
    registry = CollectorRegistry()
    server = create_grpc_server(registry, "")
    server.add_generic_rpc_handlers((handlers(),))
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/probe.Probe/Check", health_pb2.HealthCheckRequest.SerializeToString,
                                        health_pb2.HealthCheckResponse.FromString)
            stream = channel.unary_stream("/probe.Probe/Watch", health_pb2.HealthCheckRequest.SerializeToString,
                                          health_pb2.HealthCheckResponse.FromString)

            async def one_check(rid: str) -> int:
                reply = await unary(health_pb2.HealthCheckRequest(service=rid),
                                    metadata=((REQUEST_ID_METADATA_KEY, rid),))
                status: int = reply.status
                return status

            async def one_watch(rid: str) -> list[int]:
                call = stream(health_pb2.HealthCheckRequest(service=rid), metadata=((REQUEST_ID_METADATA_KEY, rid),))
                return [reply.status async for reply in call]

            ids = [f"req-{i}" for i in range(8)]
            checks, watches = await asyncio.gather(asyncio.gather(*map(one_check, ids)),
                                                   asyncio.gather(*map(one_watch, ids)))
            no_id = await unary(health_pb2.HealthCheckRequest(service=""))
    finally:
        await server.stop(0)
    assert checks == [SERVING] * len(ids)
    assert watches == [[SERVING] * WATCHED] * len(ids)
    assert no_id.status == SERVING  # no id sent: none is left over from an earlier call
    count = registry.get_sample_value
    health_calls = {"service": "probe.Probe", "code": "OK"}
    assert count("kefu_grpc_server_handling_seconds_count", {**health_calls, "method": "Check"}) == len(ids) + 1
    assert count("kefu_grpc_server_handling_seconds_count", {**health_calls, "method": "Watch"}) == len(ids)
