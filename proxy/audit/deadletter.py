"""Dead letters: events a destination refused for good, kept instead of dropped.

A non-retryable rejection (HEC 400 "Incorrect index", 413 for a single event,
a token that needs a channel, ...) used to lose the batch. Now each refused
event is appended to a JSON-lines file (default `<state_dir>/dead-letters/<sink>.jsonl`),
bounded in size, one line per event:

    {"time": "...Z", "sink": "splunk", "reason": "HTTP 400: {...}", "payload": <exactly what was sent>}

`payload` is the event object as the sink sent it (for HEC, the
`{"time", "host", "source", "sourcetype", "event"}` object, with the chained
OCSF event inside), so the file can be replayed once the cause is fixed:
`jq -c .payload FILE | curl --data-binary @- -H "Authorization: Splunk $TOKEN" URL`.
Lines that would make the file larger than `max_bytes` are not written (they
are counted as lost). A write that fails part-way is cut back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("proctor.audit.sinks")


class DeadLetterFile:
    def __init__(self, path: Path, max_bytes: int, sink_name: str) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.sink_name = sink_name
        self._last_full_log = float("-inf")

    def keep(self, payloads: list[bytes], reason: str) -> int:
        """Append one line per payload; how many were kept (the rest is lost)."""
        if self.max_bytes <= 0 or not payloads:
            return 0
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        head = (b'{"time":' + json.dumps(now).encode() + b',"sink":' + json.dumps(self.sink_name).encode()
                + b',"reason":' + json.dumps(reason, ensure_ascii=False).encode() + b',"payload":')
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            log.error("audit sink %s: dead-letter file %s cannot be opened: %s", self.sink_name, self.path, e)
            return 0
        try:
            start = os.fstat(fd).st_size
            room = self.max_bytes - start
            lines: list[bytes] = []
            for p in payloads:
                line = head + p + b"}\n"
                if len(line) > room:
                    break
                room -= len(line)
                lines.append(line)
            if len(lines) < len(payloads):
                now_m = time.monotonic()
                if now_m - self._last_full_log >= 60:
                    self._last_full_log = now_m
                    log.error("audit sink %s: dead-letter file %s is full (%d bytes): refused events are lost",
                              self.sink_name, self.path, self.max_bytes)
            if not lines:
                return 0
            data = b"".join(lines)
            try:
                n = os.write(fd, data)
            except OSError as e:
                n, error = -1, e
            else:
                error = None
            if n != len(data):
                try:
                    os.ftruncate(fd, start)  # no torn line in the dead letters either
                except OSError:
                    pass
                log.error("audit sink %s: dead-letter file %s cannot be written: %s", self.sink_name, self.path,
                          error or f"short write ({n} of {len(data)} bytes)")
                return 0
            return len(lines)
        finally:
            os.close(fd)
