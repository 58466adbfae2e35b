"""The decision record: one JSON line per request, appended to a file.

Each line is written with a single `write(2)` on an O_APPEND descriptor, so
lines from one process never interleave and a crash loses at most the line
being written. Only the fields below are ever written: no headers, no query
string, no body, no token; secrets cannot reach this file by construction, and
the free-text fields (refusal detail, errors) pass through proxy.logredact.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.exchange import Exchange, Kind
from ..logredact import redact

log = logging.getLogger("proctor.record")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Context keys never recorded: the raw body, the raw query string and MCP tool
# arguments may carry anything (credentials, personal data). Connector-declared
# typed values (params, query_params, fields) are what policies should use.
UNRECORDED_CONTEXT_KEYS = ("body", "query", "arguments")


def policy_inputs_record(inputs: tuple) -> dict[str, Any]:
    principal, resource, context = inputs
    # (an empty value is kept: it carries nothing, and replay then sees exactly what policy saw)
    ctx = {k: v for k, v in context.items() if k not in UNRECORDED_CONTEXT_KEYS or v in (None, "")}
    dropped = [k for k in UNRECORDED_CONTEXT_KEYS if context.get(k) not in (None, "")]
    out: dict[str, Any] = {"principal": principal, "resource": resource, "context": ctx}
    if dropped:
        out["unrecorded"] = dropped
    return out


def decision_record(ex: Exchange, with_inputs: bool = True) -> dict[str, Any]:
    """The decision record of one exchange (what the agent was answered, and why)."""
    cls = ex.classification
    refusal = ex.refusal
    resp = ex.response
    req = ex.request
    if resp is not None:
        status, upstream_status, error = resp.status, resp.upstream_status, resp.error
    else:
        status, upstream_status, error = (refusal.status or None) if refusal is not None else None, None, None
    rec: dict[str, Any] = {
        "decision_id": ex.decision_id,
        "time": iso(ex.timestamp),
        "agent": ex.identity.agent_id if ex.identity else None,
        "issuer": ex.identity.issuer if ex.identity else None,
        "action": cls.action if cls else None,
        "resource": cls.resource_uid if cls else None,
        "connector": cls.connector if cls else None,
        "risk": cls.risk if cls else None,
        "decision": ex.decision.value,
        "reasons": ex.reasons if refusal is None else refusal.reasons,
        "policy_revision": ex.policy_revision or None,
        "status": status,
        "upstream_status": upstream_status,
        "latency_ms": None if ex.kind is Kind.CONNECTION else round(ex.elapsed_ms(), 3),
        "decision_ms": None if ex.decision_ms is None else round(ex.decision_ms, 3),
    }
    if req is not None:
        rec.update(
            {
                "method": req.method,
                "host": req.host,
                "port": req.port,
                "path": req.path,
                "mode": req.mode,
                "client_ip": req.client_ip,
            }
        )
    elif ex.connection is not None:
        conn = ex.connection
        rec.update({"client_ip": conn.client_ip, "host": conn.host, "port": conn.port})
    # Free text (details, engine and upstream error messages) may quote request data:
    # no query string, userinfo or header value is recorded from it.
    if refusal is not None:
        rec["refusal"] = {"kind": refusal.kind, "title": refusal.title, "detail": redact(refusal.detail)}
    if ex.errors:
        rec["errors"] = [redact(e) if isinstance(e, str) else e for e in ex.errors]
    if ex.shadow is not None:
        rec["shadow"] = ex.shadow
    if cls is not None and cls.rpc is not None:
        rec["rpc"] = cls.rpc  # JSON-RPC method and tool (never the arguments)
    if ex.approval_id:
        rec["approval_id"] = ex.approval_id
    if ex.policy_decision is not None:
        rec["policy_decision"] = ex.policy_decision
    if ex.trace_ids is not None:
        rec["trace_id"], rec["span_id"] = ex.trace_ids
    if with_inputs and ex.policy_inputs is not None:
        rec["cedar"] = policy_inputs_record(ex.policy_inputs)
    if error:
        rec["error"] = redact(error)
    return rec


class DecisionRecorder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._lock = threading.Lock()
        self.written = 0
        self.failures = 0
        # redacts configured sensitive values (audit.redact) out of the recorded policy inputs
        self.redact: Any = None
        # called with every record after it is written (the OCSF audit trail)
        self.listeners: list[Any] = []

    def write(self, record: dict[str, Any]) -> None:
        if self.redact is not None and "cedar" in record:
            record["cedar"] = self.redact(record["cedar"])
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock:
                if self._fd is None:  # closed at shutdown: never write to a reused descriptor number
                    raise OSError("the decision record is closed (shutting down)")
                os.write(self._fd, line)
            self.written += 1
        except OSError:
            self.failures += 1
            log.exception("cannot append to decision record %s", self.path)
        for listener in self.listeners:
            listener(record)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
