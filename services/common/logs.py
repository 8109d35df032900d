"""JSON-lines logging with the request id of the current call."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

REQUEST_ID_METADATA_KEY = "x-request-id"
"""gRPC metadata key (and HTTP header, case-insensitively) that carries the request id."""

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, exception."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._process = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self._process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(process_name: str, level: str = "INFO") -> None:
    """Configure the root logger once, from a process's `__main__`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless debugging.
    for noisy in ("aiohttp.access", "nats", "grpc", "watchfiles"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
