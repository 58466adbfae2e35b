"""The audit writer: typed records in (proxy/record/model.py), redacted, chained OCSF events
out to every sink.

Wired as a listener of the decision recorder, so every decision and every
state change (approval, suspension, policy rollback) becomes exactly one event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from ..core.model import Refusal
from ..record.model import DecisionRecord, Record, TrailEvent, iso, parse_record
from .chain import Chain
from .filesink import FileSink
from .ocsf import to_ocsf
from .sink import Sink

__all__ = ["AuditTrail", "FileSink", "Redactor", "REDACTED"]

log = logging.getLogger("proctor.audit")

REDACTED = "[redacted]"


class Redactor:
    """Masks configured keys (anywhere, case-insensitive) and string patterns (e.g. card numbers)."""

    def __init__(self, keys: list[str], patterns: list[str]) -> None:
        self.keys = frozenset(k.lower() for k in keys)
        self.patterns = [re.compile(p) for p in patterns]

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (REDACTED if isinstance(k, str) and k.lower() in self.keys else self(v)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str) and self.patterns:
            for p in self.patterns:
                value = p.sub(REDACTED, value)
        return value


def _name(record: Record | Mapping[str, Any]) -> object:
    """What a record is called in a log line: its decision id, else its type."""
    if isinstance(record, Mapping):
        return record.get("decision_id") or record.get("type")
    return record.decision_id if isinstance(record, DecisionRecord) else record.record_type


class AuditTrail:
    def __init__(
        self,
        sinks: list[Sink],
        redactor: Redactor,
        chain: Chain,
        fail_closed_methods: frozenset[str],
        block_timeout_seconds: float,
        replica: str | None = None,
    ) -> None:
        self.sinks = sinks
        self.redact = redactor
        self.chain = chain
        self.fail_closed_methods = fail_closed_methods
        self.block_timeout_seconds = block_timeout_seconds
        self.emitted = 0
        self.errors = 0
        self.refused = 0
        self.gaps = 0  # gap markers written (events a file could not take, accounted for)
        self._files = [s for s in sinks if isinstance(s, FileSink)]
        for f in self._files:
            f.on_trial = lambda: self._account_for_files(None)
        self._ticker: asyncio.Task | None = None
        import socket

        # Which writer produced the event: each writer (process) has its own chain (uid), and
        # the device it runs as is the replica (config.replica_id), as in the record's `replica`.
        self.replica = replica
        host = socket.gethostname()
        self.logger: dict[str, Any] = {"name": "proctor", "uid": f"{host}:{os.getpid()}",
                                       "product": {"name": "Proctor", "vendor_name": "Proctor"}}
        if replica is not None:
            self.logger["device"] = {"type_id": 1, "type": "Server", "hostname": host, "name": replica}

    def _build(self, record: Record | Mapping[str, Any]) -> dict[str, Any]:
        event = to_ocsf(record)
        # only the parts that can carry request data need the (costly) walk
        for key in ("resources", "status_detail", "message", "http_request"):
            if key in event:
                event[key] = self.redact(event[key])
        proctor = event.get("unmapped", {}).get("proctor")
        if proctor is not None:
            for key in ("context", "reason", "error"):
                if key in proctor:
                    proctor[key] = self.redact(proctor[key])
        if self.replica is not None and proctor is not None:
            proctor.setdefault("replica", self.replica)  # the trail's own events (gap, repair) too
        event["metadata"]["loggers"] = [self.logger]
        return event

    def emit(self, record: Record | Mapping[str, Any]) -> None:
        """One record (a line-shaped dict is validated first) -> one chained OCSF event on
        every sink (never raises)."""
        try:
            event = self._build(record)
        except Exception:
            self.errors += 1
            log.exception("could not build the audit event for %s", _name(record))
            return
        if self._files:
            self._account_for_files(event)
        self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        try:
            line = self.chain.link(event)
        except Exception:
            self.errors += 1
            log.exception("could not chain an audit event")
            return
        self.emitted += 1
        for sink in self.sinks:
            try:
                sink.submit(line, event)
            except Exception:
                self.errors += 1
                log.exception("audit sink %s failed", sink.name)

    def _emit_internal(self, record: dict[str, Any]) -> None:
        """An event about the trail itself (a gap, a repair; as the file sink describes it),
        chained like any other."""
        record.setdefault("time", iso(time.time()))
        try:
            rec = parse_record(record)
            if not isinstance(rec, TrailEvent):
                raise ValueError(f"not an audit-trail event: {record.get('type')!r}")
            event = self._build(rec)
        except Exception:
            self.errors += 1
            log.exception("could not build the audit %s event", record.get("event"))
            return
        self._send(event)

    def _account_for_files(self, before: dict[str, Any] | None) -> None:
        """Before `before` is chained (None: on the timer): repairs and gap markers first,
        so a file never goes on past events it lacks without saying so."""
        for sink in self._files:
            while sink.notices:
                self._emit_internal(sink.notices.pop(0))
            if sink.ready_for_gap(before):
                self._emit_internal(sink.gap_record(self.chain.seq))
                if sink.missing is None:  # the marker landed (counted only then)
                    self.gaps += 1

    async def _tick(self) -> None:
        # a recovered file gets its gap marker even when no request comes
        while True:
            await asyncio.sleep(0.5)
            try:
                self._account_for_files(None)
            except Exception:  # noqa: BLE001 - the timer must keep running
                log.exception("audit file maintenance failed")

    async def admit(self, method: str) -> Refusal | None:
        """Before forwarding an allowed request: may it go out while the trail is in this state?"""
        for sink in self.sinks:
            if sink.overflow == "block" and not sink.healthy:
                if await sink.wait_for_capacity(self.block_timeout_seconds):
                    continue
                return self._refusal(sink, "stayed unavailable")
            if sink.overflow == "fail_closed" and method.upper() in self.fail_closed_methods and not sink.healthy:
                return self._refusal(sink, getattr(sink, "why_unhealthy", "cannot be written"))
        return None

    def _refusal(self, sink: Sink, why: str) -> Refusal:
        self.refused += 1
        return Refusal(
            503,
            "Audit trail unavailable",
            f"the audit sink {sink.name!r} {why}; write requests are refused until every event can be "
            "recorded (fail closed)",
            reasons=["audit-unavailable"],
            kind="fail-closed",
        )

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()
        if self._files:
            self._account_for_files(None)  # a repair found at startup is recorded first
            self._ticker = asyncio.create_task(self._tick(), name="proctor-audit-files")

    async def close(self, drain_seconds: float = 5.0) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        # Events a file missed get their gap marker before it closes: the next start
        # continues the chain from the file's last event, and without the marker that
        # event's successors (already sent to network sinks) would be numbered again.
        for sink in self._files:
            sink.probe_now()
        try:
            self._account_for_files(None)
        except Exception:  # noqa: BLE001 - closing must go on
            log.exception("could not write the audit gap marker at shutdown")
        for sink in self._files:
            m = sink.missing
            if m is not None:
                log.error("audit file %s lacks events %d to %d and no gap marker could be written before shutdown "
                          "(%s); the next start numbers its events after the file's last one", sink.path, m.first,
                          self.chain.seq, m.reason)
        for sink in self.sinks:
            try:
                await sink.close(drain_seconds)
            except Exception:
                log.exception("audit sink %s did not close cleanly", sink.name)
