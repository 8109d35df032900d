"""Settings of the moderation service, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from services.common.settings import env_float, env_int, env_str

BUNDLED_LEXICON = Path(__file__).parent / "lexicon"


# No slots: from_env reads the defaults off the class attributes.
@dataclass(frozen=True)
class ModerationSettings:
    host: str = "127.0.0.1"
    grpc_port: int = 50052
    metrics_port: int = 9102
    lexicon_dir: Path = BUNDLED_LEXICON
    max_text_chars: int = 64_000
    grace_s: float = 10.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Self:
        return cls(
            host=env_str(env, "KEFU_BIND_HOST", cls.host),
            grpc_port=env_int(env, "KEFU_MODERATION_PORT", cls.grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int(env, "KEFU_MODERATION_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            lexicon_dir=Path(env_str(env, "KEFU_LEXICON_DIR", str(cls.lexicon_dir))),
            max_text_chars=env_int(env, "KEFU_MAX_MODERATION_CHARS", cls.max_text_chars, minimum=1),
            grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.grace_s, minimum=0),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
        )
