"""Settings of the moderation service, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from services.common.settings import (
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_str,
    internal_token,
    nats_url,
)

BUNDLED_LEXICON = Path(__file__).parent / "lexicon"


# No slots: from_env reads the defaults off the class attributes.
@dataclass(frozen=True)
class ModerationSettings:
    host: str = "127.0.0.1"
    grpc_port: int = 50052
    metrics_port: int = 9102
    lexicon_dir: Path = BUNDLED_LEXICON
    lexicon_watch: bool = True
    """Reload the lexicon when its folder changes (watchfiles)."""
    lexicon_quiet_ms: int = 200
    """A change batch is complete once the folder was quiet this long (watchfiles' `step`)."""
    lexicon_debounce_ms: int = 1600
    """Longest a batch groups changes before a reload is tried anyway (watchfiles' `debounce`)."""
    max_text_chars: int = 64_000
    nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)
    """Where the lexicon is published for the llm workers' output filters; may carry the process's NATS
    user and password: never printed. Input checks (Check) never wait for NATS."""
    nats_replicas: int = 1
    """JetStream replicas of the lexicon bucket (3 on a 3-node NATS cluster)."""
    internal_token: str = field(default="", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    grace_s: float = 10.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.lexicon_quiet_ms > self.lexicon_debounce_ms:
            raise SettingsError(
                f"KEFU_LEXICON_QUIET_MS ({self.lexicon_quiet_ms}) must not exceed "
                f"KEFU_LEXICON_DEBOUNCE_MS ({self.lexicon_debounce_ms})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        return cls(
            host=env_str(env, "KEFU_BIND_HOST", cls.host),
            grpc_port=env_int(env, "KEFU_MODERATION_PORT", cls.grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int(env, "KEFU_MODERATION_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            lexicon_dir=Path(env_str(env, "KEFU_LEXICON_DIR", str(cls.lexicon_dir))),
            lexicon_watch=env_bool(env, "KEFU_LEXICON_WATCH", cls.lexicon_watch),
            lexicon_quiet_ms=env_int(env, "KEFU_LEXICON_QUIET_MS", cls.lexicon_quiet_ms, minimum=10,
                                     maximum=60_000),
            lexicon_debounce_ms=env_int(env, "KEFU_LEXICON_DEBOUNCE_MS", cls.lexicon_debounce_ms, minimum=10,
                                        maximum=600_000),
            max_text_chars=env_int(env, "KEFU_MAX_MODERATION_CHARS", cls.max_text_chars, minimum=1),
            nats_url=nats_url(env),
            nats_replicas=env_int(env, "KEFU_NATS_REPLICAS", cls.nats_replicas, minimum=1, maximum=5),
            internal_token=internal_token(env),
            grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.grace_s, minimum=0),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
        )
