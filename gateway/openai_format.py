"""The OpenAI Chat Completions wire format: request schema and response/chunk builders (pure)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import pydantic

from gateway.errors import ApiError

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
MAX_COMPLETION_TOKENS = 32_768

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(error: ApiError, request_id: str) -> dict[str, Any]:
    """OpenAI's error shape, which the SDKs parse into their exception types."""
    return {"error": {"message": error.message, "type": _ERROR_TYPES.get(error.status, "api_error"),
                      "param": None, "code": error.code, "request_id": request_id}}


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    include_usage: bool = False


class CompletionRequest(pydantic.BaseModel):
    """The fields kefu honours; others that SDKs send (top_p, stop, ...) are accepted and ignored."""

    model_config = pydantic.ConfigDict(extra="ignore")

    model: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]
    messages: Annotated[list[MessageIn], pydantic.Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    temperature: Annotated[float, pydantic.Field(ge=0, le=2)] | None = None
    user: Annotated[str, pydantic.StringConstraints(max_length=256)] | None = None
    n: Annotated[int, pydantic.Field(ge=1, le=1)] | None = None


def completion_id(message_id: str) -> str:
    return f"chatcmpl-{message_id}"


def chunk(message_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None,
          citations: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """One streamed chunk; the last one (with `finish_reason`) also carries kefu's top-level `citations`."""
    body: dict[str, Any] = {"id": completion_id(message_id), "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish_reason}]}
    if citations is not None:
        body["citations"] = citations
    return body


def usage_chunk(message_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int,
                ) -> dict[str, Any]:
    return {"id": completion_id(message_id), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(message_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, citations: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The non-stream object, with kefu's top-level `citations` (the tenant's documents it cites)."""
    return {"id": completion_id(message_id), "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                                 "refusal": None},
                                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "citations": citations or []}


def openai_finish_reason(reason: str) -> str:
    """kefu's own reasons mapped onto the values SDKs know ("handoff" is a normal stop)."""
    return reason if reason in ("stop", "length", "content_filter") else "stop"
