"""The Grafana dashboard: valid JSON, the panels an operator needs, only catalogued metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.catalogue import Catalogue

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "kefu-dashboard.json"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# PromQL functions and keywords that look like metric names to a plain regex never start with kefu_.
METRIC = re.compile(r"\b(kefu_[a-z0-9_]+)\b")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_expressions_are_balanced(dashboard: dict[str, Any]) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    for title, expr in expressions(dashboard):
        stack: list[str] = []
        for char in re.sub(r'"[^"]*"', '""', expr):  # brackets inside label matchers don't count
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], (title, expr)
        assert not stack, (title, expr)


def test_every_dashboard_metric_is_in_the_catalogue(dashboard: dict[str, Any], catalogue: Catalogue) -> None:
    documented = {name: entry for section in catalogue.values() for name, entry in section.items()}
    for title, expr in expressions(dashboard):
        for name in METRIC.findall(expr):
            if name in documented:
                continue
            base = next((name[: -len(s)] for s in HISTOGRAM_SERIES if name.endswith(s)), None)
            assert base in documented and documented[base].type == "histogram", (
                f"panel {title!r} uses {name}, which docs/metrics.md does not list")


def test_dashboard_has_the_operator_panels(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(expr for _, expr in expressions(dashboard))
    required = [
        r"rate\(kefu_http_request_duration_seconds_count",                       # request rate
        r"kefu_http_request_duration_seconds_count\{[^}]*status=~",               # errors by status
        r"sum by \(code\) \(rate\(kefu_stream_errors_total",                      # errors by code
        r"histogram_quantile\(0\.95, [^\n]*kefu_chat_time_to_first_delta_seconds_bucket",  # TTFT
        r"histogram_quantile\(0\.95, [^\n]*kefu_llm_request_duration_seconds_bucket",      # duration
        r"kefu_cache_requests_total\{[^}]*result=\"hit\"[^\n]*/[^\n]*kefu_cache_requests_total",  # hit ratio
        r"kefu_moderation_checks_total\{[^}]*verdict=\"block\"",                  # moderation blocks
        r"kefu_active_streams",                                                   # active streams
        r"kefu_plugin_generation",                                                # plugin generation
        r"kefu_plugin_reloads_total\{[^}]*result=\"refused\"",                    # reload failures
        r"sum by \(provider, outcome\) \(rate\(kefu_llm_request_duration_seconds_count",  # swap signal
        r"sum by \(role\) \(kefu_ws_connections",                                # live chat: sockets
        r"max by \(status\) \(kefu_conversations",                               # conversations (max)
        r"kefu_handoffs_total",                                                   # handoffs
        r"histogram_quantile\(0\.95, [^\n]*kefu_queue_wait_seconds_bucket",        # queue wait
        r"kefu_live_log_consumer_restarts_total",                                 # log consumers
        r"sum by \(le, app, service, method\) \(rate\(kefu_grpc_server_handling_seconds_bucket",  # gRPC time
        r"sum by \(app, service, method, code\) \(rate\(kefu_grpc_server_handling_seconds_count\{[^}]*code!=",  # errors
    ]
    for pattern in required:
        assert re.search(pattern, exprs), pattern


SELECTOR = re.compile(r"\b(kefu_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
TARGET_LABELS = {"namespace", "app", "pod", "instance", "job"}
"""Labels Prometheus adds to every series it scrapes (the scrape configuration in docs/metrics.md)."""


def test_every_dashboard_label_matcher_names_a_catalogued_label(dashboard: dict[str, Any],
                                                                catalogue: Catalogue) -> None:
    # A matcher on a label the metric lacks selects nothing, silently (`method!~"Check"` once hid a service).
    labels: dict[str, set[str]] = {}
    for section in catalogue.values():
        for name, entry in section.items():
            labels.setdefault(name, set()).update(entry.labels)
    for title, expr in expressions(dashboard):
        for metric, matchers in SELECTOR.findall(expr):
            base = next((metric[: -len(s)] for s in HISTOGRAM_SERIES if metric.endswith(s)), metric)
            known = labels.get(metric, labels.get(base, set())) | TARGET_LABELS
            known |= {"le"} if metric.endswith("_bucket") else set()
            for label in MATCHER.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)):
                assert label in known, f"panel {title!r}: {metric} has no label {label!r}"
