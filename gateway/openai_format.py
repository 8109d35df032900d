"""The OpenAI Chat Completions wire format: request schema and response/chunk builders (pure)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Literal

import pydantic

from gateway.errors import ApiError
from gateway.settings import MAX_OUTPUT_TOKENS

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
MAX_COMPLETION_TOKENS = MAX_OUTPUT_TOKENS

# What the schema does not declare is collected (extra="allow") and refused by name with a 400
# (CompletionRequest.unsupported): tools, response_format, stop, ... are never dropped while the client
# believes they applied. The document says the same: no additional properties.
_REFUSE_OTHERS = pydantic.ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


class ParameterError(ApiError):
    """A 400 about one named part of the request (OpenAI's `param`)."""

    status = 400

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(code, message)
        self.param = param


class UnsupportedParameters(ParameterError):
    def __init__(self, names: Sequence[str]) -> None:
        super().__init__("unsupported_parameter", f"not supported by kefu: {', '.join(names)}", names[0])
        self.names = tuple(names)


def error_body(error: ApiError, request_id: str) -> dict[str, object]:
    """OpenAI's error shape, which the SDKs parse into their exception types."""
    param = error.param if isinstance(error, ParameterError) else None
    return {"error": {"message": error.message, "type": _ERROR_TYPES.get(error.status, "api_error"),
                      "param": param, "code": error.code, "request_id": request_id}}


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(pydantic.BaseModel):
    model_config = _REFUSE_OTHERS

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    refusal: str | None = None
    """Ignored (an assistant message the SDK hands back)."""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    include_usage: bool = False


class CompletionRequest(pydantic.BaseModel):
    """The fields kefu honours, then those it accepts and ignores; any other one is refused (`unsupported()`)."""

    model_config = _REFUSE_OTHERS

    model: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]
    messages: Annotated[list[MessageIn], pydantic.Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    temperature: Annotated[float, pydantic.Field(ge=0, le=2)] | None = None
    user: Annotated[str, pydantic.StringConstraints(max_length=256)] | None = None
    # The schema says 1 and false; more, or true, is refused by name (400), not by the validator (422).
    n: Annotated[int, pydantic.Field(ge=1, json_schema_extra={"maximum": 1})] | None = None
    logprobs: Annotated[bool, pydantic.Field(json_schema_extra={"const": False})] | None = None
    # Accepted and ignored: they tune sampling or bookkeeping, never what kind of answer comes back.
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported(self) -> list[str]:
        """The parameters sent that kefu does not implement, in the order sent."""
        names = list(self.model_extra or {})
        if self.n is not None and self.n > 1:
            names.append("n")
        if self.logprobs:
            names.append("logprobs")
        for index, message in enumerate(self.messages):
            names += [f"messages[{index}].{name}" for name in message.model_extra or {}]
        return names


def completion_id(message_id: str) -> str:
    return f"chatcmpl-{message_id}"


def chunk(message_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None,
          citations: list[dict[str, str]] | None = None) -> dict[str, object]:
    """One streamed chunk; the last one (with `finish_reason`) also carries kefu's top-level `citations`."""
    body: dict[str, object] = {"id": completion_id(message_id), "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish_reason}]}
    if citations is not None:
        body["citations"] = citations
    return body


def usage_chunk(message_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int,
                ) -> dict[str, object]:
    return {"id": completion_id(message_id), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(message_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, citations: list[dict[str, str]] | None = None) -> dict[str, object]:
    """The non-stream object, with kefu's top-level `citations` (the tenant's documents it cites)."""
    return {"id": completion_id(message_id), "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                                 "refusal": None},
                                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "citations": citations or []}


def openai_finish_reason(reason: str) -> str:
    """kefu's own reasons mapped onto the values SDKs know ("handoff" is a normal stop)."""
    return reason if reason in ("stop", "length", "content_filter") else "stop"
