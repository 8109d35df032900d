"""What `make run` reads from `KEFU_*` variables (and `.env`) before it starts the processes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from devtools.devstack.stack import StackPorts
from services.common.settings import KefuSettings

_PORTS = StackPorts()


class DevStackSettings(KefuSettings):
    """The dev stack's own settings; every process it starts reads its own from the variables passed on."""

    data_dir: Path | None = None
    """KEFU_DATA_DIR: kept secrets, NATS data and logs; unset: data/ in the repository."""
    jwt_secret: str = Field("", repr=False)
    """KEFU_JWT_SECRET: else one kept in data/dev_jwt_secret."""
    internal_token: str = Field("", repr=False)
    """KEFU_INTERNAL_TOKEN: else one kept in data/dev_internal_token (none with KEFU_INTERNAL_AUTH=off)."""
    internal_auth: str = "required"
    nats_url: str = Field("", repr=False)
    """KEFU_NATS_URL: an existing NATS; empty starts a local nats-server on KEFU_NATS_PORT."""
    http_port: int = Field(_PORTS.http, ge=0, le=65535)
    session_port: int = Field(_PORTS.session, ge=0, le=65535)
    moderation_port: int = Field(_PORTS.moderation, ge=0, le=65535)
    worker_port: int = Field(_PORTS.worker, ge=0, le=65535)
    session_metrics_port: int = Field(_PORTS.session_metrics, ge=0, le=65535)
    moderation_metrics_port: int = Field(_PORTS.moderation_metrics, ge=0, le=65535)
    worker_metrics_port: int = Field(_PORTS.worker_metrics, ge=0, le=65535)
    nats_port: int = Field(_PORTS.nats, ge=1, le=65535)
    gateway_workers: int = Field(1, ge=1, le=64)

    @classmethod
    def resolved(cls, variables: Mapping[str, str]) -> dict[str, str]:
        # Taken as given: the processes started resolve (and check) the NATS URL and the internal token.
        return dict(variables)

    @property
    def internal_auth_off(self) -> bool:
        return self.internal_auth.strip().lower() == "off"

    @property
    def ports(self) -> StackPorts:
        return StackPorts(http=self.http_port, session=self.session_port, moderation=self.moderation_port,
                          worker=self.worker_port, session_metrics=self.session_metrics_port,
                          moderation_metrics=self.moderation_metrics_port,
                          worker_metrics=self.worker_metrics_port, nats=self.nats_port)
