"""ModerationService.CheckMany: the edge's input checks multiplexed over one stream (issue 20 item 5)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from kefu.moderation.v1 import moderation_pb2
from services.common.call_streams import CallFailed, CallStatus, CallStreamSpec
from services.common.errors import InvalidArgument

Check = Callable[[moderation_pb2.CheckRequest], moderation_pb2.CheckResponse]
log = logging.getLogger(__name__)

CheckManySpec = CallStreamSpec[moderation_pb2.CheckBatch, moderation_pb2.CheckItem, moderation_pb2.CheckResult,
                               moderation_pb2.CheckResults]


def check_many_spec(check: Check) -> CheckManySpec:
    """The stream's items run the unary Check's own work (the servicer's check)."""

    async def run(item: moderation_pb2.CheckItem) -> moderation_pb2.CheckResult:
        log.debug("check %d", item.id)  # as the unary interceptor's "rpc" line: the request id's trace
        if not item.HasField("check"):
            raise CallFailed(CallStatus(grpc.StatusCode.INVALID_ARGUMENT, "the item names no check"))
        try:
            return moderation_pb2.CheckResult(id=item.id, check=check(item.check))
        except InvalidArgument as error:
            raise CallFailed(CallStatus(grpc.StatusCode.INVALID_ARGUMENT, error.message)) from None

    return CallStreamSpec(items=lambda batch: batch.items, is_cancel=lambda item: item.cancel, run=run,
                          failed=failed_result, batch=lambda results: moderation_pb2.CheckResults(results=results),
                          inline=True)  # a check is CPU only: no task per item


def failed_result(item_id: int, status: CallStatus) -> moderation_pb2.CheckResult:
    return moderation_pb2.CheckResult(id=item_id, status=moderation_pb2.CheckStatus(
        code=status.code.value[0], message=status.message, trailers=dict(status.trailers)))
