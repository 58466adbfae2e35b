"""The hash chain that makes the audit trail tamper-evident, and its verifier.

Every event carries `metadata.sequence` (1, 2, 3, ...) and
`unmapped.chain = {"prev": <hash of the previous event>, "hash": <this event's hash>}`.
The hash is SHA-256 over the event's canonical JSON (sorted keys, no
whitespace, UTF-8) with `unmapped.chain.hash` left out. The first event of a
chain has `prev` = 64 zeros.

Changing an event breaks its hash; deleting one breaks the next event's
`prev` and leaves a gap in `sequence`; reordering breaks both. What the chain
cannot show on its own: the newest events being cut off the end (compare the
last sequence with what your SIEM received, or anchor the last hash elsewhere).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

GENESIS = "0" * 64


def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(event: dict[str, Any]) -> str:
    chain = event.get("unmapped", {}).get("chain", {})
    saved = chain.pop("hash", None)
    try:
        return hashlib.sha256(canonical(event)).hexdigest()
    finally:
        if saved is not None:
            chain["hash"] = saved


class Chain:
    """Links events as they are written (one chain per writer process)."""

    def __init__(self, seq: int = 0, prev: str = GENESIS) -> None:
        self.seq = seq
        self.prev = prev

    def link(self, event: dict[str, Any]) -> bytes:
        """Stamp `event` with its sequence and hashes; its serialised line (newline-terminated)."""
        self.seq += 1
        event.setdefault("metadata", {})["sequence"] = self.seq
        event.setdefault("unmapped", {})["chain"] = {"prev": self.prev}
        digest = hashlib.sha256(canonical(event)).hexdigest()
        event["unmapped"]["chain"]["hash"] = digest
        self.prev = digest
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    @classmethod
    def resume_from(cls, path: Path) -> "Chain":
        """Continue the chain after the last complete event in `path` (if any)."""
        last = _last_event(path)
        if last is None:
            return cls()
        try:
            return cls(int(last["metadata"]["sequence"]), str(last["unmapped"]["chain"]["hash"]))
        except (KeyError, TypeError, ValueError):
            return cls()


def _last_event(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            block = min(size, 1 << 20)
            f.seek(size - block)
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a torn last line (crash mid-write): continue after the last complete one
        if isinstance(ev, dict) and "metadata" in ev:
            return ev
    return None


@dataclass
class Problem:
    file: str
    line: int
    sequence: int | None
    what: str

    def __str__(self) -> str:
        seq = f" (sequence {self.sequence})" if self.sequence is not None else ""
        return f"{self.file}:{self.line}{seq}: {self.what}"


@dataclass
class VerifyReport:
    events: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None
    last_hash: str | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(files: Iterable[Path]) -> VerifyReport:
    """Check one chain spread over `files` (oldest first: rotated files, then the current one)."""
    report = VerifyReport()
    prev_hash: str | None = None
    prev_seq: int | None = None
    for path in files:
        try:
            f = open(path, "rb")
        except OSError as e:
            report.problems.append(Problem(str(path), 0, None, f"cannot read: {e}"))
            continue
        with f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    ev = json.loads(raw)
                    seq = int(ev["metadata"]["sequence"])
                    chain = ev["unmapped"]["chain"]
                    claimed, prev = str(chain["hash"]), str(chain["prev"])
                except (ValueError, KeyError, TypeError):
                    report.problems.append(Problem(str(path), lineno, None, "not a chained audit event (unreadable or torn line)"))
                    continue
                report.events += 1
                actual = event_hash(ev)
                if actual != claimed:
                    report.problems.append(Problem(str(path), lineno, seq, "modified: the content does not match its hash"))
                if prev_seq is None:
                    report.first_sequence = seq
                    if seq != 1 or prev != GENESIS:
                        report.notes.append(
                            f"the chain starts at sequence {seq} in {path}: earlier events (older files) were not given"
                        )
                else:
                    if seq == prev_seq + 1:
                        if prev != prev_hash:
                            report.problems.append(Problem(str(path), lineno, seq, "does not link to the event before it (replaced or reordered)"))
                    elif seq > prev_seq + 1:
                        n = seq - prev_seq - 1
                        report.problems.append(
                            Problem(str(path), lineno, seq, f"{n} event(s) missing before this one (sequence {prev_seq + 1}..{seq - 1}: deleted)")
                        )
                    elif seq == 1 and prev == GENESIS:
                        report.notes.append(f"{path}:{lineno}: a new chain starts (the writer started without its previous file)")
                    else:
                        report.problems.append(
                            Problem(str(path), lineno, seq, f"out of order: sequence {seq} after {prev_seq} (reordered or duplicated)")
                        )
                prev_seq, prev_hash = seq, claimed
    report.last_sequence, report.last_hash = prev_seq, prev_hash
    return report
