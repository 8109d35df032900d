"""Channels of internal gRPC callers: every call carries `authorization: Bearer <KEFU_INTERNAL_TOKEN>`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.grpc_server import AUTHORIZATION_METADATA_KEY
from services.common.settings import internal_tokens

Metadata = tuple[tuple[str, str], ...]


def internal_metadata(token: str) -> Metadata:
    """The metadata that authenticates an internal caller (empty when internal auth is off).

    `token` is a KEFU_INTERNAL_TOKEN value: of a rotation list ("new,old") the first is sent."""
    tokens = internal_tokens(token)
    return ((AUTHORIZATION_METADATA_KEY, f"Bearer {tokens[0]}"),) if tokens else ()


class _WithMetadata:
    """A multicallable (what a stub calls) that adds fixed metadata to the call's own."""

    __slots__ = ("_inner", "_metadata")

    def __init__(self, inner: Any, metadata: Metadata) -> None:
        self._inner = inner
        self._metadata = metadata

    def __call__(self, *args: Any, metadata: Sequence[tuple[str, str]] | None = None, **kwargs: Any) -> Any:
        merged = self._metadata if not metadata else (*tuple(metadata), *self._metadata)
        return self._inner(*args, metadata=merged, **kwargs)


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

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_unary(*args, **kwargs), self._metadata)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_stream(*args, **kwargs), self._metadata)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_unary(*args, **kwargs), self._metadata)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_stream(*args, **kwargs), self._metadata)


def internal_channel(target: str, token: str, options: Sequence[tuple[str, Any]] = ()) -> InternalChannel:
    """An insecure (plaintext) channel to a kefu service that authenticates each call with `token`.

    In-cluster traffic is plaintext: NetworkPolicies keep strangers off the ports, the token keeps
    out whoever reaches them anyway. `async with internal_channel(...) as channel:` closes it."""
    return InternalChannel(grpc.aio.insecure_channel(target, options=options), token)
