"""Prometheus metrics of the LLM worker, on a registry it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RETRIEVAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.request_seconds = Histogram(
            "kefu_llm_request_duration_seconds", "Time of a generation, from request to last delta.",
            ["route", "provider", "outcome"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.ttft_seconds = Histogram(
            "kefu_llm_time_to_first_token_seconds", "Time from request to the first delta.",
            ["route"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter(
            "kefu_llm_requests", "Generations by route, provider, upstream model and outcome (shows a canary split).",
            ["route", "provider", "model", "outcome"], registry=self.registry)
        self.prompt_tokens = Counter(
            "kefu_llm_prompt_tokens", "Context tokens sent to providers, by route.", ["route"], registry=self.registry)
        self.completion_tokens = Counter(
            "kefu_llm_completion_tokens", "Tokens generated, by route.", ["route"], registry=self.registry)
        self.active_streams = Gauge(
            "kefu_active_streams", "Generations streaming right now.", registry=self.registry)
        self.plugin_generation = Gauge(
            "kefu_plugin_generation", "Number of the plugin generation serving new requests.",
            registry=self.registry)
        self.cache_requests = Counter(
            "kefu_cache_requests", "Cache lookups of cacheable turns, by tier (local, shared) and result (hit, miss).",
            ["tier", "result"], registry=self.registry)
        self.cache_local_bytes = Gauge(
            "kefu_cache_local_bytes", "Bytes of answers held by this process's cache tier.", registry=self.registry)
        self.cache_hit_ratio = Gauge(
            "kefu_cache_hit_ratio", "Share of cacheable turns answered from a cache tier since start.",
            registry=self.registry)
        self.pregenerations = Counter(
            "kefu_pregenerations", "Pre-generated answers: started, served (later hit), wasted (dropped unserved), "
            "skipped (busy or over budget), dropped (the oldest waiting job, when too many wait).", ["result"],
            registry=self.registry)
        self.grounded_turns = Counter(
            "kefu_kb_turns", "Turns by how the tenant's documents shaped them: small_talk, grounded, handoff "
            "(nothing in the documents answers) or ungrounded (the tenant has no documents).",
            ["kind"], registry=self.registry)
        self.retrieval_seconds = Histogram(
            "kefu_kb_retrieval_duration_seconds", "Time a turn spent getting its knowledge snapshot and retrieving "
            "passages (in process: no network hop once the tenant's index is loaded).",
            registry=self.registry, buckets=RETRIEVAL_BUCKETS)
        self.plugin_reloads = Counter(
            "kefu_plugin_reloads", "Attempted plugin generation swaps, by result (ok or refused).",
            ["result"], registry=self.registry)
        self.lexicon_revision = Gauge(
            "kefu_worker_lexicon_revision", "NATS KV revision of the lexicon the output filter uses for new turns; "
            "0: none, and answers fail (fail closed).", registry=self.registry)
        self.output_filtered = Counter(
            "kefu_worker_output_filtered", "Answers through the output filter, by verdict: allow, mask, review "
            "or block (stopped: nothing of the word left the worker).", ["verdict"], registry=self.registry)
