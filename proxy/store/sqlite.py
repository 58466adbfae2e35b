"""SQLite backend (the embedded default): one aiosqlite connection in WAL mode.

Every operation holds one asyncio.Lock, so a read never sees another task's
half-done write transaction on the shared connection, and every write runs
in its own `BEGIN IMMEDIATE` transaction (rolled back on any failure or
cancellation). `busy_timeout` covers other processes (e.g. the CLI) on the
same file.

The connection keeps the file it opened even after that file is deleted or
replaced on disk, and would go on answering from (and writing into) a file
nobody will ever open again. So every operation first checks that the path
still names the file (and write-ahead log) that was opened, and every write
checks again after COMMIT: a write is acknowledged only if it landed in the
store that a restart will read. When the store is lost, its write-ahead log
and shared-memory index, if still at the path, are renamed `*.lost-<time>`:
SQLite would otherwise replay that log onto whatever file is at the path
next (a mixture of two stores that might even carry the old store id).

Writes that must survive a power loss once acknowledged (suspensions and
resumptions, approval state changes) run with `synchronous = FULL` (the WAL is
fsynced at COMMIT); others keep `NORMAL`, which survives a crash of the
process but may lose the last commits on a power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .base import (
    AGENT_SELECT,
    APPROVAL_COLUMN_NAMES,
    APPROVAL_SELECT,
    REPLICA_SELECT,
    REVISION_SELECT,
    SCHEMA_VERSION,
    SUSPENSION_SELECT,
    SUSPENSIONS_VERSION_KEY,
    Store,
    StoreError,
    StoreIdentity,
    StoreLostError,
    activity_rows,
    agent_from_row,
    approval_from_row,
    approval_params,
    backend_errors,
    check_keep,
    check_kind,
    check_page,
    dump_json,
    replica_from_row,
    revision_from_row,
    suspension_from_row,
)
from .approval_holds import INSERT_SQLITE as _HOLD_INSERT
from .approval_holds import MIGRATION_V8, NEVER, find_sql_sqlite
from .idempotency import (IDEMPOTENCY_COLUMNS, IDEMPOTENCY_LIST_SELECT, IDEMPOTENCY_SELECT, SCOPE_PREFIXES,
                          IdempotencyEntry, entry_from_row, entry_params)
from .claims import CLAIM_COLUMNS, Claim, ClaimOutcome, claim_from_row, decide, hand_over
from .etags import ETAG_COLUMNS, ETAG_SELECT, SeenETag, etag_from_row, etag_params
from .workflows import (EVENT_COLUMNS, EVENT_SELECT, INSTANCE_COLUMNS, INSTANCE_SELECT, RUNNING, WF_OBJECT_SELECT,
                        Instance, StepEvent, WorkflowObject, apply_event, event_from_row, event_params,
                        instance_from_row, instance_params, object_from_row)
from .workflows import WF_JOINED as _WF_JOINED
from .workflows import flag_pattern
from .workflows import WF_SET as _WF_SET
from .counters import (HELD, RELEASED, SETTLED, ZERO, BudgetUsage, RateState, ReserveOutcome, SettleOutcome,
                       add, check_amount, check_key, check_listing, check_times, dec_text, dsum, parse_dec,
                       reserve_decision, usage_by_key)
from .models import AgentRecord, Approval, PolicyRevision, ReplicaBeat, Suspension

log = logging.getLogger("proctor.store")

MEMORY = ":memory:"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE proctor_approvals (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            agent_id TEXT NOT NULL,
            action TEXT NOT NULL,
            resource_type TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            connector TEXT NOT NULL,
            required_groups TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            idempotency_key TEXT,
            mode TEXT NOT NULL,
            decision_id TEXT NOT NULL,
            request TEXT NOT NULL,
            derived TEXT NOT NULL,
            escalate_at REAL,
            escalated INTEGER NOT NULL DEFAULT 0,
            votes TEXT NOT NULL,
            decided_at REAL,
            decided_by TEXT,
            reason TEXT,
            forwarded_at REAL,
            version INTEGER NOT NULL
        )""",
        "CREATE INDEX proctor_approvals_state_created ON proctor_approvals (state, created_at)",
        "CREATE INDEX proctor_approvals_created ON proctor_approvals (created_at)",
        "CREATE INDEX proctor_approvals_agent_fp ON proctor_approvals (agent_id, fingerprint)",
        "CREATE INDEX proctor_approvals_agent_idem ON proctor_approvals (agent_id, idempotency_key)",
        """CREATE TABLE proctor_resource_creators (
            resource_type TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            decision_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (resource_type, resource_id)
        )""",
        """CREATE TABLE proctor_agents (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT '',
            team TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            registered INTEGER NOT NULL DEFAULT 0,
            first_seen REAL,
            last_seen REAL,
            requests INTEGER NOT NULL DEFAULT 0,
            allowed INTEGER NOT NULL DEFAULT 0,
            denied INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE proctor_suspensions (
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            since REAL NOT NULL,
            suspended_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (kind, target)
        )""",
        """CREATE TABLE proctor_policy_revisions (
            revision TEXT PRIMARY KEY,
            loaded_at REAL NOT NULL,
            files TEXT NOT NULL,
            active INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX proctor_policy_revisions_loaded ON proctor_policy_revisions (loaded_at)",
        "CREATE TABLE proctor_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        f"INSERT INTO proctor_meta (key, value) VALUES ('{SUSPENSIONS_VERSION_KEY}', 0)",
    ),
    2: (
        # One row, written when the store is created (see open()): the store's identity.
        """CREATE TABLE proctor_store_identity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            store_id TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
    3: (
        # Coordination (issue 12; docs/coordination.md).
        # -- claims (proxy/coordination/claims.py) --
        # One row per holder (shared claims have several); expired rows are ignored and
        # swept by the next change. The fence row per resource outlives its claims.
        """CREATE TABLE proctor_claims (
            id TEXT PRIMARY KEY,
            connector TEXT NOT NULL,
            resource TEXT NOT NULL,
            holder TEXT NOT NULL,
            holder_groups TEXT NOT NULL,
            mode TEXT NOT NULL,
            since REAL NOT NULL,
            expires_at REAL NOT NULL,
            fence INTEGER NOT NULL,
            UNIQUE (connector, resource, holder)
        )""",
        "CREATE INDEX proctor_claims_expiry ON proctor_claims (expires_at)",
        """CREATE TABLE proctor_claim_fences (
            connector TEXT NOT NULL,
            resource TEXT NOT NULL,
            fence INTEGER NOT NULL,
            PRIMARY KEY (connector, resource)
        )""",
        # -- idempotency keys and dedupe windows (proxy/coordination/) --
        """CREATE TABLE proctor_idempotency (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            state TEXT NOT NULL,
            owner TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            status INTEGER,
            headers TEXT NOT NULL,
            body BLOB,
            body_stored INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, key)
        )""",
        "CREATE INDEX proctor_idempotency_expires ON proctor_idempotency (expires_at)",
    ),
    4: (
        # Optimistic concurrency (proxy/coordination/concurrency.py): the last strong ETag
        # each agent saw for a record; expired rows are ignored and swept.
        """CREATE TABLE proctor_etags (
            connector TEXT NOT NULL,
            resource TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            etag TEXT NOT NULL,
            seen_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            decision_id TEXT NOT NULL,
            PRIMARY KEY (connector, resource, agent_id)
        )""",
        "CREATE INDEX proctor_etags_expires ON proctor_etags (expires_at)",
    ),
    5: (
        # Workflows (proxy/workflows/, proxy/store/workflows.py): instances, the business
        # objects that name them (unique per workflow) and their step events.
        """CREATE TABLE proctor_wf_instances (
            id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            state TEXT NOT NULL,
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            completed_at REAL,
            completed TEXT NOT NULL,
            tally TEXT NOT NULL,
            cost TEXT NOT NULL,
            last_step TEXT NOT NULL,
            version INTEGER NOT NULL,
            attrs TEXT NOT NULL
        )""",
        "CREATE INDEX proctor_wf_instances_state ON proctor_wf_instances (workflow, state, updated_at)",
        """CREATE TABLE proctor_wf_objects (
            workflow TEXT NOT NULL,
            object_type TEXT NOT NULL,
            object_id TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            step TEXT NOT NULL,
            linked_at REAL NOT NULL,
            PRIMARY KEY (workflow, object_type, object_id)
        )""",
        "CREATE INDEX proctor_wf_objects_instance ON proctor_wf_objects (instance_id)",
        """CREATE TABLE proctor_wf_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            instance_id TEXT NOT NULL,
            workflow TEXT NOT NULL,
            step TEXT NOT NULL,
            action TEXT NOT NULL,
            agent TEXT NOT NULL,
            decision_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            status INTEGER,
            time REAL NOT NULL,
            duration_ms REAL NOT NULL,
            approval_wait_ms REAL,
            human INTEGER NOT NULL DEFAULT 0,
            cost TEXT NOT NULL,
            objects TEXT NOT NULL
        )""",
        "CREATE INDEX proctor_wf_events_instance ON proctor_wf_events (instance_id, seq)",
        "CREATE INDEX proctor_wf_events_time ON proctor_wf_events (workflow, time)",
    ),
    6: (
        # Counters (proxy/limits/, proxy/store/counters.py): GCRA state per rate-limit key (the TAT
        # as whole ms + tat_frac/tat_den ms), budget spend per (budget, window) and reservations.
        # Amounts are exact decimal text, never REAL.
        """CREATE TABLE proctor_rate_limits (
            key TEXT PRIMARY KEY,
            tat_ms INTEGER NOT NULL,
            tat_frac INTEGER NOT NULL,
            tat_den INTEGER NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX proctor_rate_limits_expires ON proctor_rate_limits (expires_at)",
        """CREATE TABLE proctor_budget_usage (
            budget_key TEXT NOT NULL,
            window_id TEXT NOT NULL,
            spent TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (budget_key, window_id)
        )""",
        """CREATE TABLE proctor_budget_reservations (
            id TEXT PRIMARY KEY,
            budget_key TEXT NOT NULL,
            window_id TEXT NOT NULL,
            amount TEXT NOT NULL,
            state TEXT NOT NULL,
            actual TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            purge_at REAL NOT NULL
        )""",
        "CREATE INDEX proctor_budget_reservations_window ON proctor_budget_reservations "
        "(budget_key, window_id, state, expires_at)",
        "CREATE INDEX proctor_budget_reservations_purge ON proctor_budget_reservations (purge_at)",
    ),
    7: (
        # Replicas (proxy/policy/fleet.py): each one's last report of the policy revision it enforces.
        """CREATE TABLE proctor_replicas (
            replica_id TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            policy_source TEXT NOT NULL,
            revision TEXT NOT NULL,
            following TEXT,
            reload_ok INTEGER NOT NULL,
            started_at REAL NOT NULL,
            last_seen REAL NOT NULL
        )""",
    ),
    8: MIGRATION_V8,  # one answering approval per request, enforced by the store (store/approval_holds.py)
    # Fleet views (proxy/control/fleet_views.py): where each replica's control API is reached.
    9: ("ALTER TABLE proctor_replicas ADD COLUMN control_url TEXT",),
}
assert max(_MIGRATIONS) == SCHEMA_VERSION

_INSERT_APPROVAL = (
    f"INSERT INTO proctor_approvals ({APPROVAL_SELECT}) "
    f"VALUES ({', '.join('?' for _ in APPROVAL_COLUMN_NAMES)})"
)
# Every column but id; then WHERE id = ? AND version = ?
_UPDATE_APPROVAL = (
    "UPDATE proctor_approvals SET "
    + ", ".join(f"{c} = ?" for c in APPROVAL_COLUMN_NAMES[1:])
    + " WHERE id = ? AND version = ?"
)
# The approval answering a request, by Idempotency-Key (True) or fingerprint (False).
_FIND_ANSWERING = {by_key: find_sql_sqlite(by_key) for by_key in (True, False)}
_DUE = (
    f"SELECT {APPROVAL_SELECT} FROM proctor_approvals "
    "WHERE state = ? AND (expires_at <= ? OR (escalate_at IS NOT NULL AND escalate_at <= ? AND escalated = 0)) "
    "ORDER BY created_at, id"
)
_RECORD_CREATOR = (
    "INSERT INTO proctor_resource_creators (resource_type, resource_id, agent_id, decision_id, created_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (resource_type, resource_id) DO UPDATE SET "
    "agent_id = excluded.agent_id, decision_id = excluded.decision_id, created_at = excluded.created_at"
)
_UPSERT_AGENT = (
    "INSERT INTO proctor_agents (id, owner, team, description, registered) VALUES (?, ?, ?, ?, 1) "
    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, team = excluded.team, "
    "description = excluded.description, registered = 1"
)
_AGENT_ACTIVITY = (
    "INSERT INTO proctor_agents (id, first_seen, last_seen, requests, allowed, denied) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET "
    "first_seen = min(coalesce(proctor_agents.first_seen, excluded.first_seen), "
    "coalesce(excluded.first_seen, proctor_agents.first_seen)), "
    "last_seen = max(coalesce(proctor_agents.last_seen, excluded.last_seen), "
    "coalesce(excluded.last_seen, proctor_agents.last_seen)), "
    "requests = proctor_agents.requests + excluded.requests, "
    "allowed = proctor_agents.allowed + excluded.allowed, "
    "denied = proctor_agents.denied + excluded.denied"
)
_BUMP_SUSPENSIONS = "UPDATE proctor_meta SET value = value + 1 WHERE key = ?"
_SELECT_IDENTITY = "SELECT store_id, created_at FROM proctor_store_identity WHERE id = 1"
# Insert-if-absent is the arbiter: a live row is left alone (no change), an expired one replaced.
_RESERVE_IDEM = (
    f"INSERT INTO proctor_idempotency ({IDEMPOTENCY_SELECT}) VALUES ({', '.join('?' for _ in IDEMPOTENCY_COLUMNS)}) "
    "ON CONFLICT (scope, key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in IDEMPOTENCY_COLUMNS[2:])
    + " WHERE proctor_idempotency.expires_at <= ?"
)
_GET_IDEM = f"SELECT {IDEMPOTENCY_SELECT} FROM proctor_idempotency WHERE scope = ? AND key = ? AND expires_at > ?"

FileId = tuple[int, int]  # (st_dev, st_ino)


def _file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # EACCES, EIO, ESTALE: every backend failure is a StoreError
        raise StoreError(f"cannot check the state store file {path}: {e.strerror or e}") from None
    return (st.st_dev, st.st_ino)


T = TypeVar("T")
# SQLiteStore._transaction runs a transaction whole in aiosqlite's worker thread; PROCTOR_SQLITE_ONE_HOP=0
# turns that off (a diagnostic switch: every statement then goes through aiosqlite's public API)
ONE_HOP_TRANSACTIONS = os.environ.get("PROCTOR_SQLITE_ONE_HOP", "1") != "0"


class _BlockingFacade:
    """sqlite3.Connection's execute/executemany over an aiosqlite connection, called from a
    worker thread (the fallback of SQLiteStore._transaction)."""

    def __init__(self, db: aiosqlite.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.db, self.loop = db, loop

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async def go() -> Any:
            cur = await self.db.execute(sql, params)
            return _Rows(await cur.fetchall(), cur.rowcount)
        return self._run(go())

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._run(self.db.executemany(sql, rows))


class _Rows:
    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        path = os.fspath(path)
        if path != MEMORY and not os.path.isabs(path):
            raise ValueError(f"SQLite store path must be absolute (or {MEMORY}), got {path!r}")
        self.path = path
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock: asyncio.Lock | None = None
        # What the path and its write-ahead log named when the store was opened.
        self._file: FileId | None = None
        self._wal: FileId | None = None
        self._shm: FileId | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def persistent(self) -> bool:
        return self.path != MEMORY

    @property
    def location(self) -> str:
        return f"sqlite {self.path}"

    # ---- lifecycle -------------------------------------------------------
    async def open(self, *, create: bool = True) -> None:
        if self._db is not None:
            return
        with backend_errors("open"):
            if self.path != MEMORY:
                if not create:
                    self._require_existing()
                self._prepare_file()
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await self._enable_wal(db)
                await db.execute("PRAGMA synchronous = NORMAL")
                identity = await self._migrate(db, create)
                if self.path != MEMORY:
                    # After the migration's COMMIT the write-ahead log exists: remember both files.
                    self._file = _file_id(self.path)
                    self._wal = _file_id(self.path + "-wal")
                    self._shm = _file_id(self.path + "-shm")
            except BaseException:
                await db.close()
                raise
        self._db = db
        self._lock = asyncio.Lock()
        self.identity = identity

    def _require_existing(self) -> None:
        """open(create=False): an absent or empty file is a store that was lost, not one to create."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            raise StoreLostError(f"the state store file {self.path} does not exist") from None
        if size == 0:
            raise StoreLostError(f"the state store file {self.path} is empty")

    async def _enable_wal(self, db: aiosqlite.Connection) -> None:
        # Switching to WAL needs a moment of exclusive access and SQLite does not run
        # the busy handler for it: two processes opening a new file together retry here.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    def _prepare_file(self) -> None:
        parent = Path(self.path).parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Approval summaries live here: create the file private to this user.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)

    async def _migrate(self, db: aiosqlite.Connection, create: bool) -> StoreIdentity:
        try:
            await db.execute("BEGIN IMMEDIATE")
            async with db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'proctor_schema_version'"
            ) as cur:
                has_schema = await cur.fetchone() is not None
            if not has_schema and not create:
                raise StoreLostError(f"the state store file {self.path} holds no Proctor state")
            await db.execute(
                "CREATE TABLE IF NOT EXISTS proctor_schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)"
            )
            async with db.execute("SELECT max(version) FROM proctor_schema_version") as cur:
                row = await cur.fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"state store schema version {current} is newer than this Proctor supports ({SCHEMA_VERSION})"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[version]:
                    await db.execute(stmt)
                await db.execute(
                    "INSERT INTO proctor_schema_version (version, applied_at) VALUES (?, ?)", (version, time.time())
                )
            # A new store (or one from before store ids) gets its id now; an existing one keeps it.
            await db.execute(
                "INSERT OR IGNORE INTO proctor_store_identity (id, store_id, created_at) VALUES (1, ?, ?)",
                (str(uuid.uuid4()), time.time()),
            )
            async with db.execute(_SELECT_IDENTITY) as cur:
                row = await cur.fetchone()
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        return StoreIdentity(store_id=str(row[0]), created_at=float(row[1]))

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        with backend_errors("close"):
            await db.close()

    # ---- health ------------------------------------------------------------
    def _check_files(self) -> None:
        """The path (and its write-ahead log) still name the files opened; else the store is lost.
        Two stat() calls: cheap enough for every operation."""
        self._raise_if_lost()
        if self.path == MEMORY or self._file is None:
            return
        now = _file_id(self.path)
        if now != self._file:
            how = "deleted" if now is None else "replaced by another file"
            self.mark_lost(f"the state store file {self.path} was {how} while Proctor was running")
        elif self._wal is not None and _file_id(self.path + "-wal") != self._wal:
            # Recent commits live only in the log until a checkpoint: without it they are gone.
            self.mark_lost(f"the state store's write-ahead log {self.path}-wal was deleted or replaced")
        if self._lost is not None:
            self._set_aside_own_log()
            self._raise_if_lost()

    def _set_aside_own_log(self) -> None:
        """Rename this store's -wal/-shm (only if the path still names them) out of the way, so
        SQLite never replays them onto another file at the path. Our open handles keep working,
        and SQLite does not checkpoint or delete a log whose database file has moved."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for suffix, mine in (("-wal", self._wal), ("-shm", self._shm)):
            name = self.path + suffix
            if mine is None or _file_id(name) != mine:
                continue
            try:
                os.replace(name, f"{name}.lost-{stamp}")
                log.warning("renamed %s to %s.lost-%s (it belongs to the lost store)", name, name, stamp)
            except OSError as e:
                log.error("could not rename %s out of the way: %s", name, e)
        self._wal = self._shm = None

    async def _verify(self) -> None:
        row = await self._fetchone("check", _SELECT_IDENTITY)  # also checks the files
        self._check_identity(None if row is None else str(row[0]))

    # ---- plumbing --------------------------------------------------------
    def _conn(self) -> tuple[aiosqlite.Connection, asyncio.Lock]:
        if self._db is None or self._lock is None:
            raise StoreError("state store is not open")
        self._check_files()
        return self._db, self._lock

    async def _fetchall(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        db, lock = self._conn()
        with backend_errors(op):
            async with lock:
                return list(await db.execute_fetchall(sql, params))

    async def _fetchone(self, op: str, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._fetchall(op, sql, params)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def _write(self, op: str, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """Serialised write transaction; rolled back on any error or cancellation.

        Returns only once the commit is in the store's file (checked after COMMIT);
        `durable=True` also fsyncs it (synchronous = FULL for this transaction)."""
        db, lock = self._conn()
        with backend_errors(op):
            async with lock:
                try:
                    if durable:
                        await db.execute("PRAGMA synchronous = FULL")
                    await db.execute("BEGIN IMMEDIATE")
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    # The worker thread runs queued statements in order, so this lands
                    # after anything already sent even if this task is being cancelled
                    # (and fails harmlessly when BEGIN or COMMIT never took effect).
                    with contextlib.suppress(Exception):
                        await db.execute("ROLLBACK")
                    raise
                finally:
                    if durable:
                        with contextlib.suppress(Exception):
                            await db.execute("PRAGMA synchronous = NORMAL")
                # Committed, but into the file a restart will read? (it may have been replaced meanwhile)
                self._check_files()

    async def _transaction(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` inside one write transaction (BEGIN IMMEDIATE ... COMMIT), run whole in the
        connection's worker thread: one hop between the event loop and the thread for the
        transaction instead of one per statement (each hop costs tens of microseconds of CPU).

        Uses aiosqlite's queue and sqlite3 connection (`_execute`, `_connection`: not public
        API; tests/test_workflows_store.py checks they exist). Without them, `fn` runs
        statement by statement through the public API instead: slower, the same result."""
        db, lock = self._conn()
        runner = getattr(db, "_execute", None) if ONE_HOP_TRANSACTIONS else None
        with backend_errors(op):
            async with lock:
                if runner is None or not hasattr(db, "_connection"):
                    return await self._transaction_fallback(db, fn)

                def in_thread() -> T:
                    conn: sqlite3.Connection = db._connection  # type: ignore[attr-defined]
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                        return result
                    except BaseException:
                        with contextlib.suppress(Exception):
                            conn.execute("ROLLBACK")
                        raise

                result: T = await runner(in_thread)
            self._check_files()
            return result

    async def _transaction_fallback(self, db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # (the same transaction through aiosqlite's public API: fn gets a blocking facade)
        loop = asyncio.get_running_loop()
        await db.execute("BEGIN IMMEDIATE")
        try:
            result = await loop.run_in_executor(None, fn, _BlockingFacade(db, loop))  # type: ignore[arg-type]
            await db.execute("COMMIT")
            return result
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise

    # ---- approvals -------------------------------------------------------
    async def create_approval(self, a: Approval) -> None:
        async with self._write("create_approval") as db:
            await db.execute(_INSERT_APPROVAL, approval_params(a))

    async def get_approval(self, id: str) -> Approval | None:
        row = await self._fetchone(
            "get_approval", f"SELECT {APPROVAL_SELECT} FROM proctor_approvals WHERE id = ?", (id,)
        )
        return None if row is None else approval_from_row(row)

    @staticmethod
    def _approval_filter(
        states: list[str] | None, agent_id: str | None = None, action: str | None = None
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if action is not None:
            where.append("action = ?")
            params.append(action)
        return (" WHERE " + " AND ".join(where) if where else ""), params

    async def list_approvals(
        self,
        *,
        states: list[str] | None = None,
        agent_id: str | None = None,
        action: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Approval]:
        check_page(limit, offset)
        if states is not None and not states:
            return []
        where, params = self._approval_filter(states, agent_id, action)
        rows = await self._fetchall(
            "list_approvals",
            f"SELECT {APPROVAL_SELECT} FROM proctor_approvals{where} "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            [*params, int(limit), int(offset)],
        )
        return [approval_from_row(r) for r in rows]

    async def count_approvals(self, *, states: list[str] | None = None) -> int:
        if states is not None and not states:
            return 0
        where, params = self._approval_filter(states)
        row = await self._fetchone("count_approvals", f"SELECT count(*) FROM proctor_approvals{where}", params)
        return int(row[0])

    async def find_open_approval(
        self, *, agent_id: str, fingerprint: str, idempotency_key: str | None, forwarded_since: float | None = None
    ) -> Approval | None:
        by_key = idempotency_key is not None
        since = NEVER if forwarded_since is None else float(forwarded_since)
        row = await self._fetchone("find_open_approval", _FIND_ANSWERING[by_key],
                                   (agent_id, idempotency_key if by_key else fingerprint, since))
        return None if row is None else approval_from_row(row)

    async def hold_approval(self, a: Approval, *, forwarded_since: float | None = None) -> tuple[Approval, bool]:
        params = approval_params(a)
        by_key = a.idempotency_key is not None
        since = NEVER if forwarded_since is None else float(forwarded_since)

        # One BEGIN IMMEDIATE transaction (writers to the file queue): look, then insert. The
        # unique indexes (schema 7) would refuse a second answering approval all the same.
        def txn(conn: sqlite3.Connection) -> tuple[Approval, bool]:
            row = conn.execute(_FIND_ANSWERING[by_key],
                               (a.agent_id, a.idempotency_key if by_key else a.fingerprint, since)).fetchone()
            if row is not None:
                return approval_from_row(row), False
            if conn.execute(_HOLD_INSERT, params).rowcount != 1:
                raise StoreError(f"state store: approval {a.id} conflicts with a stored one")
            return a, True

        return await self._transaction("hold_approval", txn)

    async def update_approval(self, a: Approval, *, expect_version: int) -> bool:
        expect_version = int(expect_version)
        async with self._write("update_approval", durable=True) as db:
            params = approval_params(a)
            params[-1] = expect_version + 1
            async with db.execute(_UPDATE_APPROVAL, [*params[1:], a.id, expect_version]) as cur:
                changed = cur.rowcount == 1
        if changed:
            a.version = expect_version + 1
        return changed

    async def due_approvals(self, now: float) -> list[Approval]:
        now = float(now)
        rows = await self._fetchall("due_approvals", _DUE, ("pending", now, now))
        return [approval_from_row(r) for r in rows]

    # ---- resource creators -----------------------------------------------
    async def record_creator(
        self, resource_type: str, resource_id: str, agent_id: str, decision_id: str, at: float
    ) -> None:
        async with self._write("record_creator") as db:
            await db.execute(_RECORD_CREATOR, (resource_type, resource_id, agent_id, decision_id, float(at)))

    async def creator_of(self, resource_type: str, resource_id: str) -> str | None:
        row = await self._fetchone(
            "creator_of",
            "SELECT agent_id FROM proctor_resource_creators WHERE resource_type = ? AND resource_id = ?",
            (resource_type, resource_id),
        )
        return None if row is None else row[0]

    # ---- agent registry --------------------------------------------------
    async def upsert_agent(self, rec: AgentRecord) -> None:
        async with self._write("upsert_agent") as db:
            await db.execute(_UPSERT_AGENT, (rec.id, rec.owner, rec.team, rec.description))

    async def record_agent_activity(self, batch: dict[str, tuple[float, float, int, int, int]]) -> None:
        if not batch:
            return
        async with self._write("record_agent_activity") as db:
            await db.executemany(_AGENT_ACTIVITY, activity_rows(batch))

    async def get_agent(self, id: str) -> AgentRecord | None:
        row = await self._fetchone("get_agent", f"SELECT {AGENT_SELECT} FROM proctor_agents WHERE id = ?", (id,))
        return None if row is None else agent_from_row(row)

    async def list_agents(self) -> list[AgentRecord]:
        rows = await self._fetchall("list_agents", f"SELECT {AGENT_SELECT} FROM proctor_agents ORDER BY id")
        return [agent_from_row(r) for r in rows]

    # ---- suspensions -----------------------------------------------------
    async def suspend(self, s: Suspension) -> None:
        check_kind(s.kind)
        async with self._write("suspend", durable=True) as db:
            await db.execute(
                "INSERT INTO proctor_suspensions (kind, target, since, suspended_by, reason) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, target) DO UPDATE SET since = excluded.since, "
                "suspended_by = excluded.suspended_by, reason = excluded.reason",
                (s.kind, s.target, float(s.since), s.by, s.reason),
            )
            await db.execute(_BUMP_SUSPENSIONS, (SUSPENSIONS_VERSION_KEY,))

    async def resume(self, kind: str, target: str) -> bool:
        check_kind(kind)
        async with self._write("resume", durable=True) as db:
            async with db.execute(
                "DELETE FROM proctor_suspensions WHERE kind = ? AND target = ?", (kind, target)
            ) as cur:
                removed = cur.rowcount > 0
            if removed:
                await db.execute(_BUMP_SUSPENSIONS, (SUSPENSIONS_VERSION_KEY,))
        return removed

    async def list_suspensions(self) -> list[Suspension]:
        rows = await self._fetchall(
            "list_suspensions", f"SELECT {SUSPENSION_SELECT} FROM proctor_suspensions ORDER BY kind, target"
        )
        return [suspension_from_row(r) for r in rows]

    async def suspensions_version(self) -> int:
        row = await self._fetchone(
            "suspensions_version", "SELECT value FROM proctor_meta WHERE key = ?", (SUSPENSIONS_VERSION_KEY,)
        )
        return 0 if row is None else int(row[0])

    # ---- policy revisions ------------------------------------------------
    async def save_revision(self, r: PolicyRevision, keep: int = 20) -> None:
        check_keep(keep)
        async with self._write("save_revision") as db:
            files = dump_json(dict(r.files))
            await db.execute(
                "UPDATE proctor_policy_revisions SET active = 0 WHERE active <> 0 AND revision <> ?", (r.revision,)
            )
            await db.execute(
                "INSERT INTO proctor_policy_revisions (revision, loaded_at, files, active) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (revision) DO UPDATE SET "
                "loaded_at = excluded.loaded_at, files = excluded.files, active = 1",
                (r.revision, float(r.loaded_at), files),
            )
            await db.execute(
                "DELETE FROM proctor_policy_revisions WHERE active = 0 AND revision NOT IN ("
                "SELECT revision FROM proctor_policy_revisions ORDER BY loaded_at DESC, revision DESC LIMIT ?)",
                (int(keep),),
            )
        r.active = True

    async def list_revisions(self) -> list[PolicyRevision]:
        rows = await self._fetchall(
            "list_revisions",
            f"SELECT {REVISION_SELECT} FROM proctor_policy_revisions ORDER BY loaded_at DESC, revision DESC",
        )
        return [revision_from_row(r) for r in rows]

    async def get_revision(self, revision: str) -> PolicyRevision | None:
        row = await self._fetchone(
            "get_revision", f"SELECT {REVISION_SELECT} FROM proctor_policy_revisions WHERE revision = ?", (revision,)
        )
        return None if row is None else revision_from_row(row)

    async def active_revision(self) -> str | None:
        row = await self._fetchone("active_revision",
                                   "SELECT revision FROM proctor_policy_revisions WHERE active <> 0 LIMIT 1")
        return None if row is None else str(row[0])

    async def activate_revision(self, revision: str) -> bool:
        def txn(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM proctor_policy_revisions WHERE revision = ?", (revision,)).fetchone() is None:
                return False
            conn.execute("UPDATE proctor_policy_revisions SET active = CASE WHEN revision = ? THEN 1 ELSE 0 END",
                         (revision,))
            return True

        return await self._transaction("activate_revision", txn)

    async def heartbeat_replica(self, beat: ReplicaBeat) -> None:
        async with self._write("heartbeat_replica") as db:
            await db.execute(
                "INSERT INTO proctor_replicas (replica_id, hostname, policy_source, revision, following, reload_ok, "
                "started_at, last_seen, control_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (replica_id) "
                "DO UPDATE SET hostname = excluded.hostname, policy_source = excluded.policy_source, "
                "revision = excluded.revision, following = excluded.following, reload_ok = excluded.reload_ok, "
                "started_at = excluded.started_at, last_seen = excluded.last_seen, control_url = excluded.control_url",
                (beat.replica_id, beat.hostname, beat.policy_source, beat.revision, beat.following,
                 1 if beat.reload_ok else 0, float(beat.started_at), float(beat.last_seen), beat.control_url))

    async def list_replicas(self, seen_since: float) -> list[ReplicaBeat]:
        async with self._write("list_replicas") as db:
            await db.execute("DELETE FROM proctor_replicas WHERE last_seen < ?", (float(seen_since),))
        rows = await self._fetchall(
            "list_replicas", f"SELECT {REPLICA_SELECT} FROM proctor_replicas ORDER BY replica_id")
        return [replica_from_row(r) for r in rows]

    # ---- idempotency keys and dedupe windows -------------------------------
    async def reserve_idempotency(self, e: IdempotencyEntry, now: float) -> IdempotencyEntry | None:
        params = [*entry_params(e), float(now)]

        def txn(conn: sqlite3.Connection) -> IdempotencyEntry | None:
            if conn.execute(_RESERVE_IDEM, params).rowcount == 1:
                return None
            # (same transaction: the live row that refused us is still there)
            row = conn.execute(_GET_IDEM, (e.scope, e.key, float(now))).fetchone()
            return entry_from_row(row) if row is not None else None

        return await self._transaction("reserve_idempotency", txn)

    async def get_idempotency(self, scope: str, key: str, now: float) -> IdempotencyEntry | None:
        row = await self._fetchone("get_idempotency", _GET_IDEM, (scope, key, float(now)))
        return None if row is None else entry_from_row(row)

    async def complete_idempotency(self, e: IdempotencyEntry) -> bool:
        p = entry_params(e)
        return await self._transaction("complete_idempotency", lambda conn: conn.execute(
            "UPDATE proctor_idempotency SET state = ?, status = ?, headers = ?, body = ?, body_stored = ?, "
            "expires_at = ? WHERE scope = ? AND key = ? AND owner = ? AND state = 'in-progress'",
            (p[3], p[8], p[9], p[10], p[11], p[7], e.scope, e.key, e.owner),
        ).rowcount == 1)

    async def release_idempotency(self, scope: str, key: str, owner: str) -> bool:
        return await self._transaction("release_idempotency", lambda conn: conn.execute(
            "DELETE FROM proctor_idempotency WHERE scope = ? AND key = ? AND owner = ? AND state = 'in-progress'",
            (scope, key, owner),
        ).rowcount == 1)

    async def sweep_idempotency(self, now: float) -> int:
        async with self._write("sweep_idempotency") as db:
            cur = await db.execute("DELETE FROM proctor_idempotency WHERE expires_at <= ?", (float(now),))
            return int(cur.rowcount)

    async def list_idempotency(self, now: float, *, kind: str | None = None, agent: str | None = None,
                               limit: int = 1000) -> list[IdempotencyEntry]:
        sql = f"SELECT {IDEMPOTENCY_LIST_SELECT} FROM proctor_idempotency WHERE expires_at > ?"
        params: list[Any] = [float(now)]
        if kind is not None:
            prefix = SCOPE_PREFIXES[kind]
            sql += " AND substr(scope, 1, ?) = ?"
            params += [len(prefix), prefix]
        if agent is not None:
            sql += " AND agent_id = ?"
            params.append(agent)
        rows = await self._fetchall("list_idempotency", sql + " ORDER BY created_at DESC, scope, key LIMIT ?",
                                    [*params, max(0, int(limit))])
        return [entry_from_row(r) for r in rows]

    # ---- claims on resources ---------------------------------------------
    async def acquire_claim(
        self, *, connector: str, resource: str, agent: str, groups: list[str], mode: str, ttl: float, now: float
    ) -> ClaimOutcome:
        # BEGIN IMMEDIATE takes the database's write lock first: the read, the decision and
        # the write below are one step for every process sharing this file.
        def txn(conn: sqlite3.Connection) -> ClaimOutcome:
            row = conn.execute("SELECT fence FROM proctor_claim_fences WHERE connector = ? AND resource = ?",
                               (connector, resource)).fetchone()
            fence = 0 if row is None else int(row[0])
            claims = [claim_from_row(r) for r in conn.execute(
                f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE connector = ? AND resource = ? ORDER BY since",
                (connector, resource)).fetchall()]
            outcome, new_fence = decide(claims, fence, connector=connector, resource=resource, agent=agent,
                                        groups=groups, mode=mode, ttl=ttl, now=now)
            if outcome.acquired:
                c = outcome.claim
                conn.execute(
                    "DELETE FROM proctor_claims WHERE connector = ? AND resource = ? AND (expires_at <= ? "
                    "OR (holder = ? AND id <> ?))",
                    (connector, resource, float(now), agent, c.id),
                )
                conn.execute(
                    f"INSERT INTO proctor_claims ({CLAIM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET holder_groups = excluded.holder_groups, mode = excluded.mode, "
                    "expires_at = excluded.expires_at",
                    (c.id, connector, resource, agent, dump_json(c.holder_groups), c.mode, float(c.since),
                     float(c.expires_at), c.fence),
                )
                if new_fence != fence:
                    conn.execute(
                        "INSERT INTO proctor_claim_fences (connector, resource, fence) VALUES (?, ?, ?) "
                        "ON CONFLICT (connector, resource) DO UPDATE SET fence = excluded.fence",
                        (connector, resource, new_fence),
                    )
            return outcome

        return await self._transaction("acquire_claim", txn)

    async def renew_claim(self, claim_id: str, *, agent: str, groups: list[str], mode: str, ttl: float,
                          now: float) -> Claim | None:
        row = await self._transaction("renew_claim", lambda conn: conn.execute(
            "UPDATE proctor_claims SET expires_at = MAX(expires_at, ?), holder_groups = ? "
            f"WHERE id = ? AND holder = ? AND mode = ? AND expires_at > ? RETURNING {CLAIM_COLUMNS}",
            (float(now + ttl), dump_json(list(groups)), claim_id, agent, mode, float(now)),
        ).fetchone())
        return claim_from_row(row) if row is not None else None

    async def claims_on(self, connector: str, resource: str, now: float) -> list[Claim]:
        rows = await self._fetchall(
            "claims_on",
            f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE connector = ? AND resource = ? AND expires_at > ? "
            "ORDER BY since, id",
            (connector, resource, float(now)),
        )
        return [claim_from_row(r) for r in rows]

    async def list_claims(self, now: float, *, connector: str | None = None) -> list[Claim]:
        sql = f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE expires_at > ?"
        params: list[Any] = [float(now)]
        if connector is not None:
            sql += " AND connector = ?"
            params.append(connector)
        rows = await self._fetchall("list_claims", sql + " ORDER BY connector, resource, since, id", params)
        return [claim_from_row(r) for r in rows]

    async def release_claim(self, claim_id: str) -> Claim | None:
        async with self._write("release_claim", durable=True) as db:
            async with db.execute(f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE id = ?", (claim_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            await db.execute("DELETE FROM proctor_claims WHERE id = ?", (claim_id,))
        return claim_from_row(row)

    async def transfer_claim(self, claim_id: str, *, to: str, groups: list[str], now: float,
                             ttl: float | None = None) -> tuple[Claim, Claim] | None:
        # One BEGIN IMMEDIATE transaction: the old tenure ends, the new one starts and the
        # fence is bumped together, so no acquirer on any process sees the resource free.
        async with self._write("transfer_claim", durable=True) as db:
            async with db.execute(f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE id = ? AND expires_at > ?",
                                  (claim_id, float(now))) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            old = claim_from_row(row)
            async with db.execute("SELECT fence FROM proctor_claim_fences WHERE connector = ? AND resource = ?",
                                  (old.connector, old.resource)) as cur:
                frow = await cur.fetchone()
            fence = old.fence if frow is None else int(frow[0])
            new, new_fence = hand_over(old, fence, to=to, groups=groups, now=now, ttl=ttl)
            if new is old:
                return old, old
            await db.execute("DELETE FROM proctor_claims WHERE id = ? OR (connector = ? AND resource = ? AND "
                             "(holder = ? OR expires_at <= ?))",
                             (old.id, old.connector, old.resource, to, float(now)))
            await db.execute(
                f"INSERT INTO proctor_claims ({CLAIM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new.id, new.connector, new.resource, new.holder, dump_json(new.holder_groups), new.mode,
                 float(new.since), float(new.expires_at), new.fence),
            )
            await db.execute(
                "INSERT INTO proctor_claim_fences (connector, resource, fence) VALUES (?, ?, ?) "
                "ON CONFLICT (connector, resource) DO UPDATE SET fence = excluded.fence",
                (old.connector, old.resource, new_fence),
            )
        return old, new

    async def expire_claims(self, now: float) -> list[Claim]:
        async with self._write("expire_claims") as db:
            async with db.execute(f"DELETE FROM proctor_claims WHERE expires_at <= ? RETURNING {CLAIM_COLUMNS}",
                                  (float(now),)) as cur:
                return [claim_from_row(r) for r in await cur.fetchall()]

    async def sweep_claims(self, now: float) -> int:
        async with self._write("sweep_claims") as db:
            async with db.execute("DELETE FROM proctor_claims WHERE expires_at <= ?", (float(now),)) as cur:
                return int(cur.rowcount or 0)

    # ---- ETags agents saw (optimistic concurrency) --------------------------
    async def remember_etag(self, e: SeenETag) -> None:
        params = etag_params(e)
        async with self._write("remember_etag") as db:
            await db.execute(
                f"INSERT INTO proctor_etags ({ETAG_SELECT}) VALUES ({', '.join('?' for _ in ETAG_COLUMNS)}) "
                "ON CONFLICT (connector, resource, agent_id) DO UPDATE SET etag = excluded.etag, "
                "seen_at = excluded.seen_at, expires_at = excluded.expires_at, decision_id = excluded.decision_id",
                params,
            )

    async def etag_seen(self, connector: str, resource: str, agent_id: str, now: float) -> SeenETag | None:
        row = await self._fetchone(
            "etag_seen",
            f"SELECT {ETAG_SELECT} FROM proctor_etags WHERE connector = ? AND resource = ? AND agent_id = ? "
            "AND expires_at > ?",
            (connector, resource, agent_id, float(now)),
        )
        return None if row is None else etag_from_row(row)

    async def forget_etag(self, connector: str, resource: str, agent_id: str) -> bool:
        async with self._write("forget_etag") as db:
            async with db.execute("DELETE FROM proctor_etags WHERE connector = ? AND resource = ? AND agent_id = ?",
                                  (connector, resource, agent_id)) as cur:
                return bool(cur.rowcount == 1)

    async def sweep_etags(self, now: float) -> int:
        async with self._write("sweep_etags") as db:
            async with db.execute("DELETE FROM proctor_etags WHERE expires_at <= ?", (float(now),)) as cur:
                return int(cur.rowcount or 0)

    # ---- workflows (proxy/workflows/; store/workflows.py) ------------------
    async def workflow_instance(self, instance_id: str) -> Instance | None:
        row = await self._fetchone("workflow_instance",
                                   f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE id = ?", (instance_id,))
        return None if row is None else instance_from_row(row)

    async def workflow_instance_for(self, workflow: str, objects: Sequence[tuple[str, str]]) -> Instance | None:
        for object_type, object_id in objects:
            row = await self._fetchone(
                "workflow_instance_for",
                f"SELECT {_WF_JOINED} FROM proctor_wf_objects o JOIN proctor_wf_instances i ON i.id = o.instance_id "
                "WHERE o.workflow = ? AND o.object_type = ? AND o.object_id = ?",
                (workflow, object_type, object_id),
            )
            if row is not None:
                return instance_from_row(row)
        return None

    async def record_workflow_event(self, event: StepEvent, *, required: Sequence[str],
                                    links: Sequence[tuple[str, str]], create: bool) -> Instance | None:
        params = event_params(event)

        def txn(conn: sqlite3.Connection) -> Instance | None:
            row = conn.execute(f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE id = ?",
                               (event.instance_id,)).fetchone()
            if row is None and not create:
                return None
            inst = instance_from_row(row) if row is not None else Instance(
                id=event.instance_id, workflow=event.workflow, state=RUNNING, started_at=event.time,
                updated_at=event.time)
            apply_event(inst, event, required)
            values = instance_params(inst)
            if row is None:
                conn.execute(f"INSERT INTO proctor_wf_instances ({INSTANCE_SELECT}) VALUES "
                             f"({', '.join('?' for _ in INSTANCE_COLUMNS)})", values)
            else:
                conn.execute(f"UPDATE proctor_wf_instances SET {_WF_SET} WHERE id = ?", [*values[1:], inst.id])
            conn.execute(f"INSERT INTO proctor_wf_events ({', '.join(EVENT_COLUMNS)}) VALUES "
                         f"({', '.join('?' for _ in EVENT_COLUMNS)})", params)
            if links:
                # (an object another instance already has stays there: it names that one)
                conn.executemany(
                    "INSERT INTO proctor_wf_objects (workflow, object_type, object_id, instance_id, step, linked_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (workflow, object_type, object_id) DO NOTHING",
                    [(event.workflow, t, i, inst.id, event.step, float(event.time)) for t, i in links],
                )
            return inst

        return await self._transaction("record_workflow_event", txn)

    async def update_workflow_attrs(self, instance_id: str, attrs: dict[str, Any], *, expect_version: int) -> bool:
        async with self._write("update_workflow_attrs") as db:
            async with db.execute(
                "UPDATE proctor_wf_instances SET attrs = ?, version = version + 1 WHERE id = ? AND version = ?",
                (dump_json(attrs), instance_id, int(expect_version)),
            ) as cur:
                return bool(cur.rowcount == 1)

    async def list_workflow_instances(self, *, workflow: str | None = None, state: str | None = None,
                                      since: float | None = None, limit: int = 100, before: float | None = None,
                                      flagged: str | None = None) -> list[Instance]:
        sql = f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE 1 = 1"
        params: list[Any] = []
        for column, value in (("workflow", workflow), ("state", state)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            sql += " AND updated_at >= ?"
            params.append(float(since))
        if before is not None:
            sql += " AND updated_at < ?"
            params.append(float(before))
        if flagged is not None:
            sql += " AND attrs LIKE ?"
            params.append(flag_pattern(flagged))
        rows = await self._fetchall("list_workflow_instances", sql + " ORDER BY updated_at DESC, id LIMIT ?",
                                    [*params, max(0, int(limit))])
        return [instance_from_row(r) for r in rows]

    async def workflow_events(self, *, instance_id: str | None = None, workflow: str | None = None,
                              since: float | None = None, after_seq: int = 0, limit: int = 10000) -> list[StepEvent]:
        sql = f"SELECT {EVENT_SELECT} FROM proctor_wf_events WHERE seq > ?"
        params: list[Any] = [int(after_seq)]
        for column, value in (("instance_id", instance_id), ("workflow", workflow)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            sql += " AND time >= ?"
            params.append(float(since))
        rows = await self._fetchall("workflow_events", sql + " ORDER BY seq LIMIT ?", [*params, max(0, int(limit))])
        return [event_from_row(r) for r in rows]

    async def workflow_objects(self, *, instance_id: str | None = None,
                               workflow: str | None = None) -> list[WorkflowObject]:
        sql = f"SELECT {WF_OBJECT_SELECT} FROM proctor_wf_objects WHERE 1 = 1"
        params: list[Any] = []
        for column, value in (("instance_id", instance_id), ("workflow", workflow)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = await self._fetchall("workflow_objects", sql + " ORDER BY linked_at, object_type, object_id", params)
        return [object_from_row(r) for r in rows]

    async def count_workflow_instances(self) -> dict[tuple[str, str], int]:
        rows = await self._fetchall("count_workflow_instances", "SELECT workflow, state, COUNT(*) FROM "
                                    "proctor_wf_instances GROUP BY workflow, state")
        return {(str(w), str(s)): int(n) for w, s, n in rows}

    # ---- counters: rate limits and budget ledgers (proxy/limits/; store/counters.py) ----
    # Each is one BEGIN IMMEDIATE transaction in one worker-thread hop: every process sharing
    # the file queues on the write lock, so read, decision and write are one step for all.
    async def update_rate_limit(self, key: str, fn: Callable[[RateState | None], tuple[RateState | None, T]],
                                *, now: float) -> T:
        check_key("rate-limit key", key)
        check_times(now=now)

        def txn(conn: sqlite3.Connection) -> T:
            row = conn.execute("SELECT tat_ms, tat_frac, tat_den FROM proctor_rate_limits WHERE key = ? AND "
                               "expires_at > ?", (key, float(now))).fetchone()
            state = None if row is None else RateState(int(row[0]), int(row[1]), int(row[2]))
            new, result = fn(state)
            if new is not None and new != state:
                conn.execute(
                    "INSERT INTO proctor_rate_limits (key, tat_ms, tat_frac, tat_den, expires_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET tat_ms = excluded.tat_ms, tat_frac = excluded.tat_frac, "
                    "tat_den = excluded.tat_den, expires_at = excluded.expires_at",
                    (key, new.tat_ms, new.frac, new.den, new.expires_at))
            return result

        return await self._transaction("update_rate_limit", txn)

    async def sweep_rate_limits(self, now: float) -> int:
        check_times(now=now)
        return await self._transaction("sweep_rate_limits", lambda conn: int(conn.execute(
            "DELETE FROM proctor_rate_limits WHERE expires_at <= ?", (float(now),)).rowcount or 0))

    @staticmethod
    def _budget_state(conn: sqlite3.Connection, budget_key: str, window_id: str, now: float) -> BudgetUsage:
        row = conn.execute("SELECT spent FROM proctor_budget_usage WHERE budget_key = ? AND window_id = ?",
                           (budget_key, window_id)).fetchone()
        held = conn.execute("SELECT amount FROM proctor_budget_reservations WHERE budget_key = ? AND window_id = ? "
                            "AND state = ? AND expires_at > ?", (budget_key, window_id, HELD, float(now))).fetchall()
        return BudgetUsage(spent=parse_dec(row[0]) if row is not None else ZERO,
                           reserved=dsum(parse_dec(r[0]) for r in held))

    @staticmethod
    def _book(conn: sqlite3.Connection, budget_key: str, window_id: str, amount: Decimal, now: float) -> None:
        row = conn.execute("SELECT spent FROM proctor_budget_usage WHERE budget_key = ? AND window_id = ?",
                           (budget_key, window_id)).fetchone()
        spent = add(parse_dec(row[0]) if row is not None else ZERO, amount)
        conn.execute("INSERT INTO proctor_budget_usage (budget_key, window_id, spent, updated_at) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (budget_key, window_id) DO UPDATE SET spent = excluded.spent, "
                     "updated_at = excluded.updated_at", (budget_key, window_id, dec_text(spent), float(now)))

    async def reserve_budget(self, *, budget_key: str, window_id: str, reservation_id: str, amount: Decimal,
                             limit: Decimal, now: float, expires_at: float, purge_at: float,
                             force: bool = False) -> ReserveOutcome:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        check_key("reservation id", reservation_id)
        amount, limit = check_amount("amount", amount), check_amount("limit", limit)
        check_times(now=now, expires_at=expires_at, purge_at=purge_at)
        if purge_at < expires_at:
            raise ValueError("a reservation is purged no earlier than it expires")

        def txn(conn: sqlite3.Connection) -> ReserveOutcome | None:
            conn.execute("DELETE FROM proctor_budget_reservations WHERE budget_key = ? AND window_id = ? AND "
                         "purge_at <= ?", (budget_key, window_id, float(now)))
            usage = self._budget_state(conn, budget_key, window_id, now)
            out = reserve_decision(usage.spent, usage.reserved, amount, limit, force)
            if out.placed:
                if conn.execute("SELECT 1 FROM proctor_budget_reservations WHERE id = ?", (reservation_id,)).fetchone():
                    return None
                conn.execute(
                    "INSERT INTO proctor_budget_reservations (id, budget_key, window_id, amount, state, actual, "
                    "created_at, expires_at, purge_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                    (reservation_id, budget_key, window_id, dec_text(amount), HELD, float(now), float(expires_at),
                     float(purge_at)))
            return out

        out = await self._transaction("reserve_budget", txn)
        if out is None:
            raise ValueError(f"reservation id {reservation_id!r} is already in use")
        return out

    async def settle_budget(self, reservation_id: str, actual: Decimal, *, now: float) -> SettleOutcome | None:
        check_key("reservation id", reservation_id)
        actual = check_amount("actual amount", actual)
        check_times(now=now)

        def txn(conn: sqlite3.Connection) -> SettleOutcome | None:
            row = conn.execute("SELECT budget_key, window_id, amount, state, actual, expires_at FROM "
                               "proctor_budget_reservations WHERE id = ? AND purge_at > ?", (reservation_id, float(now))).fetchone()
            if row is None:
                return None
            budget_key, window_id, amount, state, earlier, expires_at = row
            late = False
            if state == HELD:
                conn.execute("UPDATE proctor_budget_reservations SET state = ?, actual = ? WHERE id = ?",
                             (SETTLED, dec_text(actual), reservation_id))
                self._book(conn, budget_key, window_id, actual, now)
                status, booked, late = "settled", actual, float(expires_at) <= now
            elif state == SETTLED:
                status, booked = "already-settled", parse_dec(earlier)
            else:
                status, booked = "released", ZERO
            usage = self._budget_state(conn, budget_key, window_id, now)
            return SettleOutcome(status=status, budget_key=budget_key, window_id=window_id, amount=parse_dec(amount),
                                 actual=booked, late=late, spent=usage.spent, reserved=usage.reserved)

        return await self._transaction("settle_budget", txn)

    async def release_budget(self, reservation_id: str) -> bool:
        check_key("reservation id", reservation_id)
        return await self._transaction("release_budget", lambda conn: conn.execute(
            "UPDATE proctor_budget_reservations SET state = ? WHERE id = ? AND state = ?",
            (RELEASED, reservation_id, HELD)).rowcount == 1)

    async def charge_budget(self, *, budget_key: str, window_id: str, amount: Decimal, now: float) -> BudgetUsage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        amount = check_amount("amount", amount)
        check_times(now=now)

        def txn(conn: sqlite3.Connection) -> BudgetUsage:
            self._book(conn, budget_key, window_id, amount, now)
            return self._budget_state(conn, budget_key, window_id, now)

        return await self._transaction("charge_budget", txn)

    async def budget_usage(self, budget_key: str, window_id: str, *, now: float) -> BudgetUsage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        check_times(now=now)
        row = await self._fetchone("budget_usage", "SELECT spent FROM proctor_budget_usage WHERE budget_key = ? AND "
                                   "window_id = ?", (budget_key, window_id))
        held = await self._fetchall("budget_usage", "SELECT amount FROM proctor_budget_reservations WHERE "
                                    "budget_key = ? AND window_id = ? AND state = ? AND expires_at > ?",
                                    (budget_key, window_id, HELD, float(now)))
        return BudgetUsage(spent=parse_dec(row[0]) if row is not None else ZERO,
                           reserved=dsum(parse_dec(r[0]) for r in held))

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int, *,
                             now: float) -> list[tuple[str, BudgetUsage]]:
        check_listing(window_id, key_prefix, limit)
        check_times(now=now)
        # The prefix as a key range (the primary key's and the reservation index's order: BINARY,
        # code points) and, to be exact whatever sorts after it, the prefix itself.
        where, args = "", []
        if key_prefix:
            where = " AND budget_key >= ? AND budget_key < ? AND substr(budget_key, 1, ?) = ?"
            args = [key_prefix, key_prefix + "\U0010ffff", len(key_prefix), key_prefix]
        at = float(now)
        rows = await self._fetchall(
            "budget_windows",
            "WITH keys AS (SELECT k FROM ("
            f"SELECT budget_key AS k FROM proctor_budget_usage WHERE window_id = ? AND spent != '0'{where} UNION "
            f"SELECT budget_key FROM proctor_budget_reservations WHERE window_id = ? AND state = ? AND expires_at > ?{where}"
            ") ORDER BY k LIMIT ?) "
            "SELECT u.budget_key, 'spent', u.spent FROM keys JOIN proctor_budget_usage u "
            "ON u.budget_key = keys.k AND u.window_id = ? UNION ALL "
            "SELECT r.budget_key, 'held', r.amount FROM keys JOIN proctor_budget_reservations r "
            "ON r.budget_key = keys.k AND r.window_id = ? AND r.state = ? AND r.expires_at > ?",
            (window_id, *args, window_id, HELD, at, *args, int(limit), window_id, window_id, HELD, at))
        return usage_by_key((str(k), str(kind), amount) for k, kind, amount in rows)

    async def sweep_budgets(self, now: float, *, idle_before: float | None = None) -> int:
        check_times(now=now)
        if idle_before is not None:
            check_times(idle_before=idle_before)

        def txn(conn: sqlite3.Connection) -> int:
            n = int(conn.execute("DELETE FROM proctor_budget_reservations WHERE purge_at <= ?",
                                 (float(now),)).rowcount or 0)
            if idle_before is not None:
                n += int(conn.execute(
                    "DELETE FROM proctor_budget_usage WHERE updated_at < ? AND NOT EXISTS (SELECT 1 FROM "
                    "proctor_budget_reservations r WHERE r.budget_key = proctor_budget_usage.budget_key AND "
                    "r.window_id = proctor_budget_usage.window_id)", (float(idle_before),)).rowcount or 0)
            return n

        return await self._transaction("sweep_budgets", txn)
