"""The scale bench's fixed figures: tenants, seeded statuses, timer limits, the latency run and socket spread."""

from __future__ import annotations

from bench.ws_params import WsBenchParams
from services.session.schedule import TimerLimits

TENANTS = 10
TENANT = "t0"
"""Seeded conversations go to t0..t9; the turns and the lists run in t0, among a tenth of them."""
DAY_S = 24 * 3600.0
LIMITS = TimerLimits(wait_s=DAY_S, idle_s=DAY_S, retention_s=7 * DAY_S)
SEED_STATUSES = ("closed", "closed", "closed", "closed", "closed", "closed", "ai", "ai", "waiting_human", "human")
"""A day's store: most conversations closed, some open with the AI, some waiting for or with an agent."""
LIST_QUERIES = ("waiting_human", "human", "ai", "closed", "")
"""The agent queue first; "" is the list without a status filter."""
LATENCY = WsBenchParams(rate=100.0, visitors=100, agents=4, duration_s=20.0, warmup_s=3.0)
"""Visitor-to-agent latency while the sockets are held: 100 messages/s among them (issue 19)."""
SOCKETS_PER_ADDRESS = 25_000
"""One source address runs out of ephemeral ports near 28k connections to one server port."""
OPEN_FILES = 1 << 20
"""RLIMIT_NOFILE wanted for the bench and the stack it starts (the hard limit too, where allowed: root)."""
NATS = "nats-server"
"""The name the scale report gives nats-server's process."""
