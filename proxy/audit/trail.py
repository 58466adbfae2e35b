"""The audit writer: decision-record lines in, redacted, chained OCSF events out to every sink.

Wired as a listener of the decision recorder, so every decision and every
state change (approval, suspension, policy rollback) becomes exactly one event.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ..core.model import Refusal
from .chain import Chain
from .ocsf import to_ocsf
from .sink import Sink

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


class FileSink(Sink):
    """The audit file: one O_APPEND write(2) per event, rotated by size and age.

    Rotated files are renamed `<stem>-<UTC time><suffix>` next to it; the newest
    `keep` are kept. The chain runs on across rotations.
    """

    name = "file"

    def __init__(self, path: Path, max_bytes: int, max_age_seconds: float, keep: int, fsync: bool, overflow: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self.keep = keep
        self.fsync = fsync
        self.overflow = overflow  # type: ignore[assignment]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0
        self._opened_at = time.time()
        self._failing = False
        self._closed = False
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self._fd)
        if st.st_size:
            # a torn last line (crash mid-write) must not swallow the next event: end it
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
                    st = os.fstat(self._fd)
        self._size = st.st_size
        # age counts from the file's first event (its creation), not from this process
        self._opened_at = st.st_mtime if st.st_size else time.time()

    def rotated_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}"))

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "")
        target = self.path.with_name(f"{self.path.stem}-{stamp}Z{self.path.suffix}")
        os.replace(self.path, target)
        self._open()
        if self.keep > 0:
            for old in self.rotated_files()[: -self.keep]:
                try:
                    old.unlink()
                except OSError as e:
                    log.warning("could not remove rotated audit file %s: %s", old, e)

    def submit(self, line: bytes, event: dict[str, Any]) -> bool:
        self.stats["submitted"] += 1
        if self._closed:
            self.stats["dropped"] += 1  # after shutdown closed the file (counted, never written elsewhere)
            return False
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(f"short write ({n} of {len(line)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
            self._size += n
            self._failing = False
            self.stats["sent"] += 1
            if (self.max_bytes and self._size >= self.max_bytes) or (
                self.max_age_seconds and time.time() - self._opened_at >= self.max_age_seconds
            ):
                self._rotate()
            return True
        except OSError as e:
            self.stats["failed"] += 1
            if not self._failing:
                log.error("audit file %s cannot be written: %s", self.path, e)
            self._failing = True
            try:
                if self._fd is not None:
                    os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            return False

    @property
    def healthy(self) -> bool:
        return not self._failing

    async def wait_for_capacity(self, timeout: float) -> bool:
        """A file has no queue: `block` waits (bounded) for it to be writable again."""
        import asyncio

        deadline = time.monotonic() + timeout
        while self._failing and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                if self._fd is None:
                    self._open()
                    self._failing = False  # reopened: the next event shows whether it really writes
            except OSError:
                pass
        return not self._failing

    async def close(self, drain_seconds: float = 5.0) -> None:
        self._closed = True
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class AuditTrail:
    def __init__(
        self,
        sinks: list[Sink],
        redactor: Redactor,
        chain: Chain,
        fail_closed_methods: frozenset[str],
        block_timeout_seconds: float,
    ) -> None:
        self.sinks = sinks
        self.redact = redactor
        self.chain = chain
        self.fail_closed_methods = fail_closed_methods
        self.block_timeout_seconds = block_timeout_seconds
        self.emitted = 0
        self.errors = 0
        self.refused = 0
        import socket

        # which writer (replica) produced the event: each writer has its own chain
        self.logger = {"name": "proctor", "uid": f"{socket.gethostname()}:{os.getpid()}",
                       "product": {"name": "Proctor", "vendor_name": "Proctor"}}

    def emit(self, record: dict[str, Any]) -> None:
        """One decision-record line -> one chained OCSF event on every sink (never raises)."""
        try:
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
            event["metadata"]["loggers"] = [self.logger]
            line = self.chain.link(event)
        except Exception:
            self.errors += 1
            log.exception("could not build the audit event for %s", record.get("decision_id") or record.get("type"))
            return
        self.emitted += 1
        for sink in self.sinks:
            try:
                sink.submit(line, event)
            except Exception:
                self.errors += 1
                log.exception("audit sink %s failed", sink.name)

    async def admit(self, method: str) -> Refusal | None:
        """Before forwarding an allowed request: may it go out while the trail is in this state?"""
        for sink in self.sinks:
            if sink.overflow == "block" and not sink.healthy:
                if await sink.wait_for_capacity(self.block_timeout_seconds):
                    continue
                return self._refusal(sink, "stayed full")
            if sink.overflow == "fail_closed" and not sink.healthy and method.upper() in self.fail_closed_methods:
                return self._refusal(sink, "cannot be written")
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

    async def close(self, drain_seconds: float = 5.0) -> None:
        for sink in self.sinks:
            try:
                await sink.close(drain_seconds)
            except Exception:
                log.exception("audit sink %s did not close cleanly", sink.name)
