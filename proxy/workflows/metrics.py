"""Prometheus metrics for workflows (served with the others at GET /metrics): low-cardinality
labels only (workflow, step, outcome), never instances or objects."""

from __future__ import annotations

from prometheus_client import Counter

from ..observability.metrics import Metrics
from .stage import WorkflowObserver


class WorkflowMetrics(WorkflowObserver):
    def __init__(self, metrics: Metrics) -> None:
        self.steps = Counter(
            "proctor_workflow_steps",
            "Workflow step calls by workflow, step and outcome: completed, failed (forwarded; the step's "
            "completion check did not pass), refused (409: its prerequisites were not done).",
            ["workflow", "step", "outcome"],
            registry=metrics.registry,
        )

    def step(self, workflow: str, step: str, outcome: str) -> None:
        self.steps.labels(workflow, step, outcome).inc()
