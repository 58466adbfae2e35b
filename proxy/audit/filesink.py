"""The audit file: one O_APPEND write(2) per event, rotated by size and age, safe on a full disk.

A full disk must neither lose the event of a request that was already
forwarded, nor leave half a line, nor let the next write request through
unrecorded. Three mechanisms (docs/siem.md#full-disk):

- **Free-space floor** (`min_free_bytes`): while the file system has less free
  space, the sink reports unhealthy, so the audit gate refuses write requests
  *before* forwarding them, while there is still room to record the refusals.
- **Reserve** (`reserve_bytes`): a preallocated file next to the audit file. If
  a write still hits ENOSPC (the disk filled between two checks), the torn
  part is cut off, the reserve is given back and the write is retried, so the
  events of requests already forwarded land. Until space returns the sink is
  unhealthy and writes only what must land (allowed requests, state changes);
  the other events are counted, not written.
- **Gap marker**: every event the file did not get is accounted for. Before the
  next event is written, the trail writes a chained `audit.gap` event naming the
  sequence numbers the file lacks and why, so `proctor audit verify` passes
  and says what is missing instead of reporting a deletion.

A write that fails part-way is truncated back to the last complete line, and
an incomplete last line found when the file is opened (a crash mid-write) is
cut off and reported in a `repaired` event, so the file holds whole lines only.
The sink recovers by itself: once the free space is back above
`min_free_bytes + reserve_bytes` it recreates the reserve and writes again.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from .sink import Sink

log = logging.getLogger("proctor.audit")

_SPACE_CHECK_SECONDS = 0.25  # statvfs at most this often (admit() runs per request)
_PROBE_MIN, _PROBE_MAX = 0.05, 2.0  # backoff between attempts to recover a broken file
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

# ok: writing. reserve: the disk filled, the reserve was given back; only events that must
# land are written. broken: a write failed; nothing is written until a probe finds room
# and the file open again (trial), and then only the gap marker, whose landing proves it.
Mode = Literal["ok", "reserve", "broken", "trial"]


def rotated_files(path: Path) -> list[Path]:
    """`<stem>-<YYYYMMDD>T<HHMMSS><micros>Z<suffix>` next to `path`, oldest first (names sort by time).
    Only names of that shape: another `audit-*.jsonl` in the directory is not part of the trail."""
    return sorted(p for p in path.parent.glob(f"{path.stem}-[0-9]*T[0-9]*Z{path.suffix}")
                  if _ROTATED.fullmatch(p.name[len(path.stem) + 1: len(p.name) - len(path.suffix)]))


_ROTATED = re.compile(r"\d{8}T\d{12}Z")


def must_land(event: dict[str, Any] | None) -> bool:
    """Events the reserve is for: allowed (forwarded) requests and state changes.
    Refusals and holds did not reach an upstream; while the disk is full they are
    counted and declared in the gap marker instead of using up the reserve. (A
    monitored would-be deny or hold that was forwarded reached the upstream: it lands.)"""
    if event is None:
        return False
    p = event.get("unmapped", {}).get("proctor", {})
    monitored = p.get("monitored")
    return (p.get("record") != "decision" or p.get("decision") == "allow"
            or (isinstance(monitored, dict) and monitored.get("forwarded") is True))


def is_gap_marker(event: dict[str, Any]) -> bool:
    p = event.get("unmapped", {}).get("proctor", {})
    return p.get("record") == "audit" and p.get("event") == "gap"


class DiskReserve:
    """A preallocated file that is given back when the disk is full."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.held = False

    def ensure(self) -> bool:
        """Have the reserve allocated; False when there is no room for it."""
        if self.size <= 0 or self.held:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # glibc writes zeros where fallocate is unsupported
            finally:
                os.close(fd)
        except OSError as e:
            log.debug("audit reserve %s cannot be allocated: %s", self.path, e)
            try:
                self.path.unlink()
            except OSError:
                pass
            return False
        self.held = True
        return True

    def release(self) -> bool:
        """Give the space back; False when there was none to give."""
        if not self.held:
            return False
        self.held = False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("audit reserve %s cannot be released: %s", self.path, e)
            return False
        return True


@dataclass
class Missing:
    """Events the file did not get, since `first` (all later ones too, until the gap marker lands)."""

    first: int
    last: int
    reason: str
    decisions: dict[str, int] = field(default_factory=dict)

    def add(self, event: dict[str, Any]) -> None:
        seq = event.get("metadata", {}).get("sequence")
        if isinstance(seq, int):
            self.last = max(self.last, seq)
        p = event.get("unmapped", {}).get("proctor", {})
        kind = p.get("decision") if p.get("record") == "decision" else f"{p.get('record')}.{p.get('event')}"
        self.decisions[str(kind)] = self.decisions.get(str(kind), 0) + 1


class FileSink(Sink):
    """The audit file. Rotated files are renamed `<stem>-<UTC time><suffix>` next to it;
    the newest `keep` are kept. The chain runs on across rotations."""

    name = "file"

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        max_age_seconds: float,
        keep: int,
        fsync: bool,
        overflow: str,
        reserve_bytes: int = 0,
        min_free_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.stats["skipped"] = 0
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self.keep = keep
        self.fsync = fsync
        self.overflow = overflow  # type: ignore[assignment]
        self.min_free_bytes = min_free_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reserve = DiskReserve(self.path.with_name(f".{self.path.name}.reserve"), reserve_bytes)
        self.notices: list[dict[str, Any]] = []  # audit records for the trail to emit (repairs)
        self.missing: Missing | None = None
        # set by the trail: called when a probe finds the file usable again, to write the gap marker now
        self.on_trial: Callable[[], None] | None = None
        self._fd: int | None = None
        self._size = 0
        self._opened_at = time.time()
        self._mode: Mode = "ok"
        self._closed = False
        self._space_checked = float("-inf")
        self._space_low = False
        self._next_probe = 0.0
        self._probe_delay = 0.0
        self._open()
        if not self.reserve.ensure():
            # as if the reserve were already spent: writes are refused, events that must land
            # are written while they fit, and the probe recreates the reserve once there is room
            log.error("audit file %s: no room for the %d-byte reserve; the file system is full or nearly so: "
                      "write requests are refused until there is", self.path, self.reserve.size)
            self._mode = "reserve"

    # -- opening, repairing, rotating --------------------------------------
    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = self._cut_torn_tail(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        # age counts from the file's first event (its creation), not from this process
        self._opened_at = os.fstat(fd).st_mtime if size else time.time()

    def _cut_torn_tail(self, fd: int) -> int:
        """Truncate an incomplete last line (a crash mid-write); the size after."""
        size = os.fstat(fd).st_size
        if not size:
            return 0
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return size
            end = size
            cut = 0
            while end > 0:  # find the last newline, a block at a time from the end
                start = max(0, end - 65536)
                f.seek(start)
                block = f.read(end - start)
                i = block.rfind(b"\n")
                if i >= 0:
                    cut = start + i + 1
                    break
                end = start
            f.seek(cut)
            torn = f.read(size - cut)
        os.ftruncate(fd, cut)
        log.warning("audit file %s ended with an incomplete line (%d bytes, a crash mid-write); cut off",
                    self.path, len(torn))
        self.notices.append({
            "type": "audit", "event": "repaired", "path": str(self.path), "removed_bytes": len(torn),
            "removed_sha256": hashlib.sha256(torn).hexdigest(),
            "reason": "an incomplete last line (a crash or failed write) was cut off the audit file",
        })
        return cut

    def rotated_files(self) -> list[Path]:
        return rotated_files(self.path)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        now = time.time()  # one clock read: names must sort in rotation order
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int((now % 1) * 1_000_000):06d}"
        target = self.path.with_name(f"{self.path.stem}-{stamp}Z{self.path.suffix}")
        os.replace(self.path, target)
        self._open()
        if self.keep > 0:
            for old in self.rotated_files()[: -self.keep]:
                try:
                    old.unlink()
                except OSError as e:
                    log.warning("could not remove rotated audit file %s: %s", old, e)

    # -- writing -------------------------------------------------------------
    def submit(self, line: bytes, event: dict[str, Any]) -> bool:
        self.stats["submitted"] += 1
        if self._closed:
            self.stats["dropped"] += 1  # after shutdown closed the file (counted, never written elsewhere)
            return False
        gap = is_gap_marker(event)
        if self.missing is not None and not gap:
            return self._skip(event, None)  # the file must say what it lacks before it goes on
        if self._mode == "broken" or (self._mode == "reserve" and not must_land(event) and not gap):
            return self._skip(event, None)
        if self._mode == "trial" and not gap:
            return self._skip(event, None)
        error = self._write(line)
        if error is not None:
            self.stats["failed"] += 1
            self._skip(event, error, counted=False)
            return False
        self.stats["sent"] += 1
        if gap:
            self.missing = None
            if self._mode == "trial":
                self._mode = "ok"
                self._probe_delay = 0.0
                log.warning("audit file %s is written again; the events it lacks are declared in a gap marker",
                            self.path)
        if (self.max_bytes and self._size >= self.max_bytes) or (
            self.max_age_seconds and time.time() - self._opened_at >= self.max_age_seconds
        ):
            try:
                self._rotate()
            except OSError as e:  # the event is written; the next write reopens (and reports)
                log.error("audit file %s could not be rotated: %s", self.path, e)
                self._fd = None
        return True

    def _write(self, line: bytes) -> str | None:
        """Append one complete line, or nothing; the reason when it failed."""
        for attempt in (1, 2):
            start = self._size
            written = 0
            try:
                if self._fd is None:
                    self._open()
                    start = self._size
                assert self._fd is not None
                written = os.write(self._fd, line)
                if written == len(line):
                    if self.fsync:
                        os.fsync(self._fd)
                    self._size += written
                    return None
                err: OSError = OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            except OSError as e:
                err = e
            # nothing of a failed event stays in the file: cut back to the last complete line
            self._truncate_to(start)
            if attempt == 1 and err.errno in _NO_SPACE and self.reserve.release():
                log.error("audit file %s: the disk is full; released the %d-byte reserve so events of requests "
                          "already forwarded are written; write requests are refused until space returns",
                          self.path, self.reserve.size)
                self._mode = "reserve"
                continue
            self._fail(err)
            return f"{err.strerror or err}" if isinstance(err, OSError) else str(err)
        return "unreachable"  # pragma: no cover

    def _truncate_to(self, size: int) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
        except OSError as e:
            # cannot cut it back: drop the descriptor; reopening cuts the torn tail
            log.error("audit file %s: cannot truncate a failed write (%s); reopening", self.path, e)
            self._close_fd()

    def _fail(self, err: OSError) -> None:
        if self._mode != "broken":
            log.error("audit file %s cannot be written: %s; write requests are refused until it can", self.path, err)
        self._mode = "broken"
        self._next_probe = time.monotonic() + self._probe_delay  # the first probe at once, then backing off
        self._close_fd()

    def _close_fd(self) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
        except OSError:
            pass
        self._fd = None

    def _skip(self, event: dict[str, Any], error: str | None, counted: bool = True) -> bool:
        if counted:
            self.stats["skipped"] += 1
        if self.missing is None:
            seq = event.get("metadata", {}).get("sequence")
            seq = seq if isinstance(seq, int) else 0
            reason = f"the audit file could not be written ({error})" if error else (
                "the disk was full (only events of forwarded requests and state changes were written)"
                if self._mode == "reserve" else "the audit file could not be written")
            self.missing = Missing(seq, seq, reason)
        self.missing.add(event)
        return False

    # -- health and recovery -----------------------------------------------
    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _space_ok(self) -> bool:
        if not self.min_free_bytes:
            return True
        now = time.monotonic()
        if now - self._space_checked >= _SPACE_CHECK_SECONDS:
            self._space_checked = now
            free = self._free_bytes()
            low = free is not None and free < self.min_free_bytes
            if low != self._space_low:
                if low:
                    log.error("audit file system %s has %d bytes free, below audit.file.min_free_bytes (%d): "
                              "write requests are refused", self.path.parent, free, self.min_free_bytes)
                else:
                    log.warning("audit file system %s has room again (%d bytes free)", self.path.parent, free)
            self._space_low = low
        return not self._space_low

    def _probe(self) -> None:
        """Try to get back to normal (rate-limited): room for the reserve, the file open."""
        now = time.monotonic()
        if now < self._next_probe or self._mode == "trial":
            return
        if self._mode == "broken":
            self._probe_delay = min(_PROBE_MAX, max(_PROBE_MIN, self._probe_delay * 2))
            self._next_probe = now + self._probe_delay
        else:  # reserve mode: only a statvfs, cheap
            self._next_probe = now + _SPACE_CHECK_SECONDS
        free = self._free_bytes()
        if free is not None and free < self.min_free_bytes + max(self.reserve.size, 0):
            return
        if not self.reserve.ensure():
            return
        if self._fd is None:
            try:
                self._open()
            except OSError:
                return
        if self._mode == "broken" and self.missing is not None:
            self._mode = "trial"  # healthy only once the gap marker has been written
            return
        log.warning("audit file %s is writable again", self.path)
        self._mode = "ok"
        self._probe_delay = 0.0

    def probe_now(self) -> None:
        """At shutdown: try the file once more, whatever the backoff says."""
        self._next_probe = 0.0

    def ready_for_gap(self, event: dict[str, Any] | None) -> bool:
        """Events are missing and the file can take a gap marker before `event` (None: now)."""
        if self.missing is None or self._closed:
            return False
        if self._mode != "ok":
            self._probe()
        if self._mode == "broken":
            return False
        return self._mode in ("ok", "trial") or must_land(event)

    def gap_record(self, last_sequence: int) -> dict[str, Any]:
        m = self.missing
        assert m is not None
        return {
            "type": "audit", "event": "gap", "path": str(self.path), "from": m.first, "to": last_sequence,
            "count": last_sequence - m.first + 1, "decisions": dict(m.decisions), "reason": m.reason,
        }

    @property
    def healthy(self) -> bool:
        if self._mode != "ok":
            self._probe()
            if self._mode == "trial" and self.on_trial is not None:
                self.on_trial()  # writes the gap marker: ok if it lands, broken again if not
        return self._mode == "ok" and self._space_ok()

    @property
    def why_unhealthy(self) -> str:
        if self._mode == "reserve":
            return "is on a full disk"
        if self._mode in ("broken", "trial"):
            return "cannot be written"
        return f"has less than {self.min_free_bytes} bytes of free disk space"

    async def wait_for_capacity(self, timeout: float) -> bool:
        """A file has no queue: `block` waits (bounded) for it to be writable again."""
        deadline = time.monotonic() + timeout
        while not self.healthy:
            if self._closed or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def close(self, drain_seconds: float = 5.0) -> None:
        self._closed = True
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            self._close_fd()
