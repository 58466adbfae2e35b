"""Control API route for the activity view: the newest audit-trail events.

`GET /v1/activity?limit=100&agent=&action=&decision=&record=&before_sequence=` answers
the newest OCSF events of the audit file (`audit.file`, proxy/audit/) that
match the filters, newest first, as flat summaries:

    {"events": [{"sequence": 812, "time": "...Z", "agent": "...", ...}, ...],
     "next_before_sequence": 713 | null}

Pass `next_before_sequence` back as `before_sequence` for the page before
(null: nothing older). Filters (all optional, combined with AND):

- `agent`: the agent the event is about: the acting agent of a decision, the
  agent of an approval, the target of an agent suspension;
- `action`: `api.operation` or the action an approval is for; exact, or a
  prefix when it ends with `*` (`erp.*`);
- `decision`: comma-separated; `allow` / `deny` / `hold` match decisions,
  anything else a state change (`requested`, `approved`, `suspended`, ...);
- `record`: comma-separated among `decision`, `approval`, `suspension`, `policy`,
  `claim` and `duplicate` (a write not forwarded because it repeated earlier work:
  the console's Duplicates view asks for `record=duplicate`).

The file is read from its end in blocks, never whole: a page costs the bytes
back to its oldest match (bounded by SCAN_BUDGET per request; when the budget
runs out the answer is a short page with `next_before_sequence` set, so the
caller simply asks again). With `before_sequence` the starting point is found
by binary search on the (ascending) sequence numbers. Rotated files are read
after the current one, newest first.

Fleet (docs/governance.md, "Fleet views"): with `scope=fleet` (the default) and other live
replicas in the store, each one is asked for the same page with the caller's token
(control/fleet_views.py) and the pages are merged by time, newest first; each row names its
`replica`. Sequences are per replica, so fleet pages go on with `cursor` (the answer's
`next_cursor`: each replica's position); a replica that did not answer makes the page
`incomplete` and is named under `missing`. `before_sequence` pages this replica's own file
(as does `scope=replica`, which the fan-out's own calls use).

Authentication: any valid approver-audience token (approvers and operators).
Audit disabled, or no file yet: `{"events": [], "audit": "disabled"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Iterator

from aiohttp import web

from ..audit.activity import summarize  # one event -> one row, from its typed record
from .auth import bearer, control_auth, problem
from .fleet_views import FleetViews, Peer, decode_cursor, encode_cursor, merge_pages
from .models import ActivityQuery, read_query

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")

BLOCK = 64 * 1024
SCAN_BUDGET = 32 * 1024 * 1024  # bytes of events read per request (the binary search is extra, and tiny)
MAX_LINE = 4 * 1024 * 1024  # a longer "line" is not an event (the reader drops it rather than grow without end)


# ----------------------------------------------------------------------------- reading
def _seq_of(line: bytes) -> int | None:
    try:
        ev = json.loads(line)
        return int(ev["metadata"]["sequence"])
    except (ValueError, KeyError, TypeError):
        return None


def _end_before(f, size: int, before: int) -> int:
    """A line start E such that every line starting at or after E has sequence >= before
    (the scan backwards from E then sees only older lines, plus a few it skips)."""
    lo, hi = 0, size
    while hi - lo > BLOCK:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline(MAX_LINE)  # the rest of the line mid falls into
        start = f.tell()
        if start >= hi:
            break
        line = f.readline(MAX_LINE)
        seq = _seq_of(line)
        if seq is None:
            break  # a damaged line: scan from hi, skipping
        if seq >= before:
            hi = start
        else:
            lo = start + len(line)
    return hi


def _lines_backwards(f, end: int, budget: list[int]) -> Iterator[bytes]:
    """Complete lines of f[0:end], last first. Stops when the byte budget is spent."""
    pos = end
    carry = b""
    while pos > 0:
        if budget[0] <= 0:
            return
        n = min(BLOCK, pos)
        pos -= n
        f.seek(pos)
        chunk = f.read(n)
        budget[0] -= n
        data = chunk + carry
        parts = data.split(b"\n")
        carry = parts[0]
        for line in reversed(parts[1:]):
            if line:
                yield line
        if len(carry) > MAX_LINE:
            carry = b""  # not an event; resynchronise at the next newline
    if carry:
        yield carry


def audit_files(path: Path) -> list[Path]:
    """The current audit file, then the rotated ones (`<stem>-<UTC time><suffix>`), newest first."""
    rotated = sorted(path.parent.glob(f"{path.stem}-*{path.suffix}"), reverse=True)
    return [p for p in [path, *rotated] if p.is_file()]


class Filters:
    def __init__(self, agent: str | None, action: str | None, decisions: Sequence[str],
                 records: Sequence[str] | None = None) -> None:
        self.agent = agent
        self.records = set(records or [])
        self.action_prefix = action[:-1] if action and action.endswith("*") else None
        self.action = None if self.action_prefix is not None else action
        self.decisions = set(decisions)
        # cheap byte tests before parsing: a matching line must contain these
        needles = []
        if agent:
            needles.append(json.dumps(agent, ensure_ascii=False).encode())
        if self.action:
            needles.append(json.dumps(self.action, ensure_ascii=False).encode())
        elif self.action_prefix:
            needles.append(json.dumps(self.action_prefix, ensure_ascii=False)[:-1].encode())
        self.needles = needles

    def quick(self, line: bytes) -> bool:
        return all(n in line for n in self.needles)

    def match(self, s: dict[str, Any]) -> bool:
        if self.agent and s.get("agent") != self.agent:
            return False
        if self.action or self.action_prefix is not None:
            ops = [o for o in (s.get("operation"), s.get("action")) if isinstance(o, str)]
            if self.action and self.action not in ops:
                return False
            if self.action_prefix is not None and not any(o.startswith(self.action_prefix) for o in ops):
                return False
        if self.decisions and s.get("decision") not in self.decisions:
            return False
        if self.records and s.get("record") not in self.records:
            return False
        return True


def read_activity(path: Path, limit: int, filters: Filters, before: int | None) -> tuple[list[dict[str, Any]], int | None]:
    """The newest `limit` matching summaries (newest first), and where the next page starts."""
    found: list[dict[str, Any]] = []
    budget = [SCAN_BUDGET]
    lowest: int | None = None  # the oldest sequence looked at
    for file in audit_files(path):
        try:
            f = open(file, "rb")
        except OSError:
            continue
        with f:
            size = os.fstat(f.fileno()).st_size
            end = _end_before(f, size, before) if before is not None else size
            oldest_line = b""
            for line in _lines_backwards(f, end, budget):
                oldest_line = line
                if not filters.quick(line):
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # a line still being written, or damaged
                if not isinstance(ev, dict):
                    continue
                s = summarize(ev)
                seq = s.get("sequence")
                if not isinstance(seq, int) or (before is not None and seq >= before):
                    continue
                lowest = seq if lowest is None else min(lowest, seq)
                if filters.match(s):
                    found.append(s)
                    if len(found) >= limit:
                        return found, seq
            if budget[0] <= 0:
                # not the end of the trail: the caller goes on from where the scan stopped
                seq = _seq_of(oldest_line) if oldest_line else None
                if seq is not None and (lowest is None or seq < lowest):
                    lowest = seq
                return found, lowest if lowest is not None else before
    return found, None


# ----------------------------------------------------------------------------- route
def add_activity_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    cfg = runtime.config
    auth = control_auth(app, cfg)
    views = FleetViews(runtime)

    async def authenticated(request: web.Request) -> web.Response | None:
        who = await auth.person(request, "Approver")
        return who if isinstance(who, web.Response) else None

    def local_page(filters: Filters, limit: int, before: int | None) -> tuple[list[dict[str, Any]], int | None] | None:
        """This replica's page (None: no audit file to read)."""
        path = cfg.audit_path if cfg.audit.enabled else None
        if runtime.audit is None or path is None or not audit_files(path):
            return None
        return read_activity(path, limit, filters, before)

    async def activity(request: web.Request) -> web.Response:
        refused = await authenticated(request)
        if refused is not None:
            return refused
        q = read_query(request, ActivityQuery)  # limits, filters and record kinds: control/models.py
        if isinstance(q, web.Response):
            return q
        limit, before = q.limit, q.before_sequence
        decisions, records = q.decision or [], q.record or []
        agent, action = q.agent or None, q.action or None
        filters = Filters(agent, action, decisions, records)
        positions = None
        if q.cursor is not None:
            positions = decode_cursor(q.cursor)
            if positions is None:
                return problem(400, "Bad paging", "cursor: not a cursor this API gave (pass `next_cursor` back as is)")
        peers, missing = ([], []) if q.scope == "replica" or before is not None else await views.peers_or_missing()
        if positions is None and not peers and not missing:
            return await this_replica(filters, limit, before)
        return await fleet(request, q, filters, limit, positions, peers, missing)

    async def this_replica(filters: Filters, limit: int, before: int | None) -> web.Response:
        try:
            page = await asyncio.to_thread(local_page, filters, limit, before)
        except OSError as e:
            log.error("cannot read the audit file %s: %s", cfg.audit_path, e)
            return problem(503, "Audit trail unreadable", "the audit file cannot be read; see the proxy log")
        if page is None:
            return web.json_response({"events": [], "next_before_sequence": None, "audit": "disabled",
                                      "replica": views.replica_id})
        events, nxt = page
        return web.json_response({"events": events, "next_before_sequence": nxt, "limit": limit,
                                  "replica": views.replica_id})

    async def fleet(request: web.Request, q: ActivityQuery, filters: Filters, limit: int,
                    positions: dict[str, int | None] | None, peers: list[Peer],
                    missing: list[dict[str, str]]) -> web.Response:
        """Every live replica's newest matching events, merged by time (control/fleet_views.py)."""
        me = views.replica_id or "(this replica)"
        if positions is None:  # the first page: every replica from its newest event
            positions = {me: None, **{p.replica_id: None for p in peers}}
        asked = [p for p in peers if p.replica_id in positions]
        # a replica named in the cursor that the store no longer lists cannot be asked
        listed = {p.replica_id for p in peers} | {me}
        missing = missing + [{"replica": r, "error": "not listed as alive by the store"}
                             for r in positions if r not in listed]
        params = {k: v for k, v in request.query.items() if k in ("agent", "action", "decision", "record")}
        params["limit"] = str(limit)
        pages: dict[str, tuple[list[dict[str, Any]], int | None]] = {}
        token = bearer(request) or ""

        async def remote() -> None:
            calls = {}
            for p in asked:
                before = positions.get(p.replica_id)
                calls[p.replica_id] = {**params, **({"before_sequence": str(before)} if before is not None else {})}
            # (one call per replica: the peers' positions differ)
            done = await asyncio.gather(*(views.ask([p], "/v1/activity", calls[p.replica_id], token) for p in asked))
            for result in done:
                missing.extend(result.missing)
                for replica, (_, doc) in result.answers.items():
                    events = doc.get("events")
                    nxt = doc.get("next_before_sequence")
                    if isinstance(events, list):
                        pages[replica] = ([e for e in events if isinstance(e, dict)],
                                          nxt if isinstance(nxt, int) else None)

        async def local() -> None:
            if me not in positions:
                return
            try:
                page = await asyncio.to_thread(local_page, filters, limit, positions[me])
            except OSError as e:
                log.error("cannot read the audit file %s: %s", cfg.audit_path, e)
                missing.append({"replica": me, "error": "its audit file cannot be read; see its log"})
                return
            pages[me] = page if page is not None else ([], None)

        await asyncio.gather(local(), remote())
        events, following = merge_pages(pages, positions, limit)
        return web.json_response({
            "events": events, "next_before_sequence": None, "next_cursor": encode_cursor(following),
            "limit": limit, "replica": me, "replicas": sorted(pages), "incomplete": bool(missing),
            "missing": missing,
        })

    app.router.add_get("/v1/activity", activity)
