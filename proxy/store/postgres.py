"""PostgreSQL backend (scale-out): an asyncpg pool shared by every replica.

Tables live in one schema (`schema=`, default "public"), set as the
`search_path` of every pooled connection. Schema creation and migration run in
one transaction behind `pg_advisory_xact_lock`, so replicas starting together
do not race. Concurrency between replicas relies on row locks: the approval
compare-and-set is a single `UPDATE ... WHERE version = $n`.

The store's identity (a row written when the schema is created) is read back
by `check()`: a schema that was dropped, emptied or swapped for another
store's is noticed and the store is marked lost. Suspensions and resumptions
commit with `synchronous_commit = on` whatever the server's default, so an
acknowledged one survives a server crash.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

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
from .approval_holds import MIGRATION_V8, NEVER, find_sql_postgres, hold_sql_postgres
from .pg_bounds import BoundedPool, InFlight, gate, socket_tuner
from .idempotency import (IDEMPOTENCY_COLUMNS, IDEMPOTENCY_LIST_SELECT, IDEMPOTENCY_SELECT, SCOPE_PREFIXES,
                          IdempotencyEntry, entry_from_row, entry_params)
from .claims import CLAIM_COLUMNS, Claim, ClaimOutcome, claim_from_row, decide, hand_over
from .etags import ETAG_COLUMNS, ETAG_SELECT, SeenETag, etag_from_row, etag_params
from .workflows import (EVENT_COLUMNS, EVENT_SELECT, INSTANCE_COLUMNS, INSTANCE_SELECT, RUNNING, WF_OBJECT_SELECT,
                        Instance, StepEvent, WorkflowObject, apply_event, event_from_row, event_params,
                        instance_from_row, instance_params, object_from_row)
from .workflows import WF_JOINED as _WF_JOINED
from .workflows import flag_pattern
from .workflows import WF_SET_PG as _WF_SET_PG
from .counters import (HELD, RELEASED, SETTLED, ZERO, BudgetUsage, RateState, ReserveOutcome, SettleOutcome,
                       check_amount, check_key, check_listing, check_times, parse_dec, reserve_decision)
from .models import AgentRecord, Approval, PolicyRevision, ReplicaBeat, Suspension

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
log = logging.getLogger("proctor.store")
# pg_advisory_xact_lock(int4, int4): this constant + hashtext(schema name).
_MIGRATION_LOCK = 0x50524F43  # "PROC"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE proctor_approvals (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            agent_id TEXT NOT NULL,
            action TEXT NOT NULL,
            resource_type TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            connector TEXT NOT NULL,
            required_groups JSON NOT NULL,
            fingerprint TEXT NOT NULL,
            idempotency_key TEXT,
            mode TEXT NOT NULL,
            decision_id TEXT NOT NULL,
            request JSON NOT NULL,
            derived JSON NOT NULL,
            escalate_at DOUBLE PRECISION,
            escalated BOOLEAN NOT NULL DEFAULT FALSE,
            votes JSON NOT NULL,
            decided_at DOUBLE PRECISION,
            decided_by TEXT,
            reason TEXT,
            forwarded_at DOUBLE PRECISION,
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
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (resource_type, resource_id)
        )""",
        """CREATE TABLE proctor_agents (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT '',
            team TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            registered BOOLEAN NOT NULL DEFAULT FALSE,
            first_seen DOUBLE PRECISION,
            last_seen DOUBLE PRECISION,
            requests BIGINT NOT NULL DEFAULT 0,
            allowed BIGINT NOT NULL DEFAULT 0,
            denied BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE proctor_suspensions (
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            suspended_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (kind, target)
        )""",
        """CREATE TABLE proctor_policy_revisions (
            revision TEXT PRIMARY KEY,
            loaded_at DOUBLE PRECISION NOT NULL,
            files JSON NOT NULL,
            active BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        "CREATE INDEX proctor_policy_revisions_loaded ON proctor_policy_revisions (loaded_at)",
        "CREATE TABLE proctor_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        f"INSERT INTO proctor_meta (key, value) VALUES ('{SUSPENSIONS_VERSION_KEY}', 0)",
    ),
    2: (
        # One row, written when the store is created (see _migrate): the store's identity.
        """CREATE TABLE proctor_store_identity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            store_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
    ),
    3: (
        # Coordination (issue 12; docs/coordination.md).
        # -- claims (proxy/coordination/claims.py) --
        # One row per holder (shared claims have several); expired rows are ignored and
        # swept by the next change. The fence row per resource outlives its claims and is
        # the row every acquire locks first (acquire_claim).
        """CREATE TABLE proctor_claims (
            id TEXT PRIMARY KEY,
            connector TEXT NOT NULL,
            resource TEXT NOT NULL,
            holder TEXT NOT NULL,
            holder_groups TEXT NOT NULL,
            mode TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            fence BIGINT NOT NULL,
            UNIQUE (connector, resource, holder)
        )""",
        "CREATE INDEX proctor_claims_expiry ON proctor_claims (expires_at)",
        """CREATE TABLE proctor_claim_fences (
            connector TEXT NOT NULL,
            resource TEXT NOT NULL,
            fence BIGINT NOT NULL,
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
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            status INTEGER,
            headers TEXT NOT NULL,
            body BYTEA,
            body_stored BOOLEAN NOT NULL DEFAULT FALSE,
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
            seen_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
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
            started_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            completed_at DOUBLE PRECISION,
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
            linked_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (workflow, object_type, object_id)
        )""",
        "CREATE INDEX proctor_wf_objects_instance ON proctor_wf_objects (instance_id)",
        """CREATE TABLE proctor_wf_events (
            seq BIGSERIAL PRIMARY KEY,
            instance_id TEXT NOT NULL,
            workflow TEXT NOT NULL,
            step TEXT NOT NULL,
            action TEXT NOT NULL,
            agent TEXT NOT NULL,
            decision_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            status INTEGER,
            time DOUBLE PRECISION NOT NULL,
            duration_ms DOUBLE PRECISION NOT NULL,
            approval_wait_ms DOUBLE PRECISION,
            human BOOLEAN NOT NULL DEFAULT FALSE,
            cost TEXT NOT NULL,
            objects TEXT NOT NULL
        )""",
        "CREATE INDEX proctor_wf_events_instance ON proctor_wf_events (instance_id, seq)",
        "CREATE INDEX proctor_wf_events_time ON proctor_wf_events (workflow, time)",
    ),
    6: (
        # Counters (proxy/limits/, proxy/store/counters.py): GCRA state per rate-limit key (the TAT
        # as whole ms + tat_frac/tat_den ms), budget spend per (budget, window) and reservations.
        # Amounts are NUMERIC (exact), never floating point.
        """CREATE TABLE proctor_rate_limits (
            key TEXT PRIMARY KEY,
            tat_ms BIGINT NOT NULL,
            tat_frac BIGINT NOT NULL,
            tat_den BIGINT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX proctor_rate_limits_expires ON proctor_rate_limits (expires_at)",
        """CREATE TABLE proctor_budget_usage (
            budget_key TEXT NOT NULL,
            window_id TEXT NOT NULL,
            spent NUMERIC NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (budget_key, window_id)
        )""",
        """CREATE TABLE proctor_budget_reservations (
            id TEXT PRIMARY KEY,
            budget_key TEXT NOT NULL,
            window_id TEXT NOT NULL,
            amount NUMERIC NOT NULL,
            state TEXT NOT NULL,
            actual NUMERIC,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            purge_at DOUBLE PRECISION NOT NULL
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
            reload_ok BOOLEAN NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL
        )""",
    ),
    8: MIGRATION_V8,  # one answering approval per request, enforced by the store (store/approval_holds.py)
    # Fleet views (proxy/control/fleet_views.py): where each replica's control API is reached.
    9: ("ALTER TABLE proctor_replicas ADD COLUMN control_url TEXT",),
}
assert max(_MIGRATIONS) == SCHEMA_VERSION

T = TypeVar("T")
# Counters: the budget window's usage row is the lock every reserve and settle takes first
# (created when absent), so reservations of one window queue across replicas; each later
# statement then reads what the one before committed (READ COMMITTED, statement snapshot).
_LOCK_BUDGET = (
    "INSERT INTO proctor_budget_usage AS u (budget_key, window_id, spent, updated_at) VALUES ($1, $2, 0, $3) "
    "ON CONFLICT (budget_key, window_id) DO UPDATE SET spent = u.spent RETURNING spent"
)
# (purge_at >= expires_at, so what the CTE purges is expired and not summed either way)
_PURGE_AND_HELD = (
    "WITH purged AS (DELETE FROM proctor_budget_reservations WHERE budget_key = $1 AND window_id = $2 "
    "AND purge_at <= $3) "
    "SELECT coalesce(sum(amount), 0) FROM proctor_budget_reservations WHERE budget_key = $1 AND window_id = $2 "
    f"AND state = '{HELD}' AND expires_at > $3"
)
_HELD = (
    "SELECT coalesce(sum(amount), 0) FROM proctor_budget_reservations WHERE budget_key = $1 AND window_id = $2 "
    f"AND state = '{HELD}' AND expires_at > $3"
)


class _Rollback(Exception):
    """Ends a transaction without committing (not an error of the store)."""

# Insert-if-absent is the arbiter (one statement; the unique key serialises replicas): a live
# row is left alone (no row returned), an expired one replaced.
_RESERVE_IDEM = (
    f"INSERT INTO proctor_idempotency ({IDEMPOTENCY_SELECT}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(IDEMPOTENCY_COLUMNS)))}) "
    "ON CONFLICT (scope, key) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in IDEMPOTENCY_COLUMNS[2:])
    + f" WHERE proctor_idempotency.expires_at <= ${len(IDEMPOTENCY_COLUMNS) + 1} RETURNING owner"
)
_GET_IDEM = f"SELECT {IDEMPOTENCY_SELECT} FROM proctor_idempotency WHERE scope = $1 AND key = $2 AND expires_at > $3"
_N = len(APPROVAL_COLUMN_NAMES)
_INSERT_APPROVAL = (
    f"INSERT INTO proctor_approvals ({APPROVAL_SELECT}) VALUES ({', '.join(f'${i}' for i in range(1, _N + 1))})"
)
# $1 = id, $2..$N = every other column (version last), $N+1 = expected version
_UPDATE_APPROVAL = (
    "UPDATE proctor_approvals SET "
    + ", ".join(f"{c} = ${i}" for i, c in enumerate(APPROVAL_COLUMN_NAMES[1:], start=2))
    + f" WHERE id = $1 AND version = ${_N + 1}"
)
# The approval answering a request, by Idempotency-Key (True) or fingerprint (False); and the
# hold: that approval, else the new one (store/approval_holds.py).
_FIND_ANSWERING = {by_key: find_sql_postgres(by_key) for by_key in (True, False)}
_HOLD = {by_key: hold_sql_postgres(by_key) for by_key in (True, False)}
_HOLD_ATTEMPTS = 5
_DUE = (
    f"SELECT {APPROVAL_SELECT} FROM proctor_approvals "
    "WHERE state = $1 AND (expires_at <= $2 OR (escalate_at <= $2 AND NOT escalated)) "
    "ORDER BY created_at, id"
)
_RECORD_CREATOR = (
    "INSERT INTO proctor_resource_creators (resource_type, resource_id, agent_id, decision_id, created_at) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (resource_type, resource_id) DO UPDATE SET "
    "agent_id = EXCLUDED.agent_id, decision_id = EXCLUDED.decision_id, created_at = EXCLUDED.created_at"
)
_UPSERT_AGENT = (
    "INSERT INTO proctor_agents (id, owner, team, description, registered) VALUES ($1, $2, $3, $4, TRUE) "
    "ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, team = EXCLUDED.team, "
    "description = EXCLUDED.description, registered = TRUE"
)
# One statement for the whole batch; rows in id order so concurrent replicas lock rows in the same order.
_AGENT_ACTIVITY = (
    "INSERT INTO proctor_agents AS a (id, first_seen, last_seen, requests, allowed, denied) "
    "SELECT t.id, t.first_seen, t.last_seen, t.requests, t.allowed, t.denied "
    "FROM unnest($1::text[], $2::float8[], $3::float8[], $4::int8[], $5::int8[], $6::int8[]) "
    "AS t(id, first_seen, last_seen, requests, allowed, denied) ORDER BY t.id "
    "ON CONFLICT (id) DO UPDATE SET "
    "first_seen = LEAST(a.first_seen, EXCLUDED.first_seen), "
    "last_seen = GREATEST(a.last_seen, EXCLUDED.last_seen), "
    "requests = a.requests + EXCLUDED.requests, "
    "allowed = a.allowed + EXCLUDED.allowed, "
    "denied = a.denied + EXCLUDED.denied"
)
_BUMP_SUSPENSIONS = "UPDATE proctor_meta SET value = value + 1 WHERE key = $1"
_SELECT_IDENTITY = "SELECT store_id, created_at FROM proctor_store_identity WHERE id = 1"
# Inside a transaction: this commit is acknowledged only once it is flushed (whatever the server default).
_DURABLE_COMMIT = "SET LOCAL synchronous_commit = on"


def _split_dsn(dsn: str) -> tuple[str, dict[str, str]]:
    """Remove Proctor's own query parameters (schema, connect_timeout) from a DSN:
    asyncpg would send unknown ones to the server as settings."""
    parts = urlsplit(dsn)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in ("schema", "connect_timeout"):
            ours[k] = v
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


class PostgresStore(Store):
    kind = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float | None = None,
        command_timeout: float = 10.0,
        staleness_seconds: float | None = None,
    ) -> None:
        self._dsn, extra = _split_dsn(dsn)
        schema = schema if schema is not None else extra.get("schema", "public")
        if not _SCHEMA_RE.match(schema):
            raise ValueError(f"PostgreSQL schema name must match {_SCHEMA_RE.pattern}, got {schema!r}")
        if connect_timeout is None:
            try:
                connect_timeout = float(extra.get("connect_timeout", 5.0))
            except ValueError:
                raise ValueError("connect_timeout in the PostgreSQL URL must be a number of seconds") from None
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        if staleness_seconds is not None:
            self.staleness_seconds = staleness_seconds
        self.command_timeout = command_timeout
        self._inflight = InFlight()
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:  # never shows the DSN: it may hold a password
        return f"PostgresStore(schema={self.schema!r})"

    @property
    def location(self) -> str:
        parts = urlsplit(self._dsn)
        if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
            # a password with an unescaped '/', '?' or '#' ends the URL's authority early: what
            # follows would print part of it as the path (the DSN must be percent-encoded anyway)
            return "postgresql (address not shown: percent-encode the DSN's user and password)"
        try:
            port = parts.port or 5432
        except ValueError:
            port = "?"
        where = f"{parts.hostname or 'localhost'}:{port}{parts.path or ''}"
        return f"postgresql {where} schema {self.schema}"  # never user or password

    # ---- lifecycle -------------------------------------------------------
    async def open(self, *, create: bool = True) -> None:
        if self._pool is not None:
            return
        with backend_errors("open"):
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                # keepalives and TCP_USER_TIMEOUT: a silent network noticed by the kernel too (pg_bounds)
                init=socket_tuner(self.command_timeout, self.staleness_seconds),
                server_settings={"search_path": self.schema, "application_name": "proctor"},
            )
            try:
                identity = await self._migrate(pool, create)
            except BaseException:
                pool.terminate()
                raise
        self._pool = pool
        self.identity = identity

    async def _migrate(self, pool: asyncpg.Pool, create: bool) -> StoreIdentity:
        async with pool.acquire(timeout=self.connect_timeout) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK, self.schema)
            if not create:
                found = await conn.fetchval(
                    "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'proctor_schema_version'",
                    self.schema,
                )
                if not found:
                    raise StoreLostError(f"the state store {self.location} holds no Proctor state")
            exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema)
            if not exists:
                # Identifier, not a value: validated against _SCHEMA_RE above and quoted.
                await conn.execute(f'CREATE SCHEMA "{self.schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS proctor_schema_version "
                "(version INTEGER NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = await conn.fetchval("SELECT max(version) FROM proctor_schema_version")
            current = int(current or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"state store schema version {current} is newer than this Proctor supports ({SCHEMA_VERSION})"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[version]:
                    # not the command timeout: an index on a big table may take minutes, once
                    await conn.execute(stmt, timeout=max(self.command_timeout, 600.0))
                await conn.execute(
                    "INSERT INTO proctor_schema_version (version, applied_at) VALUES ($1, $2)", version, time.time()
                )
            # A new store (or one from before store ids) gets its id now; an existing one keeps it.
            await conn.execute(
                "INSERT INTO proctor_store_identity (id, store_id, created_at) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO NOTHING",
                str(uuid.uuid4()),
                time.time(),
            )
            row = await conn.fetchrow(_SELECT_IDENTITY)
        return StoreIdentity(store_id=str(row[0]), created_at=float(row[1]))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with backend_errors("close"):
            await pool.close()

    # ---- health ------------------------------------------------------------
    async def _verify(self) -> None:
        pool = self._p(gated=False)  # the check is how a store in trouble is found again
        try:
            row = await pool.fetchrow(_SELECT_IDENTITY, timeout=self.check_timeout)
        except asyncpg.UndefinedTableError:
            raise StoreLostError(f"the state store {self.location} has no Proctor tables any more") from None
        except (asyncio.TimeoutError, TimeoutError) as e:
            # asyncpg's own deadline, often just before check()'s: the reason must still say
            # which store (an operator reading /readyz has several replicas and stores)
            raise StoreError(
                f"the state store {self.location} did not answer a check within {self.check_timeout:g} s"
            ) from e
        except Exception as e:  # noqa: BLE001 - unreachable, not lost
            raise StoreError(f"state store {self.location}: check failed: {type(e).__name__}: {e}") from e
        self._check_identity(None if row is None else str(row[0]))

    # ---- plumbing --------------------------------------------------------
    def _p(self, gated: bool = True) -> BoundedPool:
        """The pool, every call bounded in time; StoreError at once while the store is in
        trouble (down, stale or lost) rather than another call hanging on it (pg_bounds)."""
        if self._pool is None:
            raise StoreError("state store is not open")
        self._raise_if_lost()
        if gated:
            gate(self.problem)
        return BoundedPool(self._pool, self.connect_timeout + self.command_timeout, self._inflight)

    def _unanswered(self) -> None:
        aborted = self._inflight.abort()
        if aborted:
            log.warning("closed %d state store connection(s) waiting on a store that does not answer", aborted)

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        pool = self._p()
        with backend_errors(op):
            return await pool.fetch(sql, *args)

    async def _fetchrow(self, op: str, sql: str, *args: Any) -> Any:
        pool = self._p()
        with backend_errors(op):
            return await pool.fetchrow(sql, *args)

    async def _execute(self, op: str, sql: str, *args: Any) -> str:
        pool = self._p()
        with backend_errors(op):
            return await pool.execute(sql, *args)

    @staticmethod
    def _rowcount(status: str) -> int:
        # "UPDATE 1", "DELETE 0", "INSERT 0 1"
        try:
            return int(status.rsplit(" ", 1)[-1])
        except (ValueError, AttributeError):
            return 0

    # ---- approvals -------------------------------------------------------
    async def create_approval(self, a: Approval) -> None:
        with backend_errors("create_approval"):
            params = approval_params(a)
        await self._execute("create_approval", _INSERT_APPROVAL, *params)

    async def get_approval(self, id: str) -> Approval | None:
        row = await self._fetchrow(
            "get_approval", f"SELECT {APPROVAL_SELECT} FROM proctor_approvals WHERE id = $1", id
        )
        return None if row is None else approval_from_row(row)

    @staticmethod
    def _approval_filter(
        states: list[str] | None, agent_id: str | None = None, action: str | None = None
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            params.append(list(states))
            where.append(f"state = ANY(${len(params)}::text[])")
        if agent_id is not None:
            params.append(agent_id)
            where.append(f"agent_id = ${len(params)}")
        if action is not None:
            params.append(action)
            where.append(f"action = ${len(params)}")
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
        n = len(params)
        rows = await self._fetch(
            "list_approvals",
            f"SELECT {APPROVAL_SELECT} FROM proctor_approvals{where} "
            f"ORDER BY created_at DESC, id DESC LIMIT ${n + 1} OFFSET ${n + 2}",
            *params,
            int(limit),
            int(offset),
        )
        return [approval_from_row(r) for r in rows]

    async def count_approvals(self, *, states: list[str] | None = None) -> int:
        if states is not None and not states:
            return 0
        where, params = self._approval_filter(states)
        row = await self._fetchrow("count_approvals", f"SELECT count(*) FROM proctor_approvals{where}", *params)
        return int(row[0])

    async def find_open_approval(
        self, *, agent_id: str, fingerprint: str, idempotency_key: str | None, forwarded_since: float | None = None
    ) -> Approval | None:
        by_key = idempotency_key is not None
        since = NEVER if forwarded_since is None else float(forwarded_since)
        row = await self._fetchrow("find_open_approval", _FIND_ANSWERING[by_key], agent_id,
                                   idempotency_key if by_key else fingerprint, since)
        return None if row is None else approval_from_row(row)

    async def hold_approval(self, a: Approval, *, forwarded_since: float | None = None) -> tuple[Approval, bool]:
        with backend_errors("hold_approval"):
            params = approval_params(a)
        since = NEVER if forwarded_since is None else float(forwarded_since)
        sql = _HOLD[a.idempotency_key is not None]
        for _ in range(_HOLD_ATTEMPTS):
            # Empty only when the insert lost a race: another replica's hold of the same request
            # committed after this statement's snapshot (ON CONFLICT waited for it). Read it next time.
            row = await self._fetchrow("hold_approval", sql, *params, since)
            if row is not None:
                return (a, True) if row[0] else (approval_from_row(tuple(row)[1:]), False)
        raise StoreError(f"state store: hold_approval for {a.id} kept conflicting without a row to attach to")

    async def update_approval(self, a: Approval, *, expect_version: int) -> bool:
        expect_version = int(expect_version)
        with backend_errors("update_approval"):
            params = approval_params(a)
        params[-1] = expect_version + 1
        status = await self._execute("update_approval", _UPDATE_APPROVAL, *params, expect_version)
        changed = self._rowcount(status) == 1
        if changed:
            a.version = expect_version + 1
        return changed

    async def due_approvals(self, now: float) -> list[Approval]:
        rows = await self._fetch("due_approvals", _DUE, "pending", float(now))
        return [approval_from_row(r) for r in rows]

    # ---- resource creators -----------------------------------------------
    async def record_creator(
        self, resource_type: str, resource_id: str, agent_id: str, decision_id: str, at: float
    ) -> None:
        await self._execute(
            "record_creator", _RECORD_CREATOR, resource_type, resource_id, agent_id, decision_id, float(at)
        )

    async def creator_of(self, resource_type: str, resource_id: str) -> str | None:
        row = await self._fetchrow(
            "creator_of",
            "SELECT agent_id FROM proctor_resource_creators WHERE resource_type = $1 AND resource_id = $2",
            resource_type,
            resource_id,
        )
        return None if row is None else row[0]

    # ---- agent registry --------------------------------------------------
    async def upsert_agent(self, rec: AgentRecord) -> None:
        await self._execute("upsert_agent", _UPSERT_AGENT, rec.id, rec.owner, rec.team, rec.description)

    async def record_agent_activity(self, batch: dict[str, tuple[float, float, int, int, int]]) -> None:
        if not batch:
            return
        with backend_errors("record_agent_activity"):
            rows = activity_rows(batch)
        columns = [list(c) for c in zip(*rows)]
        await self._execute("record_agent_activity", _AGENT_ACTIVITY, *columns)

    async def get_agent(self, id: str) -> AgentRecord | None:
        row = await self._fetchrow("get_agent", f"SELECT {AGENT_SELECT} FROM proctor_agents WHERE id = $1", id)
        return None if row is None else agent_from_row(row)

    async def list_agents(self) -> list[AgentRecord]:
        rows = await self._fetch("list_agents", f"SELECT {AGENT_SELECT} FROM proctor_agents ORDER BY id")
        return [agent_from_row(r) for r in rows]

    # ---- suspensions -----------------------------------------------------
    async def suspend(self, s: Suspension) -> None:
        check_kind(s.kind)
        pool = self._p()
        with backend_errors("suspend"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_DURABLE_COMMIT)
                await conn.execute(
                    "INSERT INTO proctor_suspensions (kind, target, since, suspended_by, reason) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, target) DO UPDATE SET "
                    "since = EXCLUDED.since, suspended_by = EXCLUDED.suspended_by, reason = EXCLUDED.reason",
                    s.kind,
                    s.target,
                    float(s.since),
                    s.by,
                    s.reason,
                )
                await conn.execute(_BUMP_SUSPENSIONS, SUSPENSIONS_VERSION_KEY)

    async def resume(self, kind: str, target: str) -> bool:
        check_kind(kind)
        pool = self._p()
        with backend_errors("resume"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_DURABLE_COMMIT)
                status = await conn.execute(
                    "DELETE FROM proctor_suspensions WHERE kind = $1 AND target = $2", kind, target
                )
                removed = self._rowcount(status) > 0
                if removed:
                    await conn.execute(_BUMP_SUSPENSIONS, SUSPENSIONS_VERSION_KEY)
        return removed

    async def list_suspensions(self) -> list[Suspension]:
        rows = await self._fetch(
            "list_suspensions", f"SELECT {SUSPENSION_SELECT} FROM proctor_suspensions ORDER BY kind, target"
        )
        return [suspension_from_row(r) for r in rows]

    async def suspensions_version(self) -> int:
        row = await self._fetchrow(
            "suspensions_version", "SELECT value FROM proctor_meta WHERE key = $1", SUSPENSIONS_VERSION_KEY
        )
        return 0 if row is None else int(row[0])

    # ---- policy revisions ------------------------------------------------
    async def save_revision(self, r: PolicyRevision, keep: int = 20) -> None:
        check_keep(keep)
        pool = self._p()
        with backend_errors("save_revision"):
            files = dump_json(dict(r.files))
            async with pool.acquire() as conn, conn.transaction():
                # One writer at a time, so two replicas never leave two active revisions.
                await conn.execute("LOCK TABLE proctor_policy_revisions IN SHARE ROW EXCLUSIVE MODE")
                await conn.execute(
                    "UPDATE proctor_policy_revisions SET active = FALSE WHERE active AND revision <> $1", r.revision
                )
                await conn.execute(
                    "INSERT INTO proctor_policy_revisions (revision, loaded_at, files, active) "
                    "VALUES ($1, $2, $3, TRUE) ON CONFLICT (revision) DO UPDATE SET "
                    "loaded_at = EXCLUDED.loaded_at, files = EXCLUDED.files, active = TRUE",
                    r.revision,
                    float(r.loaded_at),
                    files,
                )
                await conn.execute(
                    "DELETE FROM proctor_policy_revisions WHERE NOT active AND revision NOT IN ("
                    "SELECT revision FROM proctor_policy_revisions ORDER BY loaded_at DESC, revision DESC LIMIT $1)",
                    int(keep),
                )
        r.active = True

    # ---- cross-replica events (proxy/store/events.py) ------------------------
    async def notify(self, channel: str, payload: str) -> None:
        await self._execute("notify", "SELECT pg_notify($1, $2)", channel, payload)

    async def listener_connection(self) -> Any:
        """A connection of its own for LISTEN (outside the pool: it stays open and idle)."""
        with backend_errors("listen"):
            return await asyncpg.connect(self._dsn, timeout=self.connect_timeout,
                                         server_settings={"application_name": "proctor-listen"})

    async def active_revision(self) -> str | None:
        row = await self._fetchrow("active_revision",
                                   "SELECT revision FROM proctor_policy_revisions WHERE active LIMIT 1")
        return None if row is None else str(row[0])

    async def activate_revision(self, revision: str) -> bool:
        pool = self._p()
        with backend_errors("activate_revision"):
            async with pool.acquire() as conn, conn.transaction():
                # (the lock save_revision takes: never two active revisions)
                await conn.execute("LOCK TABLE proctor_policy_revisions IN SHARE ROW EXCLUSIVE MODE")
                if await conn.fetchrow("SELECT 1 FROM proctor_policy_revisions WHERE revision = $1", revision) is None:
                    return False
                await conn.execute("UPDATE proctor_policy_revisions SET active = (revision = $1) "
                                   "WHERE active OR revision = $1", revision)
                return True

    async def heartbeat_replica(self, beat: ReplicaBeat) -> None:
        await self._execute(
            "heartbeat_replica",
            "INSERT INTO proctor_replicas (replica_id, hostname, policy_source, revision, following, reload_ok, "
            "started_at, last_seen, control_url) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (replica_id) DO UPDATE SET "
            "hostname = EXCLUDED.hostname, policy_source = EXCLUDED.policy_source, revision = EXCLUDED.revision, "
            "following = EXCLUDED.following, reload_ok = EXCLUDED.reload_ok, started_at = EXCLUDED.started_at, "
            "last_seen = EXCLUDED.last_seen, control_url = EXCLUDED.control_url",
            beat.replica_id, beat.hostname, beat.policy_source, beat.revision, beat.following, bool(beat.reload_ok),
            float(beat.started_at), float(beat.last_seen), beat.control_url)

    async def list_replicas(self, seen_since: float) -> list[ReplicaBeat]:
        await self._execute("list_replicas", "DELETE FROM proctor_replicas WHERE last_seen < $1", float(seen_since))
        rows = await self._fetch(
            "list_replicas", f"SELECT {REPLICA_SELECT} FROM proctor_replicas ORDER BY replica_id")
        return [replica_from_row(r) for r in rows]

    async def list_revisions(self) -> list[PolicyRevision]:
        rows = await self._fetch(
            "list_revisions",
            f"SELECT {REVISION_SELECT} FROM proctor_policy_revisions ORDER BY loaded_at DESC, revision DESC",
        )
        return [revision_from_row(r) for r in rows]

    async def get_revision(self, revision: str) -> PolicyRevision | None:
        row = await self._fetchrow(
            "get_revision",
            f"SELECT {REVISION_SELECT} FROM proctor_policy_revisions WHERE revision = $1",
            revision,
        )
        return None if row is None else revision_from_row(row)

    # ---- idempotency keys and dedupe windows -------------------------------
    async def reserve_idempotency(self, e: IdempotencyEntry, now: float) -> IdempotencyEntry | None:
        params = [*entry_params(e), float(now)]
        for _ in range(5):
            won = await self._fetchrow("reserve_idempotency", _RESERVE_IDEM, *params)
            if won is not None:
                return None
            row = await self._fetchrow("reserve_idempotency", _GET_IDEM, e.scope, e.key, float(now))
            if row is not None:
                return entry_from_row(row)
            # released or expired between the two statements: try to take it again
        raise StoreError("state store: reserve_idempotency kept changing under concurrent requests")

    async def get_idempotency(self, scope: str, key: str, now: float) -> IdempotencyEntry | None:
        row = await self._fetchrow("get_idempotency", _GET_IDEM, scope, key, float(now))
        return None if row is None else entry_from_row(row)

    async def complete_idempotency(self, e: IdempotencyEntry) -> bool:
        p = entry_params(e)
        done = await self._execute(
            "complete_idempotency",
            "UPDATE proctor_idempotency SET state = $1, status = $2, headers = $3, body = $4, body_stored = $5, "
            "expires_at = $6 WHERE scope = $7 AND key = $8 AND owner = $9 AND state = 'in-progress'",
            p[3], p[8], p[9], p[10], p[11], p[7], e.scope, e.key, e.owner,
        )
        return done == "UPDATE 1"

    async def release_idempotency(self, scope: str, key: str, owner: str) -> bool:
        done = await self._execute(
            "release_idempotency",
            "DELETE FROM proctor_idempotency WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'in-progress'",
            scope, key, owner,
        )
        return done == "DELETE 1"

    async def sweep_idempotency(self, now: float) -> int:
        done = await self._execute("sweep_idempotency", "DELETE FROM proctor_idempotency WHERE expires_at <= $1", float(now))
        return int(done.rpartition(" ")[2] or 0)

    async def list_idempotency(self, now: float, *, kind: str | None = None, agent: str | None = None,
                               limit: int = 1000) -> list[IdempotencyEntry]:
        sql = f"SELECT {IDEMPOTENCY_LIST_SELECT} FROM proctor_idempotency WHERE expires_at > $1"
        params: list[Any] = [float(now)]
        if kind is not None:
            prefix = SCOPE_PREFIXES[kind]
            sql += f" AND substr(scope, 1, ${len(params) + 1}::int) = ${len(params) + 2}"
            params += [len(prefix), prefix]
        if agent is not None:
            sql += f" AND agent_id = ${len(params) + 1}"
            params.append(agent)
        sql += f" ORDER BY created_at DESC, scope, key LIMIT ${len(params) + 1}"
        rows = await self._fetch("list_idempotency", sql, *params, max(0, int(limit)))
        return [entry_from_row(r) for r in rows]

    # ---- claims on resources ---------------------------------------------
    async def acquire_claim(
        self, *, connector: str, resource: str, agent: str, groups: list[str], mode: str, ttl: float, now: float
    ) -> ClaimOutcome:
        pool = self._p()
        with backend_errors("acquire_claim"):
            async with pool.acquire() as conn, conn.transaction():
                # The upsert row-locks the resource's fence row (created on first use) until
                # commit: concurrent acquirers on any replica queue here, and each then reads
                # the claims its predecessor committed (READ COMMITTED, statement snapshot).
                fence = int(await conn.fetchval(
                    "INSERT INTO proctor_claim_fences (connector, resource, fence) VALUES ($1, $2, 0) "
                    "ON CONFLICT (connector, resource) DO UPDATE SET fence = proctor_claim_fences.fence "
                    "RETURNING fence",
                    connector, resource,
                ))
                rows = await conn.fetch(
                    f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE connector = $1 AND resource = $2 "
                    "ORDER BY since, id",
                    connector, resource,
                )
                claims = [claim_from_row(r) for r in rows]
                outcome, new_fence = decide(claims, fence, connector=connector, resource=resource, agent=agent,
                                            groups=groups, mode=mode, ttl=ttl, now=now)
                if outcome.acquired:
                    c = outcome.claim
                    await conn.execute(
                        "DELETE FROM proctor_claims WHERE connector = $1 AND resource = $2 AND (expires_at <= $3 "
                        "OR (holder = $4 AND id <> $5))",
                        connector, resource, float(now), agent, c.id,
                    )
                    await conn.execute(
                        f"INSERT INTO proctor_claims ({CLAIM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                        "ON CONFLICT (id) DO UPDATE SET holder_groups = EXCLUDED.holder_groups, "
                        "mode = EXCLUDED.mode, expires_at = EXCLUDED.expires_at",
                        c.id, connector, resource, agent, dump_json(c.holder_groups), c.mode, float(c.since),
                        float(c.expires_at), c.fence,
                    )
                    if new_fence != fence:
                        await conn.execute(
                            "UPDATE proctor_claim_fences SET fence = $3 WHERE connector = $1 AND resource = $2",
                            connector, resource, new_fence,
                        )
        return outcome

    async def renew_claim(self, claim_id: str, *, agent: str, groups: list[str], mode: str, ttl: float,
                          now: float) -> Claim | None:
        row = await self._fetchrow(
            "renew_claim",
            "UPDATE proctor_claims SET expires_at = GREATEST(expires_at, $1), holder_groups = $2 "
            f"WHERE id = $3 AND holder = $4 AND mode = $5 AND expires_at > $6 RETURNING {CLAIM_COLUMNS}",
            float(now + ttl), dump_json(list(groups)), claim_id, agent, mode, float(now),
        )
        return claim_from_row(row) if row is not None else None

    async def claims_on(self, connector: str, resource: str, now: float) -> list[Claim]:
        rows = await self._fetch(
            "claims_on",
            f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE connector = $1 AND resource = $2 AND expires_at > $3 "
            "ORDER BY since, id",
            connector, resource, float(now),
        )
        return [claim_from_row(r) for r in rows]

    async def list_claims(self, now: float, *, connector: str | None = None) -> list[Claim]:
        rows = await self._fetch(
            "list_claims",
            f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE expires_at > $1 "
            "AND ($2::text IS NULL OR connector = $2) ORDER BY connector, resource, since, id",
            float(now), connector,
        )
        return [claim_from_row(r) for r in rows]

    async def release_claim(self, claim_id: str) -> Claim | None:
        row = await self._fetchrow(
            "release_claim", f"DELETE FROM proctor_claims WHERE id = $1 RETURNING {CLAIM_COLUMNS}", claim_id
        )
        return None if row is None else claim_from_row(row)

    async def transfer_claim(self, claim_id: str, *, to: str, groups: list[str], now: float,
                             ttl: float | None = None) -> tuple[Claim, Claim] | None:
        pool = self._p()
        with backend_errors("transfer_claim"):
            async with pool.acquire() as conn, conn.transaction():
                where = await conn.fetchrow("SELECT connector, resource FROM proctor_claims WHERE id = $1", claim_id)
                if where is None:
                    return None
                connector, resource = str(where[0]), str(where[1])
                # Lock the resource's fence row first, as acquire_claim does: acquirers and
                # transfers on every replica queue here, so the hand-over is one step for them.
                fence = int(await conn.fetchval(
                    "INSERT INTO proctor_claim_fences (connector, resource, fence) VALUES ($1, $2, 0) "
                    "ON CONFLICT (connector, resource) DO UPDATE SET fence = proctor_claim_fences.fence "
                    "RETURNING fence",
                    connector, resource,
                ))
                # (re-read under the lock: a release or another transfer may have ended it meanwhile)
                row = await conn.fetchrow(
                    f"SELECT {CLAIM_COLUMNS} FROM proctor_claims WHERE id = $1 AND expires_at > $2",
                    claim_id, float(now))
                if row is None:
                    return None
                old = claim_from_row(row)
                new, new_fence = hand_over(old, max(fence, old.fence), to=to, groups=groups, now=now, ttl=ttl)
                if new is old:
                    return old, old
                await conn.execute(
                    "DELETE FROM proctor_claims WHERE id = $1 OR (connector = $2 AND resource = $3 AND "
                    "(holder = $4 OR expires_at <= $5))",
                    old.id, connector, resource, to, float(now))
                await conn.execute(
                    f"INSERT INTO proctor_claims ({CLAIM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    new.id, connector, resource, new.holder, dump_json(new.holder_groups), new.mode,
                    float(new.since), float(new.expires_at), new.fence,
                )
                await conn.execute(
                    "UPDATE proctor_claim_fences SET fence = $3 WHERE connector = $1 AND resource = $2",
                    connector, resource, new_fence,
                )
        return old, new

    async def expire_claims(self, now: float) -> list[Claim]:
        rows = await self._fetch(
            "expire_claims", f"DELETE FROM proctor_claims WHERE expires_at <= $1 RETURNING {CLAIM_COLUMNS}", float(now)
        )
        return [claim_from_row(r) for r in rows]

    async def sweep_claims(self, now: float) -> int:
        status = await self._execute("sweep_claims", "DELETE FROM proctor_claims WHERE expires_at <= $1", float(now))
        return self._rowcount(status)

    # ---- ETags agents saw (optimistic concurrency) --------------------------
    async def remember_etag(self, e: SeenETag) -> None:
        params = etag_params(e)
        await self._execute(
            "remember_etag",
            f"INSERT INTO proctor_etags ({ETAG_SELECT}) "
            f"VALUES ({', '.join(f'${i + 1}' for i in range(len(ETAG_COLUMNS)))}) "
            "ON CONFLICT (connector, resource, agent_id) DO UPDATE SET etag = EXCLUDED.etag, "
            "seen_at = EXCLUDED.seen_at, expires_at = EXCLUDED.expires_at, decision_id = EXCLUDED.decision_id",
            *params,
        )

    async def etag_seen(self, connector: str, resource: str, agent_id: str, now: float) -> SeenETag | None:
        row = await self._fetchrow(
            "etag_seen",
            f"SELECT {ETAG_SELECT} FROM proctor_etags WHERE connector = $1 AND resource = $2 AND agent_id = $3 "
            "AND expires_at > $4",
            connector, resource, agent_id, float(now),
        )
        return None if row is None else etag_from_row(row)

    async def forget_etag(self, connector: str, resource: str, agent_id: str) -> bool:
        status = await self._execute(
            "forget_etag", "DELETE FROM proctor_etags WHERE connector = $1 AND resource = $2 AND agent_id = $3",
            connector, resource, agent_id,
        )
        return self._rowcount(status) == 1

    async def sweep_etags(self, now: float) -> int:
        status = await self._execute("sweep_etags", "DELETE FROM proctor_etags WHERE expires_at <= $1", float(now))
        return self._rowcount(status)

    # ---- workflows (proxy/workflows/; store/workflows.py) ------------------
    async def workflow_instance(self, instance_id: str) -> Instance | None:
        row = await self._fetchrow("workflow_instance",
                                   f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE id = $1", instance_id)
        return None if row is None else instance_from_row(row)

    async def workflow_instance_for(self, workflow: str, objects: Sequence[tuple[str, str]]) -> Instance | None:
        for object_type, object_id in objects:
            row = await self._fetchrow(
                "workflow_instance_for",
                f"SELECT {_WF_JOINED} FROM proctor_wf_objects o JOIN proctor_wf_instances i ON i.id = o.instance_id "
                "WHERE o.workflow = $1 AND o.object_type = $2 AND o.object_id = $3",
                workflow, object_type, object_id,
            )
            if row is not None:
                return instance_from_row(row)
        return None

    async def record_workflow_event(self, event: StepEvent, *, required: Sequence[str],
                                    links: Sequence[tuple[str, str]], create: bool) -> Instance | None:
        params = event_params(event)
        pool = self._p()
        with backend_errors("record_workflow_event"):
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE id = $1 FOR UPDATE", event.instance_id)
                if row is None:
                    if not create:
                        return None
                    fresh = Instance(id=event.instance_id, workflow=event.workflow, state=RUNNING,
                                     started_at=event.time, updated_at=event.time)
                    # (an insert racing ours on another replica: take its row, locked, instead)
                    await conn.execute(
                        f"INSERT INTO proctor_wf_instances ({INSTANCE_SELECT}) VALUES "
                        f"({', '.join(f'${n}' for n in range(1, len(INSTANCE_COLUMNS) + 1))}) "
                        "ON CONFLICT (id) DO NOTHING", *instance_params(fresh))
                    row = await conn.fetchrow(
                        f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE id = $1 FOR UPDATE",
                        event.instance_id)
                inst = instance_from_row(row)
                apply_event(inst, event, required)
                values = instance_params(inst)
                await conn.execute(f"UPDATE proctor_wf_instances SET {_WF_SET_PG} WHERE id = $1", *values)
                await conn.execute(
                    f"INSERT INTO proctor_wf_events ({', '.join(EVENT_COLUMNS)}) VALUES "
                    f"({', '.join(f'${n}' for n in range(1, len(EVENT_COLUMNS) + 1))})", *params)
                for object_type, object_id in links:
                    await conn.execute(
                        "INSERT INTO proctor_wf_objects (workflow, object_type, object_id, instance_id, step, "
                        "linked_at) VALUES ($1, $2, $3, $4, $5, $6) "
                        "ON CONFLICT (workflow, object_type, object_id) DO NOTHING",
                        event.workflow, object_type, object_id, inst.id, event.step, float(event.time),
                    )
        return inst

    async def update_workflow_attrs(self, instance_id: str, attrs: dict[str, Any], *, expect_version: int) -> bool:
        done = await self._execute(
            "update_workflow_attrs",
            "UPDATE proctor_wf_instances SET attrs = $1, version = version + 1 WHERE id = $2 AND version = $3",
            dump_json(attrs), instance_id, int(expect_version),
        )
        return done == "UPDATE 1"

    async def list_workflow_instances(self, *, workflow: str | None = None, state: str | None = None,
                                      since: float | None = None, limit: int = 100, before: float | None = None,
                                      flagged: str | None = None) -> list[Instance]:
        rows = await self._fetch(
            "list_workflow_instances",
            f"SELECT {INSTANCE_SELECT} FROM proctor_wf_instances WHERE ($1::text IS NULL OR workflow = $1) "
            "AND ($2::text IS NULL OR state = $2) AND ($3::double precision IS NULL OR updated_at >= $3) "
            "AND ($5::double precision IS NULL OR updated_at < $5) AND ($6::text IS NULL OR attrs LIKE $6) "
            "ORDER BY updated_at DESC, id LIMIT $4",
            workflow, state, None if since is None else float(since), max(0, int(limit)),
            None if before is None else float(before), None if flagged is None else flag_pattern(flagged),
        )
        return [instance_from_row(r) for r in rows]

    async def workflow_events(self, *, instance_id: str | None = None, workflow: str | None = None,
                              since: float | None = None, after_seq: int = 0, limit: int = 10000) -> list[StepEvent]:
        rows = await self._fetch(
            "workflow_events",
            f"SELECT {EVENT_SELECT} FROM proctor_wf_events WHERE seq > $1 "
            "AND ($2::text IS NULL OR instance_id = $2) AND ($3::text IS NULL OR workflow = $3) "
            "AND ($4::double precision IS NULL OR time >= $4) ORDER BY seq LIMIT $5",
            int(after_seq), instance_id, workflow, None if since is None else float(since), max(0, int(limit)),
        )
        return [event_from_row(r) for r in rows]

    async def workflow_objects(self, *, instance_id: str | None = None,
                               workflow: str | None = None) -> list[WorkflowObject]:
        rows = await self._fetch(
            "workflow_objects",
            f"SELECT {WF_OBJECT_SELECT} FROM proctor_wf_objects WHERE ($1::text IS NULL OR instance_id = $1) "
            "AND ($2::text IS NULL OR workflow = $2) ORDER BY linked_at, object_type, object_id",
            instance_id, workflow,
        )
        return [object_from_row(r) for r in rows]

    async def count_workflow_instances(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch("count_workflow_instances", "SELECT workflow, state, COUNT(*) FROM "
                                 "proctor_wf_instances GROUP BY workflow, state")
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    # ---- counters: rate limits and budget ledgers (proxy/limits/; store/counters.py) ----
    async def update_rate_limit(self, key: str, fn: Callable[[RateState | None], tuple[RateState | None, T]],
                                *, now: float) -> T:
        check_key("rate-limit key", key)
        check_times(now=now)
        pool = self._p()
        with backend_errors("update_rate_limit"):
            async with pool.acquire() as conn, conn.transaction():
                # Insert-or-lock the key's row: concurrent hits on every replica queue here.
                row = await conn.fetchrow(
                    "INSERT INTO proctor_rate_limits AS r (key, tat_ms, tat_frac, tat_den, expires_at) "
                    "VALUES ($1, 0, 0, 1, 0) ON CONFLICT (key) DO UPDATE SET tat_ms = r.tat_ms "
                    "RETURNING tat_ms, tat_frac, tat_den, expires_at", key)
                state = None if float(row[3]) <= now else RateState(int(row[0]), int(row[1]), int(row[2]))
                new, result = fn(state)
                if new is not None and new != state:
                    await conn.execute(
                        "UPDATE proctor_rate_limits SET tat_ms = $2, tat_frac = $3, tat_den = $4, expires_at = $5 "
                        "WHERE key = $1", key, new.tat_ms, new.frac, new.den, new.expires_at)
        return result

    async def sweep_rate_limits(self, now: float) -> int:
        check_times(now=now)
        status = await self._execute("sweep_rate_limits", "DELETE FROM proctor_rate_limits WHERE expires_at <= $1",
                                     float(now))
        return self._rowcount(status)

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
        pool = self._p()
        out: ReserveOutcome | None = None
        with backend_errors("reserve_budget"):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    spent = parse_dec(await conn.fetchval(_LOCK_BUDGET, budget_key, window_id, float(now)))
                    reserved = parse_dec(await conn.fetchval(_PURGE_AND_HELD, budget_key, window_id, float(now)))
                    out = reserve_decision(spent, reserved, amount, limit, force)
                    if out.placed:
                        status = await conn.execute(
                            "INSERT INTO proctor_budget_reservations (id, budget_key, window_id, amount, state, actual, "
                            "created_at, expires_at, purge_at) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8) "
                            "ON CONFLICT (id) DO NOTHING",
                            reservation_id, budget_key, window_id, amount, HELD, float(now), float(expires_at),
                            float(purge_at))
                        if self._rowcount(status) != 1:
                            out = None
                            raise _Rollback
            except _Rollback:
                pass
        if out is None:
            raise ValueError(f"reservation id {reservation_id!r} is already in use")
        return out

    async def settle_budget(self, reservation_id: str, actual: Decimal, *, now: float) -> SettleOutcome | None:
        check_key("reservation id", reservation_id)
        actual = check_amount("actual amount", actual)
        check_times(now=now)
        pool = self._p()
        with backend_errors("settle_budget"):
            async with pool.acquire() as conn, conn.transaction():
                where = await conn.fetchrow("SELECT budget_key, window_id FROM proctor_budget_reservations "
                                            "WHERE id = $1 AND purge_at > $2", reservation_id, float(now))
                if where is None:
                    return None
                budget_key, window_id = str(where[0]), str(where[1])
                # The budget window first, as reserve_budget does (one lock order: no deadlock).
                spent = parse_dec(await conn.fetchval(_LOCK_BUDGET, budget_key, window_id, float(now)))
                row = await conn.fetchrow("SELECT amount, state, actual, expires_at FROM proctor_budget_reservations "
                                          "WHERE id = $1 AND purge_at > $2 FOR UPDATE", reservation_id, float(now))
                if row is None:  # (purged meanwhile)
                    return None
                amount, state, earlier, expires_at = row
                late = False
                if state == HELD:
                    await conn.execute("UPDATE proctor_budget_reservations SET state = $2, actual = $3 WHERE id = $1",
                                       reservation_id, SETTLED, actual)
                    spent = parse_dec(await conn.fetchval(
                        "UPDATE proctor_budget_usage SET spent = spent + $3, updated_at = $4 "
                        "WHERE budget_key = $1 AND window_id = $2 RETURNING spent",
                        budget_key, window_id, actual, float(now)))
                    status, booked, late = "settled", actual, float(expires_at) <= now
                elif state == SETTLED:
                    status, booked = "already-settled", parse_dec(earlier)
                else:
                    status, booked = "released", ZERO
                reserved = parse_dec(await conn.fetchval(_HELD, budget_key, window_id, float(now)))
        return SettleOutcome(status=status, budget_key=budget_key, window_id=window_id, amount=parse_dec(amount),
                             actual=booked, late=late, spent=spent, reserved=reserved)

    async def release_budget(self, reservation_id: str) -> bool:
        check_key("reservation id", reservation_id)
        status = await self._execute(
            "release_budget", "UPDATE proctor_budget_reservations SET state = $2 WHERE id = $1 AND state = $3",
            reservation_id, RELEASED, HELD)
        return self._rowcount(status) == 1

    async def charge_budget(self, *, budget_key: str, window_id: str, amount: Decimal, now: float) -> BudgetUsage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        amount = check_amount("amount", amount)
        check_times(now=now)
        row = await self._fetchrow(
            "charge_budget",
            "WITH booked AS (INSERT INTO proctor_budget_usage AS u (budget_key, window_id, spent, updated_at) "
            "VALUES ($1, $2, $4, $3) ON CONFLICT (budget_key, window_id) DO UPDATE SET spent = u.spent + EXCLUDED.spent, "
            "updated_at = EXCLUDED.updated_at RETURNING spent) "
            f"SELECT (SELECT spent FROM booked), ({_HELD})",
            budget_key, window_id, float(now), amount)
        return BudgetUsage(spent=parse_dec(row[0]), reserved=parse_dec(row[1]))

    async def budget_usage(self, budget_key: str, window_id: str, *, now: float) -> BudgetUsage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        check_times(now=now)
        row = await self._fetchrow(
            "budget_usage",
            "SELECT (SELECT spent FROM proctor_budget_usage WHERE budget_key = $1 AND window_id = $2), "
            f"({_HELD})", budget_key, window_id, float(now))
        return BudgetUsage(spent=parse_dec(row[0]), reserved=parse_dec(row[1]))

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int, *,
                             now: float) -> list[tuple[str, BudgetUsage]]:
        check_listing(window_id, key_prefix, limit)
        check_times(now=now)
        # Keys in code point order (COLLATE "C"), as SQLite and the other backends list them; the
        # prefix compared exactly (a LIKE pattern would need escaping, a range the database's collation).
        rows = await self._fetch(
            "budget_windows",
            "WITH keys AS (SELECT k FROM ("
            "SELECT budget_key AS k FROM proctor_budget_usage WHERE window_id = $1 AND spent <> 0 "
            "AND left(budget_key, char_length($2)) = $2 UNION "
            "SELECT budget_key FROM proctor_budget_reservations WHERE window_id = $1 AND state = $3 AND expires_at > $4 "
            "AND left(budget_key, char_length($2)) = $2"
            ') s ORDER BY k COLLATE "C" LIMIT $5) '
            "SELECT k, (SELECT spent FROM proctor_budget_usage WHERE budget_key = k AND window_id = $1), "
            "(SELECT coalesce(sum(amount), 0) FROM proctor_budget_reservations WHERE budget_key = k AND window_id = $1 "
            'AND state = $3 AND expires_at > $4) FROM keys ORDER BY k COLLATE "C"',
            window_id, key_prefix, HELD, float(now), int(limit))
        out = []
        for k, spent, held in rows:
            usage = BudgetUsage(spent=parse_dec(spent), reserved=parse_dec(held))
            if usage.spent or usage.reserved:
                out.append((str(k), usage))
        return out

    async def sweep_budgets(self, now: float, *, idle_before: float | None = None) -> int:
        check_times(now=now)
        if idle_before is not None:
            check_times(idle_before=idle_before)
        n = self._rowcount(await self._execute(
            "sweep_budgets", "DELETE FROM proctor_budget_reservations WHERE purge_at <= $1", float(now)))
        if idle_before is not None:
            n += self._rowcount(await self._execute(
                "sweep_budgets",
                "DELETE FROM proctor_budget_usage u WHERE updated_at < $1 AND NOT EXISTS (SELECT 1 FROM "
                "proctor_budget_reservations r WHERE r.budget_key = u.budget_key AND r.window_id = u.window_id)",
                float(idle_before)))
        return n
