"""The edge's mutable run state, owned by the app: draining flag and open stream count."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EdgeState:
    draining: bool = False
    """Set on SIGTERM: /readyz says 503 and new /v1 requests are refused while streams finish."""
    open_streams: int = 0
