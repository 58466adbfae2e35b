"""Prometheus metrics for claims (served with the others at GET /metrics).

Conflicts and acquisitions are counted where they happen; the number of claims
held is read from the store (the only exact answer across replicas) by the
control API's refresher (control/claims_api.py), not counted per process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from ..observability.metrics import Metrics
from .claims import ClaimObserver


class ClaimMetrics(ClaimObserver):
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.conflicts = Counter(
            "proctor_claim_conflicts",
            "Writes refused (409) because another agent holds a claim on the resource, by connector.",
            ["connector"],
            registry=r,
        )
        self.acquisitions = Counter(
            "proctor_claim_acquisitions",
            "Claims taken (new: a new holder) or renewed by their holder's write, by connector.",
            ["connector", "kind"],
            registry=r,
        )
        self.held = Gauge(
            "proctor_claims_held",
            "Live claims in the store, by connector (refreshed from the store every few seconds).",
            ["connector"],
            registry=r,
        )
        self._held_connectors: set[str] = set()

    def conflict(self, connector: str) -> None:
        self.conflicts.labels(connector).inc()

    def acquired(self, connector: str, renewed: bool) -> None:
        self.acquisitions.labels(connector, "renewed" if renewed else "new").inc()

    def set_held(self, by_connector: dict[str, int]) -> None:
        for gone in self._held_connectors - set(by_connector):
            self.held.labels(gone).set(0)
        for connector, n in by_connector.items():
            self.held.labels(connector).set(n)
        self._held_connectors |= set(by_connector)


class DuplicateMetrics:
    """Writes not forwarded because they repeated earlier work, by connector."""

    def __init__(self, metrics: Metrics) -> None:
        self.duplicates = Counter(
            "proctor_duplicates",
            "Writes not forwarded because they repeated earlier work, by connector, mechanism "
            "(idempotency: the agent's Idempotency-Key; dedupe: the route's window) and outcome "
            "(replayed: the stored response answered; refused: 409; mismatch: 422 key reused).",
            ["connector", "mechanism", "outcome"],
            registry=metrics.registry,
        )

    def count(self, connector: str, mechanism: str, outcome: str) -> None:
        self.duplicates.labels(connector, mechanism, outcome).inc()
