"""Settings of the LLM worker, read once from `KEFU_*` variables (services.common.settings.KefuSettings)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from services.common.settings import KefuSettings, SettingsError

BUNDLED_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
"""Ceiling of KEFU_KB_MAX_DOCUMENT_BYTES: a document travels in one gRPC message."""
MAX_STREAM_WINDOW_MS = 60_000
"""Ceiling of KEFU_STREAM_WINDOW_MS (tests use a window that long to tell "at once" from "at its end")."""


class WorkerSettings(KefuSettings):
    host: str = Field("127.0.0.1", validation_alias="KEFU_BIND_HOST")
    grpc_port: int = Field(50053, ge=0, le=65535, validation_alias="KEFU_WORKER_PORT")
    metrics_port: int = Field(9103, ge=0, le=65535, validation_alias="KEFU_WORKER_METRICS_PORT")
    plugins_dir: Path = BUNDLED_PLUGINS
    routes_file: ClassVar[str] = "routes.toml"
    """The routes file inside the plugins folder (not a setting)."""
    openai_base_url: str = ""
    """When set, the `default` route is served by `openai_compatible` with `model`."""
    openai_api_key: str = Field("", repr=False)
    model: str = "gpt-4o-mini"
    upstream_timeout_s: float = Field(120.0, ge=1)
    nats_url: str = Field("nats://127.0.0.1:4222", repr=False)
    """May carry the process's NATS user and password: never printed."""
    nats_replicas: int = Field(1, ge=1, le=5)
    """JetStream replicas of the shared cache buckets (3 on a 3-node NATS cluster)."""
    internal_token: str = Field("", repr=False)
    """KEFU_INTERNAL_TOKEN: callers must send it (services.common.grpc_client); "" serves anyone."""
    cache_enabled: bool = True
    cache_shared: bool = True
    """Also keep answers in JetStream KV, shared by every worker replica."""
    cache_local_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    cache_ttl_s: float = Field(3600.0, ge=1)
    pregen_enabled: bool = True
    pregen_concurrency: int = Field(2, ge=1)
    """Pre-generations running at once per tenant."""
    pregen_tokens_per_minute: int = Field(20_000, ge=0)
    """Tokens pre-generation may spend per tenant and minute."""
    pregen_max_live_streams: int = Field(8, ge=1)
    """Pre-generation waits while this many live answers stream on the worker."""
    grace_s: float = Field(30.0, ge=0, validation_alias="KEFU_SHUTDOWN_GRACE_S")
    stream_window_ms: int = Field(50, ge=0, le=MAX_STREAM_WINDOW_MS)
    """KEFU_STREAM_WINDOW_MS: after an answer's first text (sent at once), at most one text message per
    window to the edge (services.llm_worker.coalesce); 0 only joins what piled up. 50 rather than 40: one
    message less for a 200 ms answer, 1 ms of CPU less a turn side by side (issue 20), 20 updates a second."""
    log_level: str = "INFO"
    kb_seed_dir: Path | None = None
    """KEFU_KB_SEED_DIR: `<dir>/<tenant>/<files>` stored as the tenant's documents at start when missing or changed."""
    kb_cache_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    """KEFU_KB_CACHE_MAX_BYTES: tenant indexes held in memory (least recently used dropped first)."""
    kb_max_document_bytes: int = Field(10 * 1024 * 1024, ge=1, le=MAX_DOCUMENT_BYTES)
    """KEFU_KB_MAX_DOCUMENT_BYTES: largest document file (also read by the edge, which answers 413)."""
    kb_max_documents: int = Field(1000, ge=1)
    """KEFU_KB_MAX_DOCUMENTS: documents per tenant."""
    kb_max_tenant_bytes: int = Field(200 * 1024 * 1024, ge=1)
    """KEFU_KB_MAX_TENANT_BYTES: bytes of documents per tenant (newest versions)."""
    embeddings_model: str = ""
    """KEFU_EMBEDDINGS_MODEL: when set (e.g. "text-embedding-3-small"), knowledge retrieval is hybrid: every
    chunk is embedded at ingestion through `KEFU_OPENAI_BASE_URL`/embeddings (with KEFU_OPENAI_API_KEY; needs
    KEFU_OPENAI_BASE_URL) and stored with the tenant's index, and each turn embeds its question and fuses the
    cosine ranking with BM25's (reciprocal rank fusion). Unset: BM25 alone, fully offline. Every worker
    replica must have the same value; an index built with another model (or none) is rebuilt on first use."""
    embeddings_dimensions: int = Field(0, ge=0, le=8192)
    """KEFU_EMBEDDINGS_DIMENSIONS: ask the model for vectors this long (OpenAI's `dimensions`, text-embedding-3
    models); 0, the default, takes the model's own. Dense retrieval reads every vector of the tenant per
    turn: 100,000 chunks of 1536 dimensions are 590 MiB and tens of ms; at 256, 98 MiB."""
    embeddings_batch: int = Field(64, ge=1, le=2048)
    """KEFU_EMBEDDINGS_BATCH: chunks per embeddings request at ingestion."""
    embeddings_timeout_s: float = Field(2.0, ge=0.05)
    """KEFU_EMBEDDINGS_TIMEOUT_S: how long a turn waits for its question's embedding before retrieving with
    BM25 alone (counted in kefu_kb_embedding_failures_total{stage="query"})."""

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        url = url.rstrip("/")
        if url and urlparse(url).scheme not in ("http", "https"):
            raise SettingsError(f"KEFU_OPENAI_BASE_URL must be an http(s) URL, got {url!r}")
        return url

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.embeddings_model and not self.openai_base_url:
            raise SettingsError("KEFU_EMBEDDINGS_MODEL needs KEFU_OPENAI_BASE_URL (the upstream that embeds)")
        return self
