"""Outcome KPIs of workflows: cycle time, throughput, work in progress, errors, rework, SLA,
cost and autonomy, per workflow, step and agent (docs/workflows.md, "Outcomes (KPIs)").

Pure: the document is computed from the instances, their step events, the
definitions and an explicit `now` (no clock is read here), so every number is
exactly testable. `KpiBuilder` takes events one at a time (a stream, in any
order); `compute_kpis` runs it over lists; `read_kpis` feeds it from the store.

Windows. Everything is measured over `[since, until)` (epoch seconds; an event at
`until` is outside), cut into buckets of `bucket_seconds` from `since` (the last
one may be shorter). Times are the store's: an instance starts at the decision
time of the call that created it and completes at the decision time of the call
that completed its last required step; an event's time is its call's decision time.
"Now" only matters for work in progress: instances running at `min(until, now)`.

Percentiles: linear interpolation between the closest ranks (the "R-7" method,
numpy's and spreadsheets' PERCENTILE.INC default): over the n sorted values,
p = x[k] + (h - k) * (x[k+1] - x[k]) with h = (n - 1) * q and k = floor(h). The
p50 of 1, 2, 3, 4 is 2.5; of one value, that value; of none, null.

Memory bound of `read_kpis`: events are read in pages of EVENT_PAGE (by store
sequence, `after_seq`), never all at once, and at most MAX_EVENTS per request;
what is kept is per instance (at most MAX_INSTANCES per workflow of those that
moved since `since`, most recent first, and as many of those still running) a few
numbers per step, and per event in the window only a completed call's duration (8 bytes,
for the step's duration percentiles). Past either limit the document says
`"truncated": true` and covers what was read.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from ..record.model import iso
from ..store.workflows import Instance, StepEvent
from .spec import WorkflowSpec

DAY = 86400
DEFAULT_WINDOW_SECONDS = 7 * DAY
MAX_WINDOW_SECONDS = 366 * DAY
DEFAULT_BUCKET_SECONDS = 3600
MIN_BUCKET_SECONDS = 60
MAX_BUCKET_SECONDS = 7 * DAY
MAX_BUCKETS = 500
# cycle-time histogram upper bounds (seconds; 1 min ... 30 days), then everything longer (null)
CYCLE_BOUNDS: tuple[int, ...] = (60, 300, 900, 3600, 4 * 3600, DAY, 3 * DAY, 7 * DAY, 30 * DAY)
AT_RISK_SHARE = 0.8  # a running instance past this share of its SLA target is at risk
EVENT_PAGE = 2000
MAX_EVENTS = 1_000_000
MAX_INSTANCES = 20_000  # per workflow
MAX_AGENTS_TRACKED = 10_000  # distinct agents counted per workflow; later ones are counted as "(other)"
MAX_AGENTS_SHOWN = 100  # the document lists the agents with the most calls
OTHER_AGENTS = "(other)"
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
CENT = Decimal("0.01")


class WindowError(ValueError):
    """A window that cannot be measured: `field` is the query parameter at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name} {message}")
        self.field = field_name
        self.message = message


_EPOCH_RE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")


def parse_time(text: str) -> float:
    """Epoch seconds from epoch seconds (`1765000000`, `1765000000.5`) or ISO 8601
    (`2026-12-06T00:00:00Z`, an offset, or none: UTC). ValueError otherwise."""
    s = text.strip()
    if _EPOCH_RE.match(s):
        t = float(s)
    else:
        if not 10 <= len(s) <= 40:
            raise ValueError("must be an ISO 8601 time or epoch seconds")
        try:
            d = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError("must be an ISO 8601 time or epoch seconds") from None
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        try:
            t = d.timestamp()
        except (OverflowError, OSError, ValueError):
            raise ValueError("is out of range") from None
    if not math.isfinite(t) or not 0 <= t <= LATEST_TIME:
        raise ValueError("is out of range (1970 to 9999)")
    return t


@dataclass(frozen=True)
class Window:
    since: float
    until: float
    bucket_seconds: int

    @property
    def buckets(self) -> int:
        return max(1, math.ceil((self.until - self.since) / self.bucket_seconds))

    @property
    def days(self) -> float:
        return (self.until - self.since) / DAY

    def contains(self, t: float | None) -> bool:
        return t is not None and self.since <= t < self.until

    def bucket(self, t: float) -> int:
        """The bucket of a time inside the window."""
        return min(self.buckets - 1, int((t - self.since) // self.bucket_seconds))

    def starts(self) -> list[float]:
        return [self.since + i * self.bucket_seconds for i in range(self.buckets)]


def make_window(now: float, since: float | None = None, until: float | None = None,
                bucket_seconds: int | None = None) -> Window:
    """The window asked for. Defaults: until now, since 7 days before (aligned down to the
    bucket, so hourly buckets start on the hour), 1 h buckets. The bucket is clamped to
    60 s..7 d, then widened to whole seconds so that there are at most 500. WindowError
    when until is not after since or the window is longer than 366 days."""
    bucket = DEFAULT_BUCKET_SECONDS if bucket_seconds is None else int(bucket_seconds)
    bucket = min(max(bucket, MIN_BUCKET_SECONDS), MAX_BUCKET_SECONDS)
    end = float(now) if until is None else float(until)
    start: float
    if since is None:
        start = max(0.0, float(math.floor((end - DEFAULT_WINDOW_SECONDS) / bucket) * bucket))
    else:
        start = float(since)
    if not end > start:
        raise WindowError("since", "must be before until")
    span = end - start
    if span > MAX_WINDOW_SECONDS:
        raise WindowError("since", "is more than 366 days before until (the longest window)")
    if math.ceil(span / bucket) > MAX_BUCKETS:
        bucket = int(math.ceil(span / MAX_BUCKETS))
    return Window(start, end, bucket)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of sorted `values`, linear between closest ranks (R-7); None if empty."""
    n = len(values)
    if n == 0:
        return None
    h = (n - 1) * q
    k = math.floor(h)
    upper = values[min(k + 1, n - 1)]
    return float(values[k] + (h - k) * (upper - values[k]))


def _rate(num: int | float, den: int | float) -> float | None:
    return None if not den else round(num / den, 4)


def _sec(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _money(d: Decimal) -> str:
    return str(d.quantize(CENT, rounding=ROUND_HALF_UP))


def escalated_steps(inst: Instance) -> frozenset[str]:
    """Steps people took part in on this instance, from its exception record (attrs, written by
    proxy/workflows/exceptions.py): an escalation item about the step (in any state), or the step
    marked as a person's (retries allowed again, taken over, completed by a person)."""
    attrs = inst.attrs if isinstance(inst.attrs, dict) else {}
    out: set[str] = set()
    items = attrs.get("items")
    if isinstance(items, list):
        out |= {i["step"] for i in items if isinstance(i, dict) and isinstance(i.get("step"), str)}
    steps = attrs.get("steps")
    if isinstance(steps, dict):
        out |= {str(k) for k, v in steps.items() if isinstance(v, dict) and (v.get("human") or v.get("taken_by"))}
    return frozenset(out)


def closed_at(inst: Instance) -> float | None:
    """When a person closed the instance as failed (attrs["closed"]["at"]; exceptions.py), or None."""
    c = inst.attrs.get("closed") if isinstance(inst.attrs, dict) else None
    at = c.get("at") if isinstance(c, dict) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at) else None


@dataclass(slots=True)
class _Track:
    """One instance, from its events (those before `until`)."""

    inst: Instance
    escalated: frozenset[str]
    wait_ms: float = 0.0  # approval waits of its calls up to its completion
    cost: Decimal = Decimal(0)  # its calls' cost before `until`
    first_done: dict[str, float] = field(default_factory=dict)  # step -> first completion
    done_count: dict[str, int] = field(default_factory=dict)  # step -> completions
    done_in_window: set[str] = field(default_factory=set)  # steps with a completion in the window

    def add(self, e: StepEvent, window: Window) -> None:
        self.cost += e.cost
        done_at = self.inst.completed_at
        if e.approval_wait_ms and (done_at is None or e.time <= done_at):
            self.wait_ms += e.approval_wait_ms
        if e.outcome != "completed":
            return
        first = self.first_done.get(e.step)
        if first is None or e.time < first:
            self.first_done[e.step] = e.time
        self.done_count[e.step] = self.done_count.get(e.step, 0) + 1
        if window.contains(e.time):
            self.done_in_window.add(e.step)


@dataclass(slots=True)
class _Step:
    completions: int = 0
    failures: int = 0
    refusals: int = 0
    autonomous: int = 0  # completions without a person
    durations: array[float] = field(default_factory=lambda: array("d"))  # completed calls' duration_ms


@dataclass(slots=True)
class _Agent:
    completions: int = 0
    failures: int = 0
    refusals: int = 0


class KpiBuilder:
    """One workflow's KPIs over a window: give it the instances, then every event (any order)."""

    def __init__(self, spec: WorkflowSpec, window: Window, now: float, instances: Iterable[Instance] = ()) -> None:
        self.spec = spec
        self.window = window
        self.as_of = min(window.until, float(now))  # work in progress is measured here
        self.tracks: dict[str, _Track] = {}
        self.steps: dict[str, _Step] = {s.name: _Step() for s in spec.steps}
        self.agents: dict[str, _Agent] = {}
        self.cost = Decimal(0)  # every call in the window
        for inst in instances:
            self.add_instance(inst)

    def add_instance(self, inst: Instance) -> None:
        if inst.workflow == self.spec.name and inst.id not in self.tracks:
            self.tracks[inst.id] = _Track(inst, escalated_steps(inst))

    def add(self, e: StepEvent) -> None:
        w = self.window
        if e.workflow != self.spec.name or e.time >= w.until:
            return
        track = self.tracks.get(e.instance_id)
        if track is not None:
            track.add(e, w)
        if e.time < w.since:
            return
        self.cost += e.cost
        step = self.steps.get(e.step)
        if step is None:
            step = self.steps[e.step] = _Step()  # a step no longer defined (its history stays)
        agent = self._agent(e.agent)
        if e.outcome == "refused":
            step.refusals += 1
            agent.refusals += 1
        elif e.outcome == "completed":
            step.completions += 1
            agent.completions += 1
            step.durations.append(float(e.duration_ms))
            if not e.human and not (track is not None and e.step in track.escalated):
                step.autonomous += 1
        else:
            step.failures += 1
            agent.failures += 1

    def _agent(self, name: str) -> _Agent:
        a = self.agents.get(name)
        if a is None:
            if len(self.agents) >= MAX_AGENTS_TRACKED:
                name = OTHER_AGENTS
                a = self.agents.get(name)
            if a is None:
                a = self.agents[name] = _Agent()
        return a

    # ------------------------------------------------------------------ the document
    def document(self) -> dict[str, Any]:
        spec, w = self.spec, self.window
        target = spec.sla_seconds
        starts = w.starts()
        started_per = [0] * len(starts)
        completed_per = [0] * len(starts)
        met_per = [0] * len(starts)
        missed_per = [0] * len(starts)
        cycles: list[float] = []
        waits: list[float] = []
        agent_times: list[float] = []
        completed_costs: list[Decimal] = []
        histogram = [0] * (len(CYCLE_BOUNDS) + 1)
        met = missed = running = at_risk = overdue = closed = 0
        pairs: dict[str, int] = {}
        reworked: dict[str, int] = {}
        step_times: dict[str, list[float]] = {}
        step_met: dict[str, int] = {}
        step_missed: dict[str, int] = {}
        requires = {s.name: s.requires for s in spec.steps}
        step_sla = {s.name: s.sla_seconds for s in spec.steps}

        for t in self.tracks.values():
            i = t.inst
            if w.contains(i.started_at):
                started_per[w.bucket(i.started_at)] += 1
            if i.completed_at is not None and w.contains(i.completed_at):
                b = w.bucket(i.completed_at)
                completed_per[b] += 1
                cycle = max(0.0, i.completed_at - i.started_at)
                human = min(cycle, t.wait_ms / 1000.0)
                cycles.append(cycle)
                waits.append(human)
                agent_times.append(cycle - human)
                completed_costs.append(t.cost)
                histogram[next((k for k, le in enumerate(CYCLE_BOUNDS) if cycle <= le), len(CYCLE_BOUNDS))] += 1
                if target is not None:
                    if cycle <= target:
                        met += 1
                        met_per[b] += 1
                    else:
                        missed += 1
                        missed_per[b] += 1
            shut = closed_at(i)
            if shut is not None and w.contains(shut):
                closed += 1
            if i.started_at <= self.as_of and (i.completed_at is None or i.completed_at > self.as_of) \
                    and (shut is None or shut > self.as_of):
                running += 1
                age = self.as_of - i.started_at
                if target is not None and age >= AT_RISK_SHARE * target:
                    at_risk += 1
                    if age > target:
                        overdue += 1
            for s in t.done_in_window:
                pairs[s] = pairs.get(s, 0) + 1
                if t.done_count.get(s, 0) >= 2:
                    reworked[s] = reworked.get(s, 0) + 1
            for s, first in t.first_done.items():
                if not w.contains(first):
                    continue
                prior = [t.first_done[r] for r in requires.get(s, []) if r in t.first_done]
                reached = max(prior) if prior else i.started_at
                spent = max(0.0, first - reached)
                step_times.setdefault(s, []).append(spent)
                goal = step_sla.get(s)
                if goal is not None:
                    if spent <= goal:
                        step_met[s] = step_met.get(s, 0) + 1
                    else:
                        step_missed[s] = step_missed.get(s, 0) + 1

        cycles_sorted, waits_sorted, agent_sorted = sorted(cycles), sorted(waits), sorted(agent_times)
        n_done = len(cycles)
        completions = sum(x.completions for x in self.steps.values())
        failures = sum(x.failures for x in self.steps.values())
        autonomous = sum(x.autonomous for x in self.steps.values())
        steps_out = []
        for name, agg in self.steps.items():
            durations = sorted(agg.durations)
            took = sorted(step_times.get(name, []))
            goal = step_sla.get(name)
            sm, sx = step_met.get(name, 0), step_missed.get(name, 0)
            steps_out.append({
                "name": name, "attempts": agg.completions + agg.failures, "completions": agg.completions,
                "failures": agg.failures, "refusals": agg.refusals,
                "error_rate": _rate(agg.failures, agg.completions + agg.failures),
                "rework_rate": _rate(reworked.get(name, 0), pairs.get(name, 0)),
                "duration_ms": {"p50": _sec(percentile(durations, 0.5)), "p90": _sec(percentile(durations, 0.9))},
                "step_time_seconds": {"count": len(took), "p50": _sec(percentile(took, 0.5)),
                                      "p90": _sec(percentile(took, 0.9))},
                "sla_seconds": goal, "sla_met": sm, "sla_missed": sx,
                "sla_adherence": _rate(sm, sm + sx) if goal is not None else None,
                "autonomy_rate": _rate(agg.autonomous, agg.completions),
            })
        ranked = sorted(self.agents.items(),
                        key=lambda kv: (-(kv[1].completions + kv[1].failures + kv[1].refusals), kv[0]))
        agents_out = [{"agent": name, "completions": a.completions, "failures": a.failures, "refusals": a.refusals,
                       "error_rate": _rate(a.failures, a.completions + a.failures)}
                      for name, a in ranked[:MAX_AGENTS_SHOWN]]
        total_pairs = sum(pairs.values())
        completed_cost = sum(completed_costs, Decimal(0))
        return {
            "name": spec.name,
            "currency": spec.currency,
            "sla_seconds": target,
            "instances": {"started": sum(started_per), "completed": n_done, "running": running, "closed": closed},
            "cycle_time_seconds": {
                "count": n_done,
                "p50": _sec(percentile(cycles_sorted, 0.5)), "p90": _sec(percentile(cycles_sorted, 0.9)),
                "mean": _sec(sum(cycles) / n_done) if n_done else None,
                "human_wait_p50": _sec(percentile(waits_sorted, 0.5)),
                "human_wait_p90": _sec(percentile(waits_sorted, 0.9)),
                "agent_time_p50": _sec(percentile(agent_sorted, 0.5)),
                "agent_time_p90": _sec(percentile(agent_sorted, 0.9)),
                "human_wait_share": _rate(sum(waits), sum(cycles)),
            },
            "cycle_time_histogram": [{"le": le, "count": histogram[k]}
                                     for k, le in enumerate([*CYCLE_BOUNDS, None])],
            "throughput": {
                "completed": n_done, "per_day": round(n_done / w.days, 3),
                "series": [{"start": iso(s), "started": started_per[k], "completed": completed_per[k]}
                           for k, s in enumerate(starts)],
            },
            "error_rate": _rate(failures, completions + failures),
            "rework_rate": _rate(sum(reworked.values()), total_pairs),
            "sla": {
                "target_seconds": target, "met": met, "missed": missed,
                "adherence": _rate(met, met + missed) if target is not None else None,
                "at_risk": at_risk, "overdue": overdue,
                "burn": [{"start": iso(s), "met": met_per[k], "missed": missed_per[k]} for k, s in enumerate(starts)],
            },
            "cost": {"total": _money(self.cost),
                     "per_instance": _money(completed_cost / n_done) if n_done else None},
            "autonomy_rate": _rate(autonomous, completions),
            "steps": steps_out,
            "agents": agents_out,
        }


def document(window: Window, now: float, builders: Sequence[KpiBuilder], truncated: bool = False) -> dict[str, Any]:
    return {"since": iso(window.since), "until": iso(window.until), "bucket_seconds": window.bucket_seconds,
            "generated_at": iso(now), "truncated": truncated, "workflows": [b.document() for b in builders]}


def compute_kpis(specs: Sequence[WorkflowSpec], instances: Iterable[Instance], events: Iterable[StepEvent],
                 window: Window, now: float) -> dict[str, Any]:
    """The whole document from lists (every instance the window needs, and their events)."""
    builders = {s.name: KpiBuilder(s, window, now) for s in specs}
    for inst in instances:
        b = builders.get(inst.workflow)
        if b is not None:
            b.add_instance(inst)
    for e in events:
        b = builders.get(e.workflow)
        if b is not None:
            b.add(e)
    return document(window, now, list(builders.values()))


async def read_kpis(store: Any, specs: Sequence[WorkflowSpec], window: Window, now: float, *,
                    max_events: int = MAX_EVENTS, max_instances: int = MAX_INSTANCES,
                    page: int = EVENT_PAGE) -> dict[str, Any]:
    """The document from the store (StoreError passes through), with bounded memory (module doc).

    Instances: per workflow, those that moved since `since` (every one that started,
    completed or had a call in the window) and those still running. Events: every event
    of the workflows from the earliest start among the instances that moved (so their
    whole history is seen: human waits, first completions, repeats), page by page."""
    truncated = False
    builders: dict[str, KpiBuilder] = {}
    scan_from = window.since
    for spec in specs:
        moved = await store.list_workflow_instances(workflow=spec.name, since=window.since, limit=max_instances + 1)
        running = await store.list_workflow_instances(workflow=spec.name, state="running", limit=max_instances + 1)
        truncated = truncated or len(moved) > max_instances or len(running) > max_instances
        b = KpiBuilder(spec, window, now, moved[:max_instances])
        for inst in running[:max_instances]:
            b.add_instance(inst)
        builders[spec.name] = b
        scan_from = min([scan_from, *(i.started_at for i in moved[:max_instances])])
    only = specs[0].name if len(specs) == 1 else None
    after, read = 0, 0
    while builders:
        batch = await store.workflow_events(workflow=only, since=scan_from, after_seq=after, limit=page)
        for e in batch:
            target = builders.get(e.workflow)
            if target is not None:
                target.add(e)
        read += len(batch)
        if len(batch) < page:
            break
        after = max(after, *(e.seq or 0 for e in batch))
        if read >= max_events:
            more = await store.workflow_events(workflow=only, since=scan_from, after_seq=after, limit=1)
            truncated = truncated or bool(more)
            break
    return document(window, now, list(builders.values()), truncated)
