"""The decision record: one JSON line per request, appended to a file.

Each line is written with a single `write(2)` on an O_APPEND descriptor, so
lines from one process never interleave and a crash loses at most the line
being written. Lines are typed records (proxy/record/model.py): only their fields
are ever written: no headers, no query string, no body, no token; secrets cannot
reach this file by construction, and the free-text fields (refusal detail,
errors) pass through proxy.logredact.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.exchange import Exchange
from .model import (  # noqa: F401  (iso, UNRECORDED_CONTEXT_KEYS, policy_inputs_record: imported from here too)
    UNRECORDED_CONTEXT_KEYS,
    DecisionRecord,
    Record,
    as_record,
    iso,
    policy_inputs_record,
)

log = logging.getLogger("proctor.record")


def decision_record(ex: Exchange, with_inputs: bool = True) -> dict[str, Any]:
    """The decision line of one exchange as a dict (for tools and tests; the request path
    writes the typed `DecisionRecord`)."""
    return DecisionRecord.from_exchange(ex, with_inputs).to_dict()


class DecisionRecorder:
    def __init__(self, path: Path, replica: str | None = None) -> None:
        self.path = Path(path)
        # this replica's id (config.replica_id): every line names the replica that wrote it
        self.replica = replica
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._lock = threading.Lock()
        self.written = 0
        self.failures = 0
        # redacts configured sensitive values (audit.redact) out of the recorded policy inputs
        self.redact: Callable[[Any], Any] | None = None
        # called with every record after it is written (the OCSF audit trail)
        self.listeners: list[Callable[[Record], None]] = []

    def write(self, record: Record | Mapping[str, Any]) -> None:
        """Append one record (a line-shaped dict is validated into one first) and hand it to
        the listeners. The recorded Cedar inputs are redacted before either sees them."""
        rec = as_record(record)
        if rec.replica is None:
            rec.replica = self.replica
        if self.redact is not None and isinstance(rec, DecisionRecord) and rec.cedar is not None:
            rec.cedar = self.redact(rec.cedar)
        line = rec.line()
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
            listener(rec)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
