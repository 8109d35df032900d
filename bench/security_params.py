"""The security bench's parameters and the names it sets up: tenant, agents, the attacker's address."""

from __future__ import annotations

from dataclasses import dataclass

TENANT = "shop1"
AGENT, AGENT_PASSWORD = "bench-agent", "the bench agent's password"
"""The one-address login flood guesses this agent's password (its user-name bucket runs dry)."""
OTHER_AGENT = "bench-agent-2"
K8S_EDGE_MEMORY_LIMIT_MIB = 256  # k8s/base/edge.yaml
ATTACKER_ADDRESS = "127.0.0.50"
"""Where the one-address attacks come from; not a trusted proxy."""
SECRET_ENV = "BENCH_SECURITY_JWT_SECRET"
"""How the attacker process gets the stack's JWT secret (not on its command line)."""


@dataclass(frozen=True, slots=True)
class SecurityParams:
    duration_s: float = 10.0
    visitors: int = 20
    interval_s: float = 1.25
    login_wave: int = 100
    rounds: int = 3
    """Each phase this many times, interleaved: a busy neighbour on the machine then spoils one round, not
    one phase (the report gives the pooled figures and the median of the rounds' ratios)."""

    def __post_init__(self) -> None:
        if min(self.duration_s, self.visitors, self.interval_s, self.login_wave, self.rounds) <= 0:
            raise ValueError("--duration-s, --visitors, --interval-s, --login-wave and --rounds must be positive")
