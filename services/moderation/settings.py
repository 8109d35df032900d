"""Settings of the moderation service, read once from `KEFU_*` variables (services.common.settings.KefuSettings)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from services.common.settings import KefuSettings, SettingsError

BUNDLED_LEXICON = Path(__file__).parent / "lexicon"


class ModerationSettings(KefuSettings):
    host: str = Field("127.0.0.1", validation_alias="KEFU_BIND_HOST")
    grpc_port: int = Field(50052, ge=0, le=65535, validation_alias="KEFU_MODERATION_PORT")
    metrics_port: int = Field(9102, ge=0, le=65535, validation_alias="KEFU_MODERATION_METRICS_PORT")
    lexicon_dir: Path = BUNDLED_LEXICON
    lexicon_watch: bool = True
    """Reload the lexicon when its folder changes (watchfiles)."""
    lexicon_quiet_ms: int = Field(200, ge=10, le=60_000)
    """A change batch is complete once the folder was quiet this long (watchfiles' `step`)."""
    lexicon_debounce_ms: int = Field(1600, ge=10, le=600_000)
    """Longest a batch groups changes before a reload is tried anyway (watchfiles' `debounce`)."""
    max_text_chars: int = Field(64_000, ge=1, validation_alias="KEFU_MAX_MODERATION_CHARS")
    nats_url: str = Field("nats://127.0.0.1:4222", repr=False)
    """Where the lexicon is published for the llm workers' output filters; may carry the process's NATS
    user and password: never printed. Input checks (Check) never wait for NATS."""
    nats_replicas: int = Field(1, ge=1, le=5)
    """JetStream replicas of the lexicon bucket (3 on a 3-node NATS cluster)."""
    internal_token: str = Field("", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    grace_s: float = Field(10.0, ge=0, validation_alias="KEFU_SHUTDOWN_GRACE_S")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.lexicon_quiet_ms > self.lexicon_debounce_ms:
            raise SettingsError(
                f"KEFU_LEXICON_QUIET_MS ({self.lexicon_quiet_ms}) must not exceed "
                f"KEFU_LEXICON_DEBOUNCE_MS ({self.lexicon_debounce_ms})")
        return self
