"""Prometheus metrics of the moderation service, on a registry it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RELOAD_RESULTS = ("ok", "refused")
PUBLISH_RESULTS = ("ok", "failed")


@dataclass
class ModerationMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.checks = Counter(
            "kefu_moderation_checks", "Texts checked (unary) and streams ended, by verdict.",
            ["verdict"], registry=self.registry)
        self.hits = Counter(
            "kefu_moderation_hits", "Listed words found, by category and action.",
            ["category", "action"], registry=self.registry)
        self.check_seconds = Histogram(
            "kefu_moderation_check_duration_seconds", "Time to check one text or one stream delta.",
            ["kind"], registry=self.registry,
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05))
        self.lexicon_words = Gauge(
            "kefu_moderation_lexicon_words", "Words in the lexicon in use.", registry=self.registry)
        self.lexicon_generation = Gauge(
            "kefu_moderation_lexicon_generation",
            "Number of the lexicon serving new checks: 1 at start, +1 per successful reload.",
            registry=self.registry)
        self.lexicon_reloads = Counter(
            "kefu_moderation_lexicon_reloads",
            "Lexicon reloads after a change of its folder: ok (swapped in) or refused (the old one "
            "kept serving); a change that leaves every word as it was is not counted.",
            ["result"], registry=self.registry)
        for result in RELOAD_RESULTS:
            self.lexicon_reloads.labels(result)
        self.lexicon_publishes = Counter(
            "kefu_moderation_lexicon_publishes",
            "Lexicon values written to NATS KV for the llm workers' output filters (ok), or attempts that "
            "failed and are retried (failed); an unchanged lexicon is not written again.",
            ["result"], registry=self.registry)
        for result in PUBLISH_RESULTS:
            self.lexicon_publishes.labels(result)
