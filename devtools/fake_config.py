"""The fake upstream's settings (how it answers, which failure to play) and its request counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_DECLINE_MARKER = "[[HANDOFF]]"
"""kefu's decline marker (services/llm_worker/knowledge/grounding.py DECLINE_MARKER)."""


@dataclass(frozen=True, slots=True)
class FakeUpstreamConfig:
    """How the fake answers; every failure mode is off by default."""

    ttft_s: float = 0.0
    """Delay before the response headers and the first token (prefill time)."""
    chunk_count: int = 8
    """Content chunks per answer (fewer when the reply has fewer characters)."""
    chunk_interval_s: float = 0.0
    """Delay between two content chunks."""
    reply: str | None = None
    """Fixed reply text; None answers "Echo: <last user message>"."""
    model: str | None = None
    """Model named in responses and in /v1/models; None echoes the request's model."""
    expected_api_key: str | None = None
    """When set, a request whose Bearer token differs gets 401."""
    fail_status: int | None = None
    """Answer every valid chat request with this HTTP error status, in OpenAI's error shape."""
    hang_after_chunks: int | None = None
    """Stream this many content chunks, then send nothing more and keep the connection open."""
    truncate_after_chunks: int | None = None
    """Stream this many content chunks, then end the response with no finish chunk and no [DONE]."""
    malformed_after_chunks: int | None = None
    """Stream this many content chunks, then an event whose data is not JSON."""
    keepalive_comments: bool = False
    """Send an SSE comment line before every content chunk, as some proxies and routers do."""
    write_size: int | None = None
    """Split every SSE event into writes of at most this many bytes (multi-byte characters included)."""
    usage: tuple[int, int] | None = None
    """Report these (prompt_tokens, completion_tokens) instead of counting with tiktoken."""
    send_usage: bool = True
    """False ignores stream_options.include_usage, as servers that predate it do."""
    grounded: bool = False
    """Answer like a model told to answer only from numbered passages: when a passage of the prompt
    (a line starting "[n]") shares the question's words, reply with its best sentence and "[n]";
    otherwise reply with `decline_marker` alone. `reply` still wins when set."""
    decline_marker: str = DEFAULT_DECLINE_MARKER
    """What the grounded fake answers when no passage supports an answer."""
    embeddings_fail_status: int | None = None
    """Answer every valid /v1/embeddings request with this HTTP error status."""
    embeddings_delay_s: float = 0.0
    """Delay before an /v1/embeddings answer (a slow or hung embedding model)."""

    def __post_init__(self) -> None:
        if self.ttft_s < 0 or self.chunk_interval_s < 0:
            raise ValueError("ttft_s and chunk_interval_s must be >= 0")
        if self.chunk_count < 1:
            raise ValueError(f"chunk_count must be >= 1, got {self.chunk_count}")
        for name in ("fail_status", "embeddings_fail_status"):
            status = getattr(self, name)
            if status is not None and not 400 <= status <= 599:
                raise ValueError(f"{name} must be an HTTP error status (400..599), got {status}")
        if self.embeddings_delay_s < 0:
            raise ValueError("embeddings_delay_s must be >= 0")
        for name in ("hang_after_chunks", "truncate_after_chunks", "malformed_after_chunks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.write_size is not None and self.write_size < 1:
            raise ValueError(f"write_size must be >= 1, got {self.write_size}")


@dataclass(slots=True)
class FakeUpstreamStats:
    """Request counters; `cancelled` counts streams whose client went away before the end."""

    requests_total: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    completed: int = 0
    """Requests answered in full (a truncated or hung-then-released stream counts too)."""
    failed: int = 0
    """Requests answered with an HTTP error (bad input, bad key, `fail_status`)."""
    cancelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
