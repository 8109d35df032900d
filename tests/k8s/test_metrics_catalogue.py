"""docs/metrics.md lists exactly the metrics each process's code registers, with type and labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from gateway.connection_guard import GuardMetrics
from gateway.metrics import EdgeMetrics
from services.common.grpc_server import RequestContextInterceptor
from services.llm_worker.kb.metrics import KnowledgeMetrics
from services.llm_worker.metrics import WorkerMetrics
from services.moderation.metrics import ModerationMetrics
from services.session.metrics import SessionMetrics
from tests.k8s.catalogue import Catalogue


class ProcessMetrics(Protocol):
    """A process's metrics class: its metrics as attributes, all on one registry."""

    @property
    def registry(self) -> CollectorRegistry: ...


def exported(metrics: ProcessMetrics, grpc_service: bool,
             extras: tuple[object, ...] = ()) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name as exposed: (type, labels)} of one process's registry (`extras`: more metrics objects on it)."""
    found: list[MetricWrapperBase] = [v for m in (metrics, *extras) for v in vars(m).values()
                                      if isinstance(v, MetricWrapperBase)]
    if grpc_service:
        interceptor = RequestContextInterceptor(metrics.registry)
        found += [v for v in vars(interceptor).values() if isinstance(v, MetricWrapperBase)]
    # Everything registered must be one of the objects looked at above.
    assert {family.name for family in metrics.registry.collect()} == {m._name for m in found}
    return {m._name + ("_total" if m._type == "counter" else ""): (str(m._type), tuple(m._labelnames)) for m in found}


PROCESSES: dict[str, tuple[Callable[..., ProcessMetrics], bool]] = {
    "edge": (EdgeMetrics, False),
    "session": (SessionMetrics, True),
    "moderation": (ModerationMetrics, True),
    "llm-worker": (WorkerMetrics, True),
}
EXTRAS: dict[str, tuple[Callable[[CollectorRegistry], object], ...]] = {
    "llm-worker": (KnowledgeMetrics,), "edge": (GuardMetrics,)}
"""Metrics classes a process registers on its main class's registry."""


def test_catalogue_has_a_section_per_process(catalogue: Catalogue) -> None:
    assert set(PROCESSES) <= set(catalogue)


def test_catalogue_matches_what_each_process_registers(catalogue: Catalogue) -> None:
    for process, (metrics_class, grpc_service) in PROCESSES.items():
        metrics = metrics_class(registry=CollectorRegistry())
        extras = tuple(extra(metrics.registry) for extra in EXTRAS.get(process, ()))
        in_code = exported(metrics, grpc_service, extras)
        documented = {name: (entry.type, entry.labels) for name, entry in catalogue[process].items()}
        missing = sorted(in_code.keys() - documented.keys())
        undocumented_in_code = sorted(documented.keys() - in_code.keys())
        assert not missing, f"{process}: exported but not in docs/metrics.md: {missing}"
        assert not undocumented_in_code, f"{process}: in docs/metrics.md but not exported: {undocumented_in_code}"
        for name, (kind, labels) in in_code.items():
            assert documented[name] == (kind, labels), f"{process}: {name} is {kind} {labels} in the code"


def test_no_process_exports_default_collectors() -> None:
    # Each process serves the registry its metrics class creates by default: no process_* or
    # python_* metrics of prometheus_client's global registry.
    for metrics_class, _ in PROCESSES.values():
        names = {family.name for family in metrics_class().registry.collect()}
        assert not {n for n in names if n.startswith(("process_", "python_"))}


def test_reserved_metrics_are_not_also_listed_under_a_process(catalogue: Catalogue) -> None:
    reserved = set(catalogue.get("reserved", {}))
    for process in PROCESSES:
        assert not reserved & set(catalogue[process]), process
