"""GET /v1/models: the worker's routes in the OpenAI list format, with kefu's targets beside."""

from __future__ import annotations

import grpc
from aiohttp import web

from gateway import keys
from gateway.clients import request_metadata
from gateway.errors import api_error_from_grpc
from gateway.handlers.openai_compat import VISITOR_ROUTE
from gateway.responses import json_response
from kefu.llm.v1 import llm_pb2


async def list_models(request: web.Request) -> web.Response:
    """Staff and `api` tokens see every route; a visitor only the one its turns use (issue 17: an
    anonymous visitor was shown every route and its targets, though it may ask `default` only)."""
    try:
        reply = await request.app[keys.CLIENTS].llm.ListModels(
            llm_pb2.ListModelsRequest(), timeout=request.app[keys.SETTINGS].rpc_timeout_s,
            metadata=request_metadata(request[keys.REQUEST_ID]))
    except grpc.aio.AioRpcError as error:
        raise api_error_from_grpc(error, "llm") from None
    models = reply.models
    if request[keys.REQUEST_PRINCIPAL].is_visitor:
        models = [model for model in models if model.name == VISITOR_ROUTE]
    return json_response({"object": "list", "generation": reply.generation, "data": [
        {"id": model.name, "object": "model", "created": 0, "owned_by": "kefu",
         "targets": [{"provider": t.provider, "model": t.model, "weight": t.weight} for t in model.targets]}
        for model in models]})
