"""Never start on, or keep using, a store that is not the one Proctor's state lives in.

An empty store is not harmless: it has no suspensions (every suspended agent
is let back in) and no approvals. So:

- **At startup** `open_verified` compares the store's id with the marker file
  `<state_dir>/store-id`, written the first time a store was created. If the
  marker names a store and the one configured is missing, empty or another
  one, Proctor refuses to start instead of creating a fresh store. Deleting the
  marker is the deliberate way to accept a new, empty store.
- **While running** `watch_store` checks the store once a second
  (`Store.check`): a SQLite file deleted or replaced, a PostgreSQL schema
  dropped or swapped, marks it lost (requests fail closed, `/readyz` 503); an
  unreachable store marks it down until it answers again. Each check returns
  within its deadline even on a network that drops packets (Store.check), and
  a store without a good check for `store.staleness_seconds` counts as down
  whatever the checks are doing (Store.stale; docs/governance.md "Partitions").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .base import Store, StoreError, StoreLostError

log = logging.getLogger("proctor.store")

MARKER_NAME = "store-id"
CHECK_INTERVAL_SECONDS = 1.0


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True)
class Marker:
    store_id: str
    created_at: float
    location: str  # where that store was (for the message only)


def read_marker(path: Path) -> Marker | None:
    """The marker, or None if there is none. StoreError if it exists but cannot be read."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read the store marker {path}: {e}") from None
    try:
        data = json.loads(raw)
        return Marker(str(data["store_id"]), float(data["created_at"]), str(data.get("location", "")))
    except (ValueError, KeyError, TypeError):
        raise StoreError(
            f"the store marker {path} is not readable (not a JSON object with store_id and created_at); "
            "restore it, or delete it to accept the configured store as it is"
        ) from None


def write_marker(path: Path, marker: Marker) -> None:
    """Atomically (temporary file, fsync, rename) and private to this user."""
    body = json.dumps(
        {"store_id": marker.store_id, "created_at": marker.created_at, "location": marker.location}, indent=2
    ).encode() + b"\n"
    # a unique name: two containers sharing a state_dir are both pid 1
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            if os.write(fd, body) != len(body):
                raise OSError(f"short write to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _refusal(problem: str, marker: Marker, marker_path: Path, store: Store) -> str:
    was = f" at {marker.location}" if marker.location and marker.location != store.location else ""
    return (
        f"refusing to start: {problem}.\n"
        f"  This state directory last used store {marker.store_id}{was}, created {iso(marker.created_at)} "
        f"(recorded in {marker_path}).\n"
        "  Starting on an empty or different store would lift every suspension and forget every approval.\n"
        "  Restore that store (or point store.url at it) and start again; to start deliberately with the "
        f"configured store as it is, delete {marker_path} first."
    )


async def open_verified(store: Store, marker_path: Path) -> None:
    """Open `store`, refusing a store that is not the one `marker_path` remembers.

    Raises StoreLostError (with the whole explanation) when the marker names a
    store and the configured one is missing, empty or another one; StoreError
    when the store cannot be opened at all."""
    if not store.persistent:  # nothing to remember across restarts
        await store.open()
        return
    marker = read_marker(marker_path)
    try:
        await store.open(create=marker is None)
    except StoreLostError as e:
        assert marker is not None
        raise StoreLostError(_refusal(str(e), marker, marker_path, store)) from None
    identity = store.identity
    assert identity is not None
    if marker is None:
        try:
            write_marker(marker_path, Marker(identity.store_id, identity.created_at, store.location))
        except OSError as e:
            await store.close()
            raise StoreError(f"cannot write the store marker {marker_path}: {e}") from None
        log.info("state store %s has id %s (remembered in %s)", store.location, identity.store_id, marker_path)
        return
    if identity.store_id != marker.store_id:
        await store.close()
        problem = (
            f"the state store {store.location} is store {identity.store_id}, created {iso(identity.created_at)}, "
            "not the one this state directory used"
        )
        raise StoreLostError(_refusal(problem, marker, marker_path, store))


async def watch_store(store: Store, interval: float = CHECK_INTERVAL_SECONDS) -> None:
    """Check the store every `interval` seconds for the life of the proxy (see Store.check)."""
    while store.lost is None:  # lost is final until a restart: nothing more to learn
        await asyncio.sleep(interval)
        await store.check()
