"""Channels of internal gRPC callers: every call carries `authorization: Bearer <KEFU_INTERNAL_TOKEN>`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TypeAlias, TypeVar

import grpc

from services.common.grpc_server import AUTHORIZATION_METADATA_KEY
from services.common.settings import internal_tokens

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
Metadata = tuple[tuple[str, str], ...]
Serializer: TypeAlias = Callable[[RequestT], bytes]
Deserializer: TypeAlias = Callable[[bytes], ResponseT]


def internal_metadata(token: str) -> Metadata:
    """The metadata that authenticates an internal caller (empty when internal auth is off).

    `token` is a KEFU_INTERNAL_TOKEN value: of a rotation list ("new,old") the first is sent."""
    tokens = internal_tokens(token)
    return ((AUTHORIZATION_METADATA_KEY, f"Bearer {tokens[0]}"),) if tokens else ()


CallMetadata: TypeAlias = "grpc.aio.Metadata | Sequence[tuple[str, str | bytes]]"
"""What a call may carry as its own metadata (grpc.aio's MetadataType)."""


def _merged(fixed: Metadata, metadata: CallMetadata | None) -> CallMetadata:
    return fixed if not metadata else (*tuple(metadata), *fixed)


# One wrapper per kind of multicallable (what a stub calls), each adding fixed metadata to the call's own.
class _UnaryUnary(grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT]):
    def __init__(self, inner: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT], metadata: Metadata) -> None:
        self._inner, self._metadata = inner, metadata

    def __call__(self, request: RequestT, *, timeout: float | None = None, metadata: CallMetadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> grpc.aio.UnaryUnaryCall[RequestT, ResponseT]:
        return self._inner(request, timeout=timeout, metadata=_merged(self._metadata, metadata),
                           credentials=credentials, wait_for_ready=wait_for_ready, compression=compression)


class _UnaryStream(grpc.aio.UnaryStreamMultiCallable[RequestT, ResponseT]):
    def __init__(self, inner: grpc.aio.UnaryStreamMultiCallable[RequestT, ResponseT], metadata: Metadata) -> None:
        self._inner, self._metadata = inner, metadata

    def __call__(self, request: RequestT, *, timeout: float | None = None, metadata: CallMetadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> grpc.aio.UnaryStreamCall[RequestT, ResponseT]:
        return self._inner(request, timeout=timeout, metadata=_merged(self._metadata, metadata),
                           credentials=credentials, wait_for_ready=wait_for_ready, compression=compression)


class _StreamUnary(grpc.aio.StreamUnaryMultiCallable[RequestT, ResponseT]):
    def __init__(self, inner: grpc.aio.StreamUnaryMultiCallable[RequestT, ResponseT], metadata: Metadata) -> None:
        self._inner, self._metadata = inner, metadata

    def __call__(self, request_iterator: AsyncIterator[RequestT] | Iterator[RequestT] | None = None,
                 timeout: float | None = None, metadata: CallMetadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> grpc.aio.StreamUnaryCall[RequestT, ResponseT]:
        return self._inner(request_iterator, timeout=timeout, metadata=_merged(self._metadata, metadata),
                           credentials=credentials, wait_for_ready=wait_for_ready, compression=compression)


class _StreamStream(grpc.aio.StreamStreamMultiCallable[RequestT, ResponseT]):
    def __init__(self, inner: grpc.aio.StreamStreamMultiCallable[RequestT, ResponseT], metadata: Metadata) -> None:
        self._inner, self._metadata = inner, metadata

    def __call__(self, request_iterator: AsyncIterator[RequestT] | Iterator[RequestT] | None = None,
                 timeout: float | None = None, metadata: CallMetadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> grpc.aio.StreamStreamCall[RequestT, ResponseT]:
        return self._inner(request_iterator, timeout=timeout, metadata=_merged(self._metadata, metadata),
                           credentials=credentials, wait_for_ready=wait_for_ready, compression=compression)


class InternalChannel(grpc.aio.Channel):
    """A grpc.aio channel whose every call is authenticated, so no call site can forget the credential.

    Wrapping the multicallables costs one tuple per call; client interceptors would add a task and a
    wrapper call object to each one (grpc.aio runs intercepted calls through InterceptedCall)."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._channel = channel
        self._metadata = internal_metadata(token)

    async def __aenter__(self) -> InternalChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    # Generated stubs pass `_registered_method` (grpcio >= 1.63); types-grpcio's Channel does not declare it.
    def unary_unary(self, method: str, request_serializer: Serializer[RequestT] | None = None,
                    response_deserializer: Deserializer[ResponseT] | None = None,
                    _registered_method: bool | None = False,
                    ) -> grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT]:
        inner = self._channel.unary_unary(method, request_serializer, response_deserializer,
                                          _registered_method=_registered_method)  # type: ignore[call-arg]
        return _UnaryUnary(inner, self._metadata)

    def unary_stream(self, method: str, request_serializer: Serializer[RequestT] | None = None,
                     response_deserializer: Deserializer[ResponseT] | None = None,
                     _registered_method: bool | None = False,
                     ) -> grpc.aio.UnaryStreamMultiCallable[RequestT, ResponseT]:
        inner = self._channel.unary_stream(method, request_serializer, response_deserializer,
                                           _registered_method=_registered_method)  # type: ignore[call-arg]
        return _UnaryStream(inner, self._metadata)

    def stream_unary(self, method: str, request_serializer: Serializer[RequestT] | None = None,
                     response_deserializer: Deserializer[ResponseT] | None = None,
                     _registered_method: bool | None = False,
                     ) -> grpc.aio.StreamUnaryMultiCallable[RequestT, ResponseT]:
        inner = self._channel.stream_unary(method, request_serializer, response_deserializer,
                                           _registered_method=_registered_method)  # type: ignore[call-arg]
        return _StreamUnary(inner, self._metadata)

    def stream_stream(self, method: str, request_serializer: Serializer[RequestT] | None = None,
                      response_deserializer: Deserializer[ResponseT] | None = None,
                      _registered_method: bool | None = False,
                      ) -> grpc.aio.StreamStreamMultiCallable[RequestT, ResponseT]:
        inner = self._channel.stream_stream(method, request_serializer, response_deserializer,
                                            _registered_method=_registered_method)  # type: ignore[call-arg]
        return _StreamStream(inner, self._metadata)


def internal_channel(target: str, token: str, options: Sequence[tuple[str, int | str]] = ()) -> InternalChannel:
    """An insecure (plaintext) channel to a kefu service that authenticates each call with `token`.

    In-cluster traffic is plaintext: NetworkPolicies keep strangers off the ports, the token keeps
    out whoever reaches them anyway. `async with internal_channel(...) as channel:` closes it."""
    return InternalChannel(grpc.aio.insecure_channel(target, options=options), token)
