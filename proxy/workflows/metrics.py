"""Prometheus metrics for workflows (served with the others at GET /metrics): low-cardinality
labels only (workflow, step, outcome, state), never instances, objects or agents.

Counted where they happen (per process): step calls, their durations and cost, and
the cycle time of each instance this process saw complete. The number of instances
by state is read from the store (the only exact answer across replicas) by the
control API's refresher (control/workflows_api.py) into `proctor_workflow_instances`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..observability.metrics import Metrics
from ..store.workflows import COMPLETED, Instance, StepEvent
from .kpis import CYCLE_BOUNDS
from .stage import WorkflowObserver

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def completed_by(event: StepEvent, inst: Instance | None) -> bool:
    """Whether `event` is the call that completed `inst` (the instance as stored after it): the
    instance is complete, at this event's time, and this was the step's first completion (so it
    was not complete before)."""
    return (inst is not None and event.outcome == "completed" and inst.state == COMPLETED
            and inst.completed_at == event.time and inst.step_tally(event.step).completions == 1)


class WorkflowMetrics(WorkflowObserver):
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.steps = Counter(
            "proctor_workflow_steps",
            "Workflow step calls by workflow, step and outcome: completed, failed (forwarded; the step's "
            "completion check did not pass), refused (409: its prerequisites were not done).",
            ["workflow", "step", "outcome"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "proctor_workflow_step_seconds",
            "Forwarded workflow step calls: time in Proctor and the upstream (approval waits excluded), by "
            "workflow, step and outcome (completed, failed).",
            ["workflow", "step", "outcome"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "proctor_workflow_cycle_seconds",
            "Workflow instances completed on this process: from the instance's start to the call that "
            "completed its last required step.",
            ["workflow"],
            buckets=[float(b) for b in CYCLE_BOUNDS],
            registry=r,
        )
        self.cost = Counter(
            "proctor_workflow_cost",
            "The cost of forwarded workflow step calls (the steps' `cost`, in the workflow's currency).",
            ["workflow"],
            registry=r,
        )
        self.instances = Gauge(
            "proctor_workflow_instances",
            "Workflow instances in the store by workflow and state (running, completed), across all replicas "
            "sharing it (refreshed every few seconds).",
            ["workflow", "state"],
            registry=r,
        )
        self._instance_labels: set[tuple[str, str]] = set()

    def step(self, workflow: str, step: str, outcome: str) -> None:
        self.steps.labels(workflow, step, outcome).inc()

    def recorded(self, event: StepEvent, instance: Instance | None) -> None:
        self.step_seconds.labels(event.workflow, event.step, event.outcome).observe(
            max(0.0, event.duration_ms) / 1000.0)
        if event.cost:
            self.cost.labels(event.workflow).inc(float(event.cost))
        if instance is not None and completed_by(event, instance):
            assert instance.completed_at is not None
            self.cycle_seconds.labels(event.workflow).observe(max(0.0, instance.completed_at - instance.started_at))

    def set_instances(self, counts: dict[tuple[str, str], int]) -> None:
        """The store's counts; a (workflow, state) seen before and gone now reads 0."""
        for gone in self._instance_labels - set(counts):
            self.instances.labels(*gone).set(0)
        for (workflow, state), n in counts.items():
            self.instances.labels(workflow, state).set(n)
        self._instance_labels |= set(counts)
