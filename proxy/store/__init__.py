"""Durable state: approvals, the agent registry and kill switch, resource creators
and policy revisions.

State that must survive a restart or be shared by replicas lives behind one
`Store` interface: SQLite is the embedded default, PostgreSQL the scale-out
backend. Pick one with `open_store(url)`:

    sqlite:///var/lib/proctor/state.db     (absolute path)
    sqlite:///:memory:                     (tests; gone on close)
    postgresql://user@host:5432/db         (also postgres://; optional
                                            ?schema=NAME&connect_timeout=SECONDS)

Every backend failure raises `StoreError`; callers fail closed on it.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from .base import Store, StoreError
from .models import (
    APPROVAL_STATES,
    OPEN_APPROVAL_STATES,
    SUSPENSION_KINDS,
    VOTE_DECISIONS,
    AgentRecord,
    Approval,
    PolicyRevision,
    ReplicaBeat,
    Suspension,
    Vote,
)

__all__ = [
    "APPROVAL_STATES",
    "OPEN_APPROVAL_STATES",
    "SUSPENSION_KINDS",
    "VOTE_DECISIONS",
    "AgentRecord",
    "Approval",
    "PolicyRevision",
    "ReplicaBeat",
    "Store",
    "StoreError",
    "Suspension",
    "Vote",
    "open_store",
]

_USAGE = "expected sqlite:///ABSOLUTE/PATH.db, sqlite:///:memory: or postgresql://USER@HOST:PORT/DATABASE"


def open_store(url: str, *, staleness_seconds: float | None = None, command_timeout: float | None = None,
               connect_timeout: float | None = None) -> Store:
    """The store for `url`, not yet opened (`await store.open()`). ValueError on a bad URL.

    The timeouts apply to PostgreSQL (None: the backend's defaults); `staleness_seconds`
    to every backend (Store.stale)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty state store URL: {_USAGE}")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc or parts.query or parts.fragment or not url[len("sqlite:") :].startswith("//"):
            raise ValueError(f"bad SQLite state store URL {url!r}: {_USAGE}")
        path = unquote(parts.path)
        if path == "/:memory:":
            path = ":memory:"
        elif path in ("", "/") or path.endswith("/"):
            raise ValueError(f"SQLite state store URL {url!r} names no file: {_USAGE}")
        from .sqlite import SQLiteStore

        lite = SQLiteStore(path)
        if staleness_seconds is not None:
            lite.staleness_seconds = staleness_seconds
        return lite
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        pg = PostgresStore(url, staleness_seconds=staleness_seconds, connect_timeout=connect_timeout)
        if command_timeout is not None:
            pg.command_timeout = command_timeout
        return pg
    # Never echo the URL itself here: it may carry a password.
    shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"
    raise ValueError(f"unsupported state store URL ({shown}): {_USAGE}")
