"""Upstream failures become the gRPC codes the edge turns into HTTP statuses."""

from __future__ import annotations

import grpc
import pytest

from services.llm_worker.plugin_api import ProviderError
from services.llm_worker.server import status_of


def timed_out() -> ProviderError:
    error = ProviderError("first token timed out", retryable=True)
    error.__cause__ = TimeoutError()
    return error


@pytest.mark.parametrize("error,code", [
    (ProviderError("rate limited", retryable=True, status=429), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ProviderError("bad gateway", retryable=True, status=502), grpc.StatusCode.UNAVAILABLE),
    (ProviderError("connection refused", retryable=True), grpc.StatusCode.UNAVAILABLE),
    (ProviderError("bad key", status=401), grpc.StatusCode.FAILED_PRECONDITION),
    (ProviderError("no such model", status=404), grpc.StatusCode.INVALID_ARGUMENT),
    (ProviderError("context too long", status=400), grpc.StatusCode.INVALID_ARGUMENT),
    (timed_out(), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_status_of_upstream_failures(error: ProviderError, code: grpc.StatusCode) -> None:
    assert status_of(error) is code
