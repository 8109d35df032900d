"""What the fake OpenAI server checks of a request before it answers: the API key, a Chat Completions body
(as OpenAI validates it), and its errors in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web

MESSAGE_ROLES = ("system", "assistant", "user", "function", "tool", "developer")

# OpenAI's `type` (and `code`) per HTTP status, as its API sends them.
ERROR_TYPES: Mapping[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        error_type, default_code = ERROR_TYPES.get(self.status, ("server_error", None))
        body = {
            "error": {
                "message": self.message,
                "type": error_type,
                "param": self.param,
                "code": self.code if self.code is not None else default_code,
            }
        }
        return web.json_response(body, status=self.status)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a valid Chat Completions body the fake uses."""

    model: str
    messages: Sequence[Mapping[str, object]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    """max_completion_tokens, else max_tokens."""


def check_auth(request: web.Request, expected_api_key: str | None) -> None:
    if expected_api_key is None:
        return
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    if header.removeprefix("Bearer ") != expected_api_key:
        # The real API echoes a masked key; the fake echoes none of it.
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def _check_int(body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(
            400, f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type"
        )
    if value < 1:
        raise ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


def _check_messages(messages: object) -> list[Mapping[str, object]]:
    if messages is None:
        raise ApiError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise ApiError(
            400,
            "Invalid type for 'messages': expected an array of objects.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise ApiError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(
                400, f"Invalid type for '{where}': expected an object.", param=where, code="invalid_type"
            )
        if message.get("role") not in MESSAGE_ROLES:
            supported = ", ".join(f"'{r}'" for r in MESSAGE_ROLES)
            raise ApiError(
                400,
                f"Invalid value: '{message.get('role')}'. Supported values are: {supported}.",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = message.get("content")
        if content is None and message["role"] != "assistant":
            raise ApiError(
                400,
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        if content is not None and not isinstance(content, str | list):
            raise ApiError(
                400,
                f"Invalid type for '{where}.content': expected one of a string or array of objects.",
                param=f"{where}.content",
                code="invalid_type",
            )
    return messages


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a Chat Completions body the way the real API does (the parts the fake uses)."""
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter")
    messages = _check_messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(
            400, "Invalid type for 'stream': expected a boolean.", param="stream", code="invalid_type"
        )
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if options is not None and not isinstance(options, dict):
        raise ApiError(
            400,
            "Invalid type for 'stream_options': expected an object.",
            param="stream_options",
            code="invalid_type",
        )
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 2):
        raise ApiError(
            400,
            f"Invalid 'temperature': expected a number between 0 and 2, got {temperature!r}.",
            param="temperature",
            code="invalid_value",
        )
    max_tokens = _check_int(body, "max_completion_tokens") or _check_int(body, "max_tokens")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        max_tokens=max_tokens,
    )
