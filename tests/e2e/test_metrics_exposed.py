"""Each running process's /metrics, read with Prometheus' own text parser, matches docs/metrics.md."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import auth, edge_metrics_url
from tests.k8s.catalogue import parse_catalogue

CATALOGUE = parse_catalogue((Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text())


def scrape(url: str) -> dict[str, set[str]]:
    """{family name as exposed: label names seen} for one process."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = families.setdefault(name, set())
        for sample in family.samples:
            labels.update(k for k in sample.labels if k not in ("le", "quantile"))
    # prometheus_client's creation timestamps of counters and histograms (`<name>_created`).
    return {name: labels for name, labels in families.items()
            if not (name.endswith("_created") and (name[:-8] in families or f"{name[:-8]}_total" in families))}


async def test_every_process_exports_what_the_catalogue_lists(kb_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:  # one turn, so labelled series exist
        async with http.post(f"{kb_stack.base_url}/v1/chat", json={"message": "怎么退货？", "stream": False},
                             headers=auth(sub="metrics-probe")) as response:
            assert response.status == 200
    ports = kb_stack.config.ports
    for process, url in (("edge", edge_metrics_url(kb_stack)),
                         *((name, f"http://127.0.0.1:{port}/metrics") for name, port in (
                             ("session", ports.session_metrics), ("moderation", ports.moderation_metrics),
                             ("llm-worker", ports.worker_metrics)))):
        exposed = scrape(url)
        documented = CATALOGUE[process]
        assert set(exposed) == set(documented), f"{process}: exposed vs documented differ"
        for name, labels in exposed.items():
            assert labels <= set(documented[name].labels), f"{process}: {name} has undocumented labels {labels}"
