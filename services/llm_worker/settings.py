"""Settings of the LLM worker, read once from `KEFU_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlparse

from services.common.settings import (
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_str,
    internal_token,
    nats_url,
)

BUNDLED_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
"""Ceiling of KEFU_KB_MAX_DOCUMENT_BYTES: a document travels in one gRPC message."""
MAX_STREAM_WINDOW_MS = 60_000
"""Ceiling of KEFU_STREAM_WINDOW_MS (tests use a window that long to tell "at once" from "at its end")."""


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
    nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)
    """May carry the process's NATS user and password: never printed."""
    nats_replicas: int = 1
    """JetStream replicas of the shared cache buckets (3 on a 3-node NATS cluster)."""
    internal_token: str = field(default="", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    cache_enabled: bool = True
    cache_shared: bool = True
    """Also keep answers in JetStream KV, shared by every worker replica."""
    cache_local_max_bytes: int = 64 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    pregen_enabled: bool = True
    pregen_concurrency: int = 2
    """Pre-generations running at once per tenant."""
    pregen_tokens_per_minute: int = 20_000
    """Tokens pre-generation may spend per tenant and minute."""
    pregen_max_live_streams: int = 8
    """Pre-generation waits while this many live answers stream on the worker."""
    grace_s: float = 30.0
    stream_window_ms: int = 40
    """KEFU_STREAM_WINDOW_MS: after an answer's first text (sent at once), at most one text message per
    window to the edge (services.llm_worker.coalesce); 0 only joins what piled up."""
    log_level: str = "INFO"
    kb_seed_dir: Path | None = None
    """KEFU_KB_SEED_DIR: `<dir>/<tenant>/<files>` stored as the tenant's documents at start when missing or changed."""
    kb_cache_max_bytes: int = 256 * 1024 * 1024
    """KEFU_KB_CACHE_MAX_BYTES: tenant indexes held in memory (least recently used dropped first)."""
    kb_max_document_bytes: int = 10 * 1024 * 1024
    """KEFU_KB_MAX_DOCUMENT_BYTES: largest document file (also read by the edge, which answers 413)."""
    kb_max_documents: int = 1000
    """KEFU_KB_MAX_DOCUMENTS: documents per tenant."""
    kb_max_tenant_bytes: int = 200 * 1024 * 1024
    """KEFU_KB_MAX_TENANT_BYTES: bytes of documents per tenant (newest versions)."""
    embeddings_model: str = ""
    """KEFU_EMBEDDINGS_MODEL: when set (e.g. "text-embedding-3-small"), knowledge retrieval is hybrid: every
    chunk is embedded at ingestion through `KEFU_OPENAI_BASE_URL`/embeddings (with KEFU_OPENAI_API_KEY; needs
    KEFU_OPENAI_BASE_URL) and stored with the tenant's index, and each turn embeds its question and fuses the
    cosine ranking with BM25's (reciprocal rank fusion). Unset: BM25 alone, fully offline. Every worker
    replica must have the same value; an index built with another model (or none) is rebuilt on first use."""
    embeddings_dimensions: int = 0
    """KEFU_EMBEDDINGS_DIMENSIONS: ask the model for vectors this long (OpenAI's `dimensions`, text-embedding-3
    models); 0, the default, takes the model's own. Dense retrieval reads every vector of the tenant per
    turn: 100,000 chunks of 1536 dimensions are 590 MiB and tens of ms; at 256, 98 MiB."""
    embeddings_batch: int = 64
    """KEFU_EMBEDDINGS_BATCH: chunks per embeddings request at ingestion."""
    embeddings_timeout_s: float = 2.0
    """KEFU_EMBEDDINGS_TIMEOUT_S: how long a turn waits for its question's embedding before retrieving with
    BM25 alone (counted in kefu_kb_embedding_failures_total{stage="query"})."""

    def __post_init__(self) -> None:
        if self.openai_base_url and urlparse(self.openai_base_url).scheme not in ("http", "https"):
            raise SettingsError(f"KEFU_OPENAI_BASE_URL must be an http(s) URL, got {self.openai_base_url!r}")
        if self.embeddings_model and not self.openai_base_url:
            raise SettingsError("KEFU_EMBEDDINGS_MODEL needs KEFU_OPENAI_BASE_URL (the upstream that embeds)")

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
            nats_url=nats_url(env),
            nats_replicas=env_int(env, "KEFU_NATS_REPLICAS", cls.nats_replicas, minimum=1, maximum=5),
            internal_token=internal_token(env),
            cache_enabled=env_bool(env, "KEFU_CACHE_ENABLED", cls.cache_enabled),
            cache_shared=env_bool(env, "KEFU_CACHE_SHARED", cls.cache_shared),
            cache_local_max_bytes=env_int(env, "KEFU_CACHE_LOCAL_MAX_BYTES", cls.cache_local_max_bytes, minimum=0),
            cache_ttl_s=env_float(env, "KEFU_CACHE_TTL_S", cls.cache_ttl_s, minimum=1),
            pregen_enabled=env_bool(env, "KEFU_PREGEN_ENABLED", cls.pregen_enabled),
            pregen_concurrency=env_int(env, "KEFU_PREGEN_CONCURRENCY", cls.pregen_concurrency, minimum=1),
            pregen_tokens_per_minute=env_int(env, "KEFU_PREGEN_TOKENS_PER_MINUTE", cls.pregen_tokens_per_minute,
                                             minimum=0),
            pregen_max_live_streams=env_int(env, "KEFU_PREGEN_MAX_LIVE_STREAMS", cls.pregen_max_live_streams,
                                            minimum=1),
            grace_s=env_float(env, "KEFU_SHUTDOWN_GRACE_S", cls.grace_s, minimum=0),
            stream_window_ms=env_int(env, "KEFU_STREAM_WINDOW_MS", cls.stream_window_ms, minimum=0,
                                     maximum=MAX_STREAM_WINDOW_MS),
            log_level=env_str(env, "KEFU_LOG_LEVEL", cls.log_level),
            kb_seed_dir=Path(seed_dir) if (seed_dir := env_str(env, "KEFU_KB_SEED_DIR", "")) else None,
            kb_cache_max_bytes=env_int(env, "KEFU_KB_CACHE_MAX_BYTES", cls.kb_cache_max_bytes, minimum=0),
            kb_max_document_bytes=env_int(env, "KEFU_KB_MAX_DOCUMENT_BYTES", cls.kb_max_document_bytes, minimum=1,
                                          maximum=MAX_DOCUMENT_BYTES),
            kb_max_documents=env_int(env, "KEFU_KB_MAX_DOCUMENTS", cls.kb_max_documents, minimum=1),
            kb_max_tenant_bytes=env_int(env, "KEFU_KB_MAX_TENANT_BYTES", cls.kb_max_tenant_bytes, minimum=1),
            embeddings_model=env_str(env, "KEFU_EMBEDDINGS_MODEL", "").strip(),
            embeddings_dimensions=env_int(env, "KEFU_EMBEDDINGS_DIMENSIONS", cls.embeddings_dimensions, minimum=0,
                                          maximum=8192),
            embeddings_batch=env_int(env, "KEFU_EMBEDDINGS_BATCH", cls.embeddings_batch, minimum=1, maximum=2048),
            embeddings_timeout_s=env_float(env, "KEFU_EMBEDDINGS_TIMEOUT_S", cls.embeddings_timeout_s, minimum=0.05),
        )
