"""`proctor policy replay` and `proctor policy explain --decision`: re-evaluate recorded decisions.

Each decision record carries the Cedar principal, resource and context the
decision was made on (`cedar`, see docs/decision-record.md), without the raw
body, the raw query string and MCP tool arguments. Replaying evaluates those
inputs against another policy set and reports what would change. A policy that
reads one of the unrecorded keys cannot be replayed exactly: such results are
marked `approximate`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from ..approvals.policy import hold_groups
from ..record.model import UNRECORDED_CONTEXT_KEYS, DecisionRecord, RecordError, parse_line
from .engine import PolicyBundle, PolicyStore


class ReplayInputError(Exception):
    pass


def parse_time(text: str, now: float | None = None) -> float:
    """An ISO 8601 time, or a duration back from now (30m, 24h, 7d)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        return now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReplayInputError(f"not a time: {text!r} (use ISO 8601 like 2026-11-21T10:00:00Z, or 30m, 24h, 7d)") from None
    if dt.tzinfo is None:
        raise ReplayInputError(f"give a time zone: {text!r} (e.g. a trailing Z for UTC)")
    return dt.timestamp()


def record_time(rec: DecisionRecord) -> float:
    try:
        return datetime.fromisoformat(rec.time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass
class Unreadable:
    """Lines of the decision record that are not records (a torn last line after a crash,
    or something else): skipped, counted, the first one described."""

    count: int = 0
    first: str | None = None

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"line {lineno}: {why}"


def read_records(path: Path, since: float | None = None, until: float | None = None,
                 unreadable: Unreadable | None = None, needle: bytes | None = None) -> Iterator[DecisionRecord]:
    """Decision records (not approval/suspension events) in [since, until), validated
    (proxy/record/model.py). Only lines containing `needle` are read, when given."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ReplayInputError(f"cannot read the decision record {path}: {e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if needle is not None and needle not in raw:
                continue
            if not raw.strip():
                continue
            try:
                rec = parse_line(raw)
            except RecordError as e:
                if unreadable is not None:
                    unreadable.add(lineno, str(e))
                continue
            if not isinstance(rec, DecisionRecord):
                continue  # an event line (approval, suspension, policy)
            t = record_time(rec)
            if since is not None and t < since:
                continue
            if until is not None and t >= until:
                continue
            yield rec


def find_record(path: Path, decision_id: str) -> DecisionRecord | None:
    # (only lines that mention the id are parsed)
    for rec in read_records(path, needle=json.dumps(decision_id).encode()):
        if rec.decision_id == decision_id:
            return rec
    return None


def replay_context(context: dict[str, Any]) -> dict[str, Any]:
    """The recorded context, with `query` (a required string the record may drop) defaulted to ""."""
    return context if "query" in context else {**context, "query": ""}


def evaluate(store: PolicyStore, rec: DecisionRecord) -> tuple[str, list[str], list[str]]:
    """(allow | deny | hold, reasons, errors) of a recorded request under `store`'s policies."""
    cedar, action = rec.cedar, rec.action
    assert cedar is not None and action, "only records with policy inputs can be evaluated"
    principal, resource, context = cedar["principal"], cedar["resource"], replay_context(cedar["context"])
    result = store.authorize(principal, action, resource, context, [principal, resource])
    if result.errors:
        return "deny", result.reasons, result.errors
    if result.allowed:
        return "allow", result.reasons, []
    groups = hold_groups(result.reasons, store.bundle.approvals) if "approval" not in context else None
    if groups:
        # as the proxy does: a hold only if an approval could let it through
        from ..approvals.service import ApprovalService

        prospective = {**context, "approval": ApprovalService.prospective_context(groups)}
        check = store.authorize(principal, action, resource, prospective, [principal, resource])
        if check.allowed and not check.errors:
            return "hold", result.reasons, []
    return "deny", result.reasons, []


_UNRECORDED_REFS = tuple(
    (key, re.compile(r'"left":\{"Var":"context"\},"attr":"' + key + '"')) for key in UNRECORDED_CONTEXT_KEYS
)


def unrecorded_reads(bundle: PolicyBundle, action: str) -> set[str]:
    """Unrecorded context keys the policies in scope for `action` read."""
    keys: set[str] = set()
    for pid in bundle.part_for(action).policy_ids:
        text = json.dumps(bundle.policy_est[pid], separators=(",", ":"))
        for key, pattern in _UNRECORDED_REFS:
            if pattern.search(text):
                keys.add(key)
    return keys


@dataclass
class Change:
    decision_id: str
    time: str
    agent: str | None
    action: str
    resource: str | None
    was: str
    now: str
    was_reasons: list[str]
    now_reasons: list[str]
    errors: list[str]
    approximate: bool

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class ReplayReport:
    candidate_revision: str
    considered: int = 0
    replayed: int = 0
    unchanged: int = 0
    skipped_no_inputs: int = 0  # refused before policy (authentication, egress...) or recorded without inputs
    approximate: int = 0
    transitions: dict[str, int] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    unreadable: Unreadable = field(default_factory=Unreadable)  # lines that are not records
    # records whose recorded Cedar inputs Cedar refuses (a hand-edited line: an invalid entity type...)
    unevaluable: int = 0
    first_unevaluable: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "candidate_revision": self.candidate_revision,
            "considered": self.considered,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "changed": len(self.changes),
            "skipped_no_inputs": self.skipped_no_inputs,
            "approximate": self.approximate,
            "transitions": self.transitions,
            "changes": [c.as_dict() for c in self.changes],
        }
        if self.unreadable.count:  # (only then: the key set is otherwise what it always was)
            out["unreadable"] = self.unreadable.count
        if self.unevaluable:
            out["unevaluable"] = self.unevaluable
        return out


def replay(records: Iterator[DecisionRecord], candidate: PolicyStore, unreadable: Unreadable | None = None) -> ReplayReport:
    """`unreadable`: what the reader of `records` skipped (it is complete once they are consumed)."""
    report = ReplayReport(candidate_revision=candidate.bundle.revision)
    if unreadable is not None:
        report.unreadable = unreadable
    unrecorded_cache: dict[str, set[str]] = {}
    for rec in records:
        report.considered += 1
        was, action, cedar = rec.policy_decision, rec.action, rec.cedar
        if cedar is None or was is None or not action:
            report.skipped_no_inputs += 1
            continue
        try:
            now, reasons, errors = evaluate(candidate, rec)
        except ValueError as e:  # one bad line must not end the replay of the others
            report.unevaluable += 1
            if report.first_unevaluable is None:
                report.first_unevaluable = f"decision {rec.decision_id}: {e}"
            continue
        report.replayed += 1
        if action not in unrecorded_cache:
            unrecorded_cache[action] = unrecorded_reads(candidate.bundle, action)
        approximate = bool(unrecorded_cache[action] & set(cedar.get("unrecorded", [])))
        if approximate:
            report.approximate += 1
        if now == was and sorted(reasons) == sorted(rec.reasons) and not errors:
            report.unchanged += 1
            continue
        if now == was and not errors:
            report.unchanged += 1  # same decision, other determining policies: not a change in effect
            continue
        key = f"{was}->{now}"
        report.transitions[key] = report.transitions.get(key, 0) + 1
        report.changes.append(
            Change(
                decision_id=rec.decision_id,
                time=rec.time,
                agent=rec.agent,
                action=action,
                resource=rec.resource,
                was=was,
                now=now,
                was_reasons=list(rec.reasons),
                now_reasons=reasons,
                errors=errors,
                approximate=approximate,
            )
        )
    return report


def render_report(report: ReplayReport, limit: int = 50) -> str:
    lines = [
        f"candidate revision {report.candidate_revision}: {report.replayed} decisions replayed, "
        f"{report.unchanged} unchanged, {len(report.changes)} would change"
        + (f", {report.skipped_no_inputs} skipped (refused before policy or recorded without inputs)" if report.skipped_no_inputs else "")
    ]
    if report.approximate:
        lines.append(
            f"{report.approximate} replayed decisions are approximate: policies for their action read "
            f"context keys the record does not keep ({', '.join(UNRECORDED_CONTEXT_KEYS)})"
        )
    for key, n in sorted(report.transitions.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {key:<14} {n}")
    for c in report.changes[:limit]:
        why_was = ", ".join(c.was_reasons) or "default"
        why_now = ", ".join(c.now_reasons) or ("error: " + "; ".join(c.errors) if c.errors else "default")
        mark = " (approximate)" if c.approximate else ""
        lines.append(
            f"{c.time}  {c.decision_id}  {c.agent}  {c.action}  {c.resource}: {c.was} ({why_was}) -> {c.now} ({why_now}){mark}"
        )
    if len(report.changes) > limit:
        lines.append(f"... and {len(report.changes) - limit} more (use --json or --limit)")
    if report.unreadable.count:
        lines.append(f"{report.unreadable.count} line(s) skipped: not decision records "
                     f"(first: {report.unreadable.first})")
    if report.unevaluable:
        lines.append(f"{report.unevaluable} decision(s) skipped: Cedar refuses their recorded inputs "
                     f"(first: {report.first_unevaluable})")
    return "\n".join(lines)
