"""The edge bench's parameters: modes, concurrencies, rounds, the slow upstream of the open-stream phase."""

from __future__ import annotations

from dataclasses import dataclass

from bench.chat_params import REPLY

MODES = ("json", "stream")
"""`json`: `stream: false`, one JSON completion; `stream`: SSE chunks, timed to the first content delta."""
PATHS = ("direct", "kefu")


@dataclass(frozen=True, slots=True)
class EdgeParams:
    concurrency: tuple[int, ...] = (100, 1000)
    modes: tuple[str, ...] = MODES
    rounds: int = 3
    """Measured rounds per mode, concurrency and path."""
    min_requests: int = 300
    """Requests per round: every user sends min_requests // concurrency of them, at least one."""
    ttft_ms: float = 50.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 120.0
    """Deadline of one request in the rate rounds."""
    levels: tuple[int, ...] = (1000, 5000, 10000)
    open_parallel: int = 200
    open_interval_ms: float = 30_000.0
    """The slow upstream's chunk interval: below the worker's 60 s idle timeout, and long enough
    that 10k streams cost little CPU to hold (10k / 30 s = 333 deltas/s through the whole path)."""
    open_chunks: int = 30
    open_budget_s: float = 300.0
    rates: bool = True
    open_streams: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {self.concurrency}")
        if not set(self.modes) <= set(MODES) or not self.modes:
            raise ValueError(f"--modes must be a subset of {MODES}, got {self.modes}")
        if self.rounds < 1 or self.min_requests < 1:
            raise ValueError("--rounds and --min-requests must be >= 1")
        if self.open_chunks > len(REPLY):
            raise ValueError(f"--open-chunks must be <= {len(REPLY)} (the reply's characters)")
        if self.open_interval_ms >= 60_000:
            raise ValueError("--open-interval-ms must stay below the worker's 60 s idle timeout")


QUICK = EdgeParams(rounds=1, levels=(1000,))
