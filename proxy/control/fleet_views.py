"""Fleet views: reads that see the records of every replica (docs/governance.md, "Fleet views").

Each replica writes its own decision record and audit trail (a file, a chain of its
own). Rather than write every decision to the shared store as well (a store write per
request), a replica that answers a fleet read asks the others for their part at read
time (fan-out) and merges the answers:

- the replicas asked are the ones the store lists as alive (`proctor_replicas`, seen in
  the last three heartbeats), at the control URL each one reports in its heartbeat
  (`control.public_url`, else its concrete listen address; never a loopback guess);
- the call authenticates as the caller: the caller's own bearer token is forwarded, so a
  replica answers only what the caller may read there; nothing else is sent;
- only http(s) URLs from the store are called, redirects are never followed, each call has
  a short timeout, and an answer must name the replica that was asked;
- a replica that does not answer leaves the view partial, never hanging: the answer says
  `incomplete: true` and names it under `missing`.

Sub-requests carry `scope=replica`, so a replica asked never asks on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from ..store import StoreError

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")

CALL_TIMEOUT = 3.0  # seconds for one replica's whole answer
CONNECT_TIMEOUT = 1.0
MAX_ANSWER = 32 * 1024 * 1024  # bytes of one replica's answer (a page of at most 1000 activity rows)


@dataclass(frozen=True, slots=True)
class Peer:
    """Another live replica, as the store lists it."""

    replica_id: str
    control_url: str | None


@dataclass(slots=True)
class FanOut:
    """What the replicas asked answered: JSON documents by replica (200s, and the statuses the
    caller accepts, e.g. 404 for a lookup), and the replicas that could not be asked."""

    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    missing: list[dict[str, str]] = field(default_factory=list)


def usable_url(url: str | None) -> str | None:
    """The base URL to call, or None: only http(s) with a host, no credentials, query or fragment."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.query \
            or parts.fragment:
        return None
    return url.rstrip("/")


class FleetViews:
    """This replica's side of the fleet views."""

    def __init__(self, runtime: ProctorRuntime) -> None:
        self.runtime = runtime

    @property
    def replica_id(self) -> str | None:
        fleet = self.runtime.fleet
        return fleet.replica_id if fleet is not None else self.runtime.recorder.replica

    async def peers(self) -> list[Peer]:
        """The other replicas the store lists as alive (StoreError when it cannot say)."""
        fleet = self.runtime.fleet
        if fleet is None:
            return []
        beats = await self.runtime.store.list_replicas(seen_since=time.time() - 3 * fleet.heartbeat_seconds)
        return [Peer(b.replica_id, b.control_url) for b in beats if b.replica_id != fleet.replica_id]

    async def peers_or_missing(self) -> tuple[list[Peer], list[dict[str, str]]]:
        """The peers, or none and a `missing` entry saying the store could not list them."""
        try:
            return await self.peers(), []
        except StoreError as e:
            log.warning("fleet view: the store cannot list the replicas: %s", e)
            return [], [{"replica": "*", "error": "the store cannot list the replicas; only this replica answered"}]

    async def ask(self, peers: list[Peer], path: str, params: Mapping[str, str], token: str,
                  accept: tuple[int, ...] = (200,)) -> FanOut:
        """GET `path` on every peer at once (scope=replica), as the caller (its token)."""
        out = FanOut()
        if not peers:
            return out
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        query = {**params, "scope": "replica"}
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if self.replica_id:
            headers["X-Proctor-Fleet-Caller"] = self.replica_id  # (informational: who fanned out)
        # trust_env off: a proxy environment (HTTP_PROXY naming Proctor itself) never carries the token
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            results = await asyncio.gather(*(self._one(session, p, path, query, headers, accept) for p in peers))
        for peer, (status, doc, error) in zip(peers, results):
            if error is not None:
                out.missing.append({"replica": peer.replica_id, "error": error})
            else:
                assert doc is not None
                out.answers[peer.replica_id] = (status, doc)
        return out

    @staticmethod
    async def _one(session: aiohttp.ClientSession, peer: Peer, path: str, query: Mapping[str, str],
                   headers: Mapping[str, str], accept: tuple[int, ...]) -> tuple[int, dict[str, Any] | None, str | None]:
        base = usable_url(peer.control_url)
        if base is None:
            return 0, None, ("no usable control URL in its heartbeat (an http(s) URL: set control.public_url)"
                             if peer.control_url else "no control URL in its heartbeat (set control.public_url)")
        try:
            async with session.get(base + path, params=query, headers=headers, allow_redirects=False) as resp:
                if resp.status not in accept:
                    kind = "a redirect (not followed)" if 300 <= resp.status < 400 else "HTTP"
                    return 0, None, f"answered {kind} {resp.status}"
                raw = await resp.content.read(MAX_ANSWER + 1)
                if len(raw) > MAX_ANSWER:
                    return 0, None, f"answer larger than {MAX_ANSWER} bytes"
                doc = json.loads(raw)
        except asyncio.TimeoutError:
            return 0, None, f"no answer within {CALL_TIMEOUT:g} s"
        except (aiohttp.ClientError, OSError) as e:
            return 0, None, f"unreachable: {type(e).__name__}: {e}"[:300]
        except ValueError:
            return 0, None, "answered something that is not JSON"
        if not isinstance(doc, dict):
            return 0, None, "answered something that is not a JSON object"
        # a URL that leads to another replica (or back here) would show its records under the wrong name
        if resp.status == 200 and doc.get("replica") != peer.replica_id:
            return 0, None, f"answered as replica {str(doc.get('replica'))[:128]!r}"
        return resp.status, doc, None


# ----------------------------------------------------------------------------- activity
def encode_cursor(positions: Mapping[str, int | None]) -> str | None:
    """Fleet paging state: per replica still to read, the sequence to read before (None: from
    its newest event). A replica not in it has nothing older (or was not part of the view)."""
    if not positions:
        return None
    raw = json.dumps({"v": 1, "r": dict(positions)}, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, int | None] | None:
    """The positions of a cursor, or None when it is not one."""
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        return None
    positions = doc.get("r") if isinstance(doc, dict) and doc.get("v") == 1 else None
    if not isinstance(positions, dict):
        return None
    out: dict[str, int | None] = {}
    for replica, before in positions.items():
        if not isinstance(replica, str) or not (before is None or (isinstance(before, int) and before > 0)):
            return None
        out[replica] = before
    return out


def _newest_first(row: dict[str, Any]) -> tuple[str, str, int]:
    seq = row.get("sequence")
    return str(row.get("time") or ""), str(row.get("replica") or ""), seq if isinstance(seq, int) else 0


def merge_pages(pages: Mapping[str, tuple[list[dict[str, Any]], int | None]], positions: Mapping[str, int | None],
                limit: int) -> tuple[list[dict[str, Any]], dict[str, int | None]]:
    """Merge each replica's page (its rows newest first, and where its next page starts) by time,
    newest first; the `limit` newest rows, and each replica's position for the next page.

    A replica whose rows were all taken goes on from its own next page (none: it is done); one
    with rows left over goes on from just before the oldest row taken (from where it started
    when none was). A replica that did not answer keeps its position."""
    rows: list[tuple[dict[str, Any], str]] = []  # (row, the replica whose file it came from)
    for replica, (page, _) in pages.items():
        for row in page:
            row.setdefault("replica", replica)  # (events written before records named their replica)
            rows.append((row, replica))
    rows.sort(key=lambda ro: _newest_first(ro[0]), reverse=True)
    taken = rows[:limit]
    following: dict[str, int | None] = {r: b for r, b in positions.items() if r not in pages}
    for replica, (page, next_before) in pages.items():
        mine = [r["sequence"] for r, origin in taken if origin == replica and isinstance(r.get("sequence"), int)]
        if len(mine) == len(page):
            if next_before is not None:
                following[replica] = next_before
        elif mine:
            following[replica] = min(mine)
        else:
            following[replica] = positions.get(replica)
    return [r for r, _ in taken], following
