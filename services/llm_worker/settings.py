"""Settings of the LLM worker, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlparse

from services.common.settings import SettingsError, env_float, env_int, env_str

BUNDLED_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


# No slots: from_env reads the defaults off the class attributes.
@dataclass(frozen=True)
class WorkerSettings:
    host: str = "127.0.0.1"
    grpc_port: int = 50053
    metrics_port: int = 9103
    plugins_dir: Path = BUNDLED_PLUGINS
    routes_file: str = "routes.toml"
    openai_base_url: str = ""
    """When set, the `default` route is served by `openai_compatible` with `model`."""
    openai_api_key: str = ""
    model: str = "gpt-4o-mini"
    upstream_timeout_s: float = 120.0
    grace_s: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.openai_base_url and urlparse(self.openai_base_url).scheme not in ("http", "https"):
            raise SettingsError(f"KEFU_OPENAI_BASE_URL must be an http(s) URL, got {self.openai_base_url!r}")

    def __repr__(self) -> str:
        # Never print the API key.
        return f"WorkerSettings(plugins_dir={self.plugins_dir!s}, openai_base_url={self.openai_base_url!r}, " \
               f"model={self.model!r}, grpc_port={self.grpc_port})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        return cls(
            host=env_str(env, "KEFU_BIND_HOST", cls.host),
            grpc_port=env_int(env, "KEFU_WORKER_PORT", cls.grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int(env, "KEFU_WORKER_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            plugins_dir=Path(env_str(env, "KEFU_PLUGINS_DIR", str(cls.plugins_dir))),
            openai_base_url=env_str(env, "KEFU_OPENAI_BASE_URL", "").rstrip("/"),
            openai_api_key=env.get("KEFU_OPENAI_API_KEY", ""),
            model=env_str(env, "KEFU_MODEL", cls.model),
            upstream_timeout_s=env_float(env, "KEFU_UPSTREAM_TIMEOUT_S", cls.upstream_timeout_s, minimum=1),
            grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.grace_s, minimum=0),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
        )
