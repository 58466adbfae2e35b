"""The hash chain that makes the audit trail tamper-evident, and its verifier.

Every event carries `metadata.sequence` (1, 2, 3, ...) and
`unmapped.chain = {"alg", ["kid",] "prev", "hash"}`:

- `alg` `hmac-sha256` (the default): `hash` is HMAC-SHA256 under the chain key
  (proxy/audit/keys.py) named by `kid`, over the event's canonical JSON (sorted
  keys, no whitespace, UTF-8) with `unmapped.chain.hash` left out. Without the
  key nobody can produce a matching hash, so rewriting events and recomputing
  the chain is detected.
- `alg` `sha256` (or no `alg`: trails written before keying existed): plain
  SHA-256 over the same bytes. It shows accidental damage and careless edits,
  not a rewrite by someone who recomputes the hashes.

`prev` is the previous event's `hash` (64 zeros for the first event).

Changing an event breaks its hash; deleting one breaks the next event's
`prev` and leaves a gap in `sequence`; reordering breaks both. Two events
explain a break instead of hiding it, and both are covered by the key:
- a *gap marker* (`unmapped.proctor.record` `audit`, `event` `gap`): the writer
  could not put events `from`..`to` into this file (disk full) and says so;
- a *restart* (`unmapped.chain.restart`): a new chain (sequence 1) that the
  writer started on purpose because it could not continue the old one.
Any other break is reported as tampering. What the chain cannot show on its
own: the newest events being cut off the end (anchor the last hash elsewhere).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .keys import ChainKey

GENESIS = "0" * 64
ALG_PLAIN = "sha256"
ALG_HMAC = "hmac-sha256"


def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _without_hash(event: dict[str, Any]) -> bytes:
    chain = event.get("unmapped", {}).get("chain", {})
    saved = chain.pop("hash", None)
    try:
        return canonical(event)
    finally:
        if saved is not None:
            chain["hash"] = saved


def event_hash(event: dict[str, Any]) -> str:
    """The plain SHA-256 of an event (what an unkeyed chain stores in `hash`)."""
    return hashlib.sha256(_without_hash(event)).hexdigest()


class Chain:
    """Links events as they are written (one chain per writer process)."""

    def __init__(self, seq: int = 0, prev: str = GENESIS, key: ChainKey | None = None) -> None:
        self.seq = seq
        self.prev = prev
        self.key = key
        self._head = {"alg": ALG_HMAC, "kid": key.kid} if key is not None else {"alg": ALG_PLAIN}
        # Stamped into the next event: why this writer starts a new chain (verify accepts
        # a chain restarting mid-trail only with this, and only authenticated).
        self.restart: dict[str, Any] | None = None

    def link(self, event: dict[str, Any]) -> bytes:
        """Stamp `event` with its sequence and hashes; its serialised line (newline-terminated)."""
        seq = self.seq + 1
        event.setdefault("metadata", {})["sequence"] = seq
        chain: dict[str, Any] = {**self._head, "prev": self.prev}
        if self.restart is not None:
            chain["restart"] = self.restart
        event.setdefault("unmapped", {})["chain"] = chain
        data = canonical(event)
        digest = self.key.mac(data) if self.key is not None else hashlib.sha256(data).hexdigest()
        chain["hash"] = digest
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        # only an event that could be serialised takes its number: no silent hole in the sequence
        self.seq, self.prev, self.restart = seq, digest, None
        return line

    @classmethod
    def resume(cls, candidates: Iterable[Path], key: ChainKey | None = None) -> "Chain":
        """Continue after the last readable event of the newest file that has one.

        `candidates` newest first (the current file, then rotated ones). A file that
        has content but no readable event cannot be continued: the new chain is marked
        as a restart, so `verify` knows the break was the writer's, not an intruder's.
        """
        for path in candidates:
            last, has_content = _last_event(path)
            if last is not None:
                try:
                    return cls(int(last["metadata"]["sequence"]), str(last["unmapped"]["chain"]["hash"]), key)
                except (KeyError, TypeError, ValueError):
                    pass
            if has_content:
                chain = cls(key=key)
                chain.restart = {"reason": f"no readable event at the end of {path.name}: a new chain starts"}
                return chain
        return cls(key=key)

    @classmethod
    def resume_from(cls, path: Path, key: ChainKey | None = None) -> "Chain":
        return cls.resume([path], key)


def _last_event(path: Path) -> tuple[dict | None, bool]:
    """(the last parseable event in the file's final MiB, whether the file has content)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            block = min(size, 1 << 20)
            f.seek(size - block)
            tail = f.read()
    except OSError:
        return None, False
    for line in reversed(tail.splitlines()):
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a damaged line: continue after the last complete one
        if isinstance(ev, dict) and "metadata" in ev:
            return ev, True
    return None, bool(tail.strip())


# ---------------------------------------------------------------------------- verify
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
    keyed: int = 0  # events with an HMAC that was checked
    unkeyed: int = 0  # events with a plain SHA-256 hash
    unverified: int = 0  # keyed events whose key was not given (content not checked)
    missing_kids: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unverified

    @property
    def needs_key(self) -> bool:
        return self.unverified > 0


def _gap_declared(ev: dict, first: int, last: int) -> dict | None:
    p = ev.get("unmapped", {}).get("proctor", {})
    if p.get("record") == "audit" and p.get("event") == "gap" and p.get("from") == first and p.get("to") == last:
        return p
    return None


def verify(files: Iterable[Path], keys: Sequence[ChainKey] = (), allow_unkeyed: bool = False) -> VerifyReport:
    """Check one chain spread over `files` (oldest first: rotated files, then the current one).

    With `keys`, every keyed event is authenticated and plain SHA-256 events are
    problems (an intruder's downgrade), except, with `allow_unkeyed`, those that
    come before the first keyed event (a trail written before keying was on).
    """
    report = VerifyReport()
    by_kid = {k.kid: k for k in keys}
    expect_keyed = bool(keys)
    prev_hash: str | None = None
    prev_seq: int | None = None
    keyed_seen = False
    downgrade: Problem | None = None  # the open run of unkeyed events in a keyed chain
    downgrade_n = 0
    unknown_key: list[tuple[str, int, int, str]] = []  # keyed events whose key was not given

    def close_downgrade() -> None:
        nonlocal downgrade, downgrade_n
        if downgrade is not None and downgrade_n > 1:
            downgrade.what += f" ({downgrade_n} events from here)"
        downgrade, downgrade_n = None, 0

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
                    alg = str(chain.get("alg") or ALG_PLAIN)
                except (ValueError, KeyError, TypeError, AttributeError):
                    report.problems.append(Problem(str(path), lineno, None, "not a chained audit event (unreadable or torn line)"))
                    continue
                report.events += 1
                where = (str(path), lineno, seq)
                authentic = True
                if alg == ALG_HMAC:
                    keyed_seen = True
                    close_downgrade()
                    key = by_kid.get(str(chain.get("kid")))
                    if key is None:
                        report.unverified += 1
                        report.missing_kids.add(str(chain.get("kid")))
                        unknown_key.append((*where, str(chain.get("kid"))))
                        # content unchecked; markers are taken at their word for the structural
                        # report, which cannot pass anyway (`ok` needs every event authenticated)
                    elif key.mac(_without_hash(ev)) != claimed:
                        report.problems.append(Problem(*where, "modified: the content does not match its HMAC"))
                        authentic = False
                    else:
                        report.keyed += 1
                elif alg == ALG_PLAIN:
                    report.unkeyed += 1
                    if event_hash(ev) != claimed:
                        report.problems.append(Problem(*where, "modified: the content does not match its hash"))
                        authentic = False
                    elif keyed_seen or (expect_keyed and not allow_unkeyed):
                        authentic = False
                        if downgrade is None:
                            why = ("after keyed events" if keyed_seen else "while a key was given")
                            downgrade = Problem(*where, f"not keyed (plain SHA-256) {why}: rewritten events "
                                                        "with recomputed hashes look like this")
                            report.problems.append(downgrade)
                        downgrade_n += 1
                else:
                    report.problems.append(Problem(*where, f"unknown chain algorithm {alg!r}"))
                    authentic = False

                if prev_seq is None:
                    report.first_sequence = seq
                    if seq != 1 or prev != GENESIS:
                        report.notes.append(
                            f"the chain starts at sequence {seq} in {path}: earlier events (older files) were not given"
                        )
                elif seq == prev_seq + 1:
                    if prev != prev_hash:
                        report.problems.append(Problem(*where, "does not link to the event before it (replaced or reordered)"))
                elif seq == 1 and prev == GENESIS:
                    restart = chain.get("restart")
                    if authentic and isinstance(restart, dict):
                        report.notes.append(f"{path}:{lineno}: the writer started a new chain: {restart.get('reason')}")
                    else:
                        report.problems.append(Problem(
                            *where, "the chain restarts here (sequence 1) without a restart marker from the writer: "
                                    "the events before it may have been replaced"))
                elif seq > prev_seq + 1:
                    gap = _gap_declared(ev, prev_seq + 1, seq - 1) if authentic else None
                    if gap is not None:
                        report.notes.append(
                            f"{path}:{lineno}: {gap.get('count', seq - prev_seq - 1)} event(s) (sequence "
                            f"{prev_seq + 1}..{seq - 1}) were not written to this file, declared by the writer: "
                            f"{gap.get('reason', '')}" + (f" (by decision: {gap['decisions']})" if gap.get("decisions") else "")
                        )
                    else:
                        n = seq - prev_seq - 1
                        report.problems.append(
                            Problem(*where, f"{n} event(s) missing before this one (sequence {prev_seq + 1}..{seq - 1}: deleted)")
                        )
                else:
                    report.problems.append(
                        Problem(*where, f"out of order: sequence {seq} after {prev_seq} (reordered or duplicated)")
                    )
                prev_seq, prev_hash = seq, claimed
    close_downgrade()
    report.last_sequence, report.last_hash = prev_seq, prev_hash
    if unknown_key and report.keyed:
        # the right key was given (other events verify under it): an event under another key
        # was re-signed by someone else, or written under an older key that was not given
        for file, line, seq, kid in unknown_key:
            report.problems.append(Problem(file, line, seq, f"signed with a key that was not given (key id {kid}): "
                                                            "re-signed by someone else, or an older key (give it too)"))
        report.unverified = 0
        report.missing_kids.clear()
    if report.unkeyed and not keyed_seen and not expect_keyed:
        report.notes.append(
            "the chain is not keyed (plain SHA-256): it shows damage, but whoever can write the file can rewrite "
            "events and recompute every hash undetected"
        )
    elif expect_keyed and allow_unkeyed and report.unkeyed and not keyed_seen:
        # --allow-unkeyed accepts unkeyed events *before* the first keyed one: a trail with
        # none keyed at all, verified with a key, is what a rewrite with plain hashes looks like
        report.problems.append(Problem(
            "(whole trail)", 0, None, "no event is keyed although a key was given: a trail rewritten with plain SHA-256 "
                         "hashes looks like this (verify a trail from before keying without a key)"))
    elif report.unkeyed and allow_unkeyed and not any("not keyed" in p.what for p in report.problems):
        report.notes.append(f"{report.unkeyed} event(s) before the first keyed one are not keyed (accepted: --allow-unkeyed)")
    return report
