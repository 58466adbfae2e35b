"""One policy set for the fleet (docs/policies.md, "One policy set for the fleet").

Every replica shares the state store, and the store keeps the policy revisions and
marks one of them **active**. A replica runs in one of two modes
(`policies.source`):

- `directory` (the default): it loads `policies.dir`, reloads it when the files change,
  and publishes what it loads as the active revision: the designated writer (or the one
  replica of a single-replica deployment).
- `store`: it follows the active revision. At startup, and within one reload interval of
  a change (a `proctor policy push`, a rollback, a directory-mode replica's reload), it
  writes that revision's files into `state_dir/policies-active/<revision>/` and loads
  them, so every replica enforces the same set and a rollback on any replica rolls back
  all of them. `policies.dir` is only the seed used while the store has no revision yet.

A follower computes the revision of what it loaded itself (the hash covers the schema
generated from its connectors): when that differs from the revision it follows, its
connectors differ from the publisher's, and `/v1/policies` flags it. Connector manifests
are not distributed this way: they decide routing and credential injection too, so they
ship with the deployment (a ConfigMap) and the flag shows a replica whose manifests differ.

Each replica reports its revision to the store every `policies.heartbeat_seconds`
(`proctor_replicas`); `/v1/policies` lists the replicas seen in the last three intervals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..public_url import control_base_url
from ..store import PolicyRevision, ReplicaBeat, Store
from .engine import PolicyLoadError, PolicySource, PolicyStore, load_bundle

log = logging.getLogger("proctor.policy")

MATERIALIZED_DIR = "policies-active"
MAX_PUSH_BYTES = 8 * 1024 * 1024  # the files of one pushed revision, together
MAX_PUSH_FILES = 500
KEEP_REVISIONS = 20


class PushRejected(ValueError):
    """A pushed set that cannot be enforced; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class ReplicaView:
    """One replica as `/v1/policies` shows it."""

    replica_id: str
    hostname: str
    policy_source: str
    revision: str
    following: str | None
    reload_ok: bool
    last_seen: float
    agrees: bool  # enforces the fleet's active revision


def check_files(files: dict[str, str], schema_name: str, entities_name: str) -> list[str]:
    """Problems with a set of policy files as pushed or stored (names, sizes), before any parsing."""
    problems = []
    if not isinstance(files, dict) or not files:
        return ["no files"]
    if len(files) > MAX_PUSH_FILES:
        problems.append(f"{len(files)} files: at most {MAX_PUSH_FILES}")
    total = 0
    for name, text in files.items():
        if not isinstance(name, str) or not isinstance(text, str):
            problems.append("file names and contents are strings")
            continue
        total += len(text.encode("utf-8", "surrogatepass"))
        if (not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name
                or any(ord(c) < 0x20 for c in name)):
            problems.append(f"file name {name!r}: a plain file name (no directories, not hidden)")
        elif not (name.endswith(".cedar") or name in (schema_name, entities_name)):
            problems.append(f"file {name!r}: only *.cedar policy files, the schema ({schema_name}) and the "
                            f"entities ({entities_name})")
    if schema_name not in files:
        problems.append(f"the schema file {schema_name} is missing")
    if not any(n.endswith(".cedar") for n in files if isinstance(n, str)):
        problems.append("no *.cedar policy files")
    if total > MAX_PUSH_BYTES:
        problems.append(f"{total} bytes: at most {MAX_PUSH_BYTES}")
    return problems


def materialize(seed: PolicySource, into: Path, files: dict[str, str]) -> PolicySource:
    """Write `files` into a fresh directory under `into` and answer the source that loads them
    (the seed's connectors and generated-schema inputs, the files' schema and entities)."""
    schema_name = seed.schema_path.name
    entities_name = seed.entities_path.name if seed.entities_path is not None else "entities.json"
    problems = check_files(files, schema_name, entities_name)
    if problems:
        raise PushRejected(problems)
    into.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(dir=into, prefix="rev-"))
    os.chmod(target, 0o755)
    for name, text in files.items():
        (target / name).write_text(text)
    entities = target / entities_name
    return replace(seed, schema_path=target / schema_name, policy_dir=target,
                   entities_path=entities if entities.exists() else None)


def _prune(into: Path, keep: Path) -> None:
    """Delete materialized directories other than the one in use."""
    for d in into.glob("rev-*"):
        if d != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def default_replica_id(config: Any) -> str:
    return f"{socket.gethostname()}:{config.control.listen.port}"


def advertised_control_url(config: Any) -> str | None:
    """Where the other replicas reach this one's control API (the fleet views ask it for its
    records): control.peer_url(_env), else control.public_url, else a concrete listen address.
    None when the control API
    is off, or when the only guess is loopback for a wildcard listen host: another replica
    would reach itself there."""
    if not config.control.enabled:
        return None
    c = config.control
    peer = c.peer_base_url()
    if peer is not None:
        return peer
    url, guessed = control_base_url(c.listen.host, c.listen.port, c.public_url)
    return None if guessed else url


class FleetPolicy:
    """This replica's part in the fleet's policy set (see the module docstring)."""

    def __init__(self, config: Any, store: Store, policies: PolicyStore, lock: asyncio.Lock,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode: str = config.policies.source
        self.store = store
        self.policies = policies
        self.lock = lock
        self.clock = clock
        self.seed = policies.source
        self.into = config.state_dir / MATERIALIZED_DIR
        self.replica_id: str = config.replica_id or default_replica_id(config)
        self.hostname = socket.gethostname()
        self.heartbeat_seconds: float = config.policies.heartbeat_seconds
        self.control_url = advertised_control_url(config)
        self.started_at = clock()
        self.following: str | None = None  # store mode: the active revision it follows
        self.follow_error: str | None = None
        self._last_beat = 0.0
        self.events: Any = None  # proxy/store/events.py StoreEvents: tells the other replicas at once

    # -- startup and the watcher ---------------------------------------------------------
    async def start(self) -> None:
        """After the store is open, before traffic: publish (directory) or follow (store)."""
        if self.mode == "directory":
            await self.publish_loaded()
        else:
            active = await self.store.active_revision()
            if active is None:  # a fresh store: the seed becomes the fleet's first revision
                await self.publish_loaded()
                self.following = self.policies.bundle.revision
            else:
                await self.follow(active)
        await self.heartbeat(force=True)

    async def publish_loaded(self) -> None:
        b = self.policies.bundle
        await self.store.save_revision(PolicyRevision(b.revision, b.loaded_at, dict(b.sources)), keep=KEEP_REVISIONS)
        await self.announce()

    async def announce(self) -> None:
        """The active revision changed: followers load it now rather than at their next poll."""
        if self.events is not None:
            await self.events.publish("policy")

    async def tick(self) -> None:
        """One watcher round (every reload interval): follow a new active revision; heartbeat."""
        if self.mode == "store":
            active = await self.store.active_revision()
            if active is not None and active != self.following:
                await self.follow(active)
        await self.heartbeat()

    async def follow(self, revision: str) -> bool:
        """Load the stored revision; False (still enforcing the previous set) when it cannot be."""
        stored = await self.store.get_revision(revision)
        if stored is None:
            self.follow_error = f"revision {revision} is active but not in the store"
            log.error("fleet policy: %s", self.follow_error)
            return False
        async with self.lock:
            before = self.policies.bundle.revision
            previous = self.policies.source
            try:
                source = await asyncio.to_thread(materialize, self.seed, self.into, stored.files)
            except (PushRejected, OSError) as e:
                self.following = revision
                self.follow_error = f"cannot write revision {revision}: {e}"
                log.error("FLEET POLICY NOT FOLLOWED; still enforcing revision %s: %s", before, self.follow_error)
                return False
            self.policies.source = source
            ok = await asyncio.to_thread(self.policies.reload)
            self.following = revision
            if not ok:
                self.policies.source = previous
                self.follow_error = "; ".join(self.policies.status.last_error)
                shutil.rmtree(source.policy_dir, ignore_errors=True)
                log.error("FLEET POLICY NOT FOLLOWED; still enforcing revision %s: revision %s does not load here: %s",
                          before, revision, self.follow_error)
                return False
            _prune(self.into, source.policy_dir)
        self.follow_error = None
        now = self.policies.bundle.revision
        if now != revision:
            log.warning("fleet policy: following revision %s, which loads here as %s: this replica's connectors "
                        "differ from the publisher's", revision, now)
        else:
            log.warning("fleet policy: now enforcing revision %s (was %s)", revision, before)
        return True

    async def heartbeat(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_beat < self.heartbeat_seconds:
            return
        self._last_beat = now
        status = self.policies.status
        await self.store.heartbeat_replica(ReplicaBeat(
            replica_id=self.replica_id, hostname=self.hostname, policy_source=self.mode,
            revision=self.policies.bundle.revision, following=self.following if self.mode == "store" else None,
            reload_ok=status.ok and self.follow_error is None, started_at=self.started_at, last_seen=now,
            control_url=self.control_url))

    # -- operations ---------------------------------------------------------------------------
    def validate(self, files: dict[str, str]) -> str:
        """The revision `files` load as on this replica; PushRejected with every problem otherwise."""
        with tempfile.TemporaryDirectory(prefix="proctor-push-") as tmp:
            source = materialize(self.seed, Path(tmp), files)
            try:
                return load_bundle(source).revision
            except PolicyLoadError as e:
                raise PushRejected(e.problems) from None

    async def push(self, files: dict[str, str]) -> str:
        """Validate, store as the fleet's active revision, and (store mode) enforce it here now."""
        revision = await asyncio.to_thread(self.validate, files)
        await self.store.save_revision(PolicyRevision(revision, self.clock(), dict(files)), keep=KEEP_REVISIONS)
        await self.announce()
        if self.mode == "store":
            await self.follow(revision)
            await self.heartbeat(force=True)
        return revision

    async def activate(self, revision: str) -> bool:
        """Fleet rollback: make a kept revision active; this replica follows it at once. False: not kept."""
        if not await self.store.activate_revision(revision):
            return False
        await self.announce()
        await self.follow(revision)
        await self.heartbeat(force=True)
        return True

    async def replicas(self) -> tuple[str | None, list[ReplicaView]]:
        """The fleet's active revision and every replica seen lately."""
        active = await self.store.active_revision()
        beats = await self.store.list_replicas(seen_since=self.clock() - 3 * self.heartbeat_seconds)
        return active, [ReplicaView(b.replica_id, b.hostname, b.policy_source, b.revision, b.following, b.reload_ok,
                                    b.last_seen, agrees=b.revision == active and b.reload_ok) for b in beats]
