"""The live-chat bench's parameters (bench/ws_bench.py): sockets, resume sizes, rates, phases."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("idle", "resume", "latency")


@dataclass(frozen=True, slots=True)
class WsBenchParams:
    sockets: int = 10_000
    client_processes: int = 2
    connect_parallel: int = 100
    """Handshakes in flight at once, per client process."""
    heartbeat_s: float = 30.0
    """KEFU_WS_HEARTBEAT_S during the run (and the floor's); the edge's default. A short one on a busy
    2-core machine closes sockets whose pong is late (aiohttp waits heartbeat / 2 for it)."""
    hold_s: float = 35.0
    """Longer than the heartbeat: every held socket is pinged, and answers, at least once."""
    resume_events: tuple[int, ...] = (50, 500)
    resume_rounds: int = 7
    rate: float = 500.0
    """Visitor messages per second, all visitors together."""
    sweep: tuple[float, ...] = (100.0, 200.0, 300.0)
    """Further rates measured for kefu alone after `rate`: where p99 stays within 50 ms."""
    visitors: int = 200
    agents: int = 4
    duration_s: float = 20.0
    warmup_s: float = 3.0
    phases: tuple[str, ...] = PHASES
    floor: bool = True
    send_queue: int | None = None
    """KEFU_WS_SEND_QUEUE for the run; None keeps the edge's default."""

    def __post_init__(self) -> None:
        if self.sockets < 1 or self.client_processes < 1 or self.connect_parallel < 1:
            raise ValueError("--sockets, --client-processes and --connect-parallel must be >= 1")
        if not self.phases or not set(self.phases) <= set(PHASES):
            raise ValueError(f"--phases must be a subset of {PHASES}, got {self.phases}")
        if not self.resume_events or min(self.resume_events) < 2 or self.resume_rounds < 1:
            raise ValueError("--resume-events must be >= 2 and --resume-rounds >= 1")
        if self.rate <= 0 or any(r <= 0 for r in self.sweep) or self.visitors < 1 or self.agents < 1 \
                or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("--rate, --visitors, --agents and --duration-s must be positive")
        if self.heartbeat_s < 1 or self.hold_s < 0:
            raise ValueError("--heartbeat-s must be >= 1 and --hold-s >= 0")


QUICK = WsBenchParams(sockets=1000, hold_s=6.0, heartbeat_s=5.0, resume_rounds=3, rate=200.0, sweep=(100.0,),
                      visitors=50, agents=2, duration_s=5.0, warmup_s=1.0)


RESUME_CASES = ("cold", "warm", "direct")
