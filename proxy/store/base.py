"""The store interface: state that must survive a restart or be shared by replicas.

Every backend failure surfaces as `StoreError` (with the original exception
chained) so callers can fail closed; argument mistakes raise ValueError.

Every store carries an identity (a random id written when it is created). A
store that is no longer the one Proctor opened (its file deleted or replaced,
its tables dropped, another id) is *lost*: every later operation raises
`StoreLostError` until Proctor restarts, because whatever it answers now
(no suspensions, no approvals) is not the state operators set.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, TypeVar

from .idempotency import IdempotencyEntry
from .claims import Claim, ClaimOutcome
from .etags import SeenETag
from .workflows import Instance, StepEvent, WorkflowObject
from .counters import BudgetUsage, RateState, ReserveOutcome, SettleOutcome
from .models import (
    SUSPENSION_KINDS,
    AgentRecord,
    Approval,
    PolicyRevision,
    ReplicaBeat,
    Suspension,
    Vote,
)


log = logging.getLogger("proctor.store")
T = TypeVar("T")


class StoreError(Exception):
    """A state-store operation failed (connection, schema, constraint, I/O...)."""


class StoreLostError(StoreError):
    """The store is not the one expected: missing, emptied, replaced or carrying another id."""


@dataclass(frozen=True)
class StoreIdentity:
    """Written once, when a store is created; tells one store from another."""

    store_id: str
    created_at: float


def _consume(task: "asyncio.Future[None]") -> None:
    """Fetch a detached check's outcome (check() reads it when it waits on it again)."""
    if not task.cancelled():
        task.exception()


class Store(abc.ABC):
    """Async, engine-agnostic state store. Construct, then `await open()` before use."""

    kind: str = "store"  # "sqlite" | "postgresql"
    identity: StoreIdentity | None = None  # set by open()
    _lost: str | None = None  # sticky: why this store can no longer be trusted
    _down: str | None = None  # why the last check failed (cleared by the next good one)
    last_check: float | None = None  # epoch seconds of the last check()
    check_timeout: float = 5.0
    # Partitions (docs/governance.md "Partitions"): past this long without a good check the
    # store is a problem (requests refused, /readyz 503) even if no check has failed yet.
    staleness_seconds: float = 10.0
    _last_ok: float | None = None  # time.monotonic() of the last good check
    _checking: "asyncio.Future[None] | None" = None  # a check still waiting for the store

    # ---- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    async def open(self, *, create: bool = True) -> None:
        """Connect and create/migrate the schema (idempotent). With `create=False`
        a store that does not exist yet (no file, an empty file, no tables) is not
        created: StoreLostError instead."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; safe to call twice or on a store that never opened."""

    @property
    def persistent(self) -> bool:
        """False for stores that cannot outlive the process (SQLite :memory:)."""
        return True

    @property
    def location(self) -> str:
        """Where the store is, for messages (never a password)."""
        return self.kind

    # ---- health ------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        return self._lost

    @property
    def problem(self) -> str | None:
        """Why the store cannot be trusted right now (None: it can). Cheap; read per request."""
        return self._lost or self._down or self.stale

    @property
    def stale(self) -> str | None:
        """Set once the last good check is older than `staleness_seconds`: whatever this process
        holds from the store (the suspension set above all) may no longer be what it says, and
        a check that hangs must not let the process go on serving on it."""
        if self._last_ok is None:
            return None
        age = time.monotonic() - self._last_ok
        if age <= self.staleness_seconds:
            return None
        return (f"no answer from the state store {self.location} for {age:.1f} s "
                f"(store.staleness_seconds: {self.staleness_seconds:g})")

    def mark_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            log.critical(
                "STATE STORE LOST: %s. Requests are refused (fail closed) and /readyz reports not ready "
                "until Proctor is restarted with its own store.",
                reason,
            )

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise StoreLostError(f"state store lost: {self._lost}")

    async def check(self) -> None:
        """Verify the store is reachable and still the one opened; updates `problem`. Never raises.

        Returns within min(check_timeout, staleness_seconds) whatever the store does. A check
        that gets no answer is not awaited to its end: on a network that drops packets a
        cancelled asyncpg query waits for its cancel request (up to the command timeout), and
        wait_for would wait with it. It finishes on its own; the next check waits on it again
        rather than piling up another."""
        if self._lost is not None:
            return
        task = self._checking
        if task is None or task.done():
            task = self._checking = asyncio.ensure_future(self._verify())
            task.add_done_callback(_consume)
        deadline = min(self.check_timeout, self.staleness_seconds)
        done, _ = await asyncio.wait({task}, timeout=deadline)
        e: BaseException | None
        if not done:
            e = asyncio.TimeoutError()
            self._unanswered()
        else:
            self._checking = None
            e = asyncio.CancelledError() if task.cancelled() else task.exception()
        if isinstance(e, StoreLostError):
            self.mark_lost(str(e))
        elif e is not None:  # any failure means: not usable right now
            if isinstance(e, (asyncio.TimeoutError, asyncio.CancelledError)):
                reason = f"the state store {self.location} did not answer a check within {deadline:g} s"
            else:
                reason = str(e) if isinstance(e, StoreError) else f"{type(e).__name__}: {e}"
            if self._down is None:
                log.error("state store unavailable: %s", reason)
            self._down = reason
        else:
            if self._down is not None or self.stale is not None:
                log.warning("state store reachable again")
            self._down = None
            self._last_ok = time.monotonic()
        self.last_check = time.time()

    def _unanswered(self) -> None:  # noqa: B027 - optional hook: nothing to end by default
        """A check got no answer in time: end calls still waiting on the store (PostgreSQL)."""

    @abc.abstractmethod
    async def _verify(self) -> None:
        """Raise StoreLostError if this is no longer the store opened, StoreError if it cannot be reached."""

    def _check_identity(self, found: str | None) -> None:
        expected = self.identity.store_id if self.identity else None
        if found is None:
            raise StoreLostError(f"the state store {self.location} no longer holds its store id (emptied?)")
        if found != expected:
            raise StoreLostError(
                f"the state store {self.location} now carries store id {found}, not {expected} as when it was opened"
            )

    # ---- approvals -------------------------------------------------------
    @abc.abstractmethod
    async def create_approval(self, a: Approval) -> None: ...

    @abc.abstractmethod
    async def get_approval(self, id: str) -> Approval | None: ...

    @abc.abstractmethod
    async def list_approvals(
        self,
        *,
        states: list[str] | None = None,
        agent_id: str | None = None,
        action: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Approval]:
        """Newest first (created_at, then id, descending)."""

    @abc.abstractmethod
    async def count_approvals(self, *, states: list[str] | None = None) -> int: ...

    @abc.abstractmethod
    async def find_open_approval(
        self, *, agent_id: str, fingerprint: str, idempotency_key: str | None, forwarded_since: float | None = None
    ) -> Approval | None:
        """Newest approval of this agent that answers the request: in pending|approved|denied,
        or forwarded at or after `forwarded_since` (None: forwarded ones never answer); matched
        by `idempotency_key` when one is given, else by `fingerprint` (store/approval_holds.py)."""

    @abc.abstractmethod
    async def hold_approval(self, a: Approval, *, forwarded_since: float | None = None) -> tuple[Approval, bool]:
        """Insert-or-return-existing, atomically across replicas (store/approval_holds.py):
        the approval that answers `a`'s request (as find_open_approval matches it, by
        `a.idempotency_key` or else `a.fingerprint`) and False; else `a`, stored now, and True.
        At most one pending|approved|denied approval per request is enforced by the store."""

    @abc.abstractmethod
    async def update_approval(self, a: Approval, *, expect_version: int) -> bool:
        """Compare-and-set: write every field but `id` and set version to
        expect_version + 1, only if the stored version is still expect_version.
        Returns False (and leaves `a` untouched) when someone else changed it first
        or it does not exist; on success sets `a.version`."""

    @abc.abstractmethod
    async def due_approvals(self, now: float) -> list[Approval]:
        """Pending approvals whose expires_at <= now, or whose escalate_at <= now
        and that are not escalated yet; oldest first."""

    # ---- resource creators -----------------------------------------------
    @abc.abstractmethod
    async def record_creator(
        self, resource_type: str, resource_id: str, agent_id: str, decision_id: str, at: float
    ) -> None:
        """Upsert: the latest record for (resource_type, resource_id) wins."""

    @abc.abstractmethod
    async def creator_of(self, resource_type: str, resource_id: str) -> str | None: ...

    # ---- agent registry --------------------------------------------------
    @abc.abstractmethod
    async def upsert_agent(self, rec: AgentRecord) -> None:
        """Registration: writes owner/team/description and registered=True;
        keeps the activity counters and first/last seen."""

    @abc.abstractmethod
    async def record_agent_activity(self, batch: dict[str, tuple[float, float, int, int, int]]) -> None:
        """agent_id -> (first_seen, last_seen, requests, allowed, denied) seen in this
        batch: adds the counts, keeps the min first_seen and max last_seen, creates
        unknown (unregistered) agents."""

    @abc.abstractmethod
    async def get_agent(self, id: str) -> AgentRecord | None: ...

    @abc.abstractmethod
    async def list_agents(self) -> list[AgentRecord]:
        """Ordered by id."""

    # ---- suspensions (kill switch) ---------------------------------------
    @abc.abstractmethod
    async def suspend(self, s: Suspension) -> None:
        """Upsert by (kind, target); bumps suspensions_version."""

    @abc.abstractmethod
    async def resume(self, kind: str, target: str) -> bool:
        """False (and no version bump) if it was not suspended."""

    @abc.abstractmethod
    async def list_suspensions(self) -> list[Suspension]:
        """Ordered by kind, then target."""

    @abc.abstractmethod
    async def suspensions_version(self) -> int:
        """Increases on every suspend and every resume that removed something."""

    # ---- policy revisions ------------------------------------------------
    @abc.abstractmethod
    async def save_revision(self, r: PolicyRevision, keep: int = 20) -> None:
        """Upsert `r`, mark it the only active revision, then delete the oldest
        inactive revisions so at most `keep` remain (the active one is never
        deleted, so keep+1 remain when the active one is not among the newest)."""

    @abc.abstractmethod
    async def list_revisions(self) -> list[PolicyRevision]:
        """Newest first (loaded_at, then revision, descending), files included."""

    @abc.abstractmethod
    async def get_revision(self, revision: str) -> PolicyRevision | None: ...

    @abc.abstractmethod
    async def active_revision(self) -> str | None:
        """The fleet's active revision id (one indexed read; None before any was saved)."""

    @abc.abstractmethod
    async def activate_revision(self, revision: str) -> bool:
        """Make a kept revision the only active one (fleet rollback); False if it is not kept."""

    # ---- replicas (proxy/policy/fleet.py) ---------------------------------
    @abc.abstractmethod
    async def heartbeat_replica(self, beat: ReplicaBeat) -> None:
        """Upsert the replica's row."""

    @abc.abstractmethod
    async def list_replicas(self, seen_since: float) -> list[ReplicaBeat]:
        """Replicas seen at or after `seen_since` (epoch seconds), by replica id; older rows are deleted."""

    # ---- claims on resources (proxy/coordination/claims.py; store/claims.py) ----
    @abc.abstractmethod
    async def acquire_claim(
        self, *, connector: str, resource: str, agent: str, groups: list[str], mode: str, ttl: float, now: float
    ) -> ClaimOutcome:
        """Atomically (one transaction, exact across replicas): renew `agent`'s live claim,
        or start a new tenure (bumping the resource's fence), or report the live claim
        of another agent that conflicts (see store/claims.py `decide`)."""

    async def renew_claim(self, claim_id: str, *, agent: str, groups: list[str], mode: str, ttl: float,
                          now: float) -> Claim | None:
        """The holder's renewal in one statement: push the expiry of `agent`'s live claim
        `claim_id` (same mode) to at least now + ttl and refresh its groups; the claim, or None
        when it is not that (expired, released, transferred, another mode), in which case the
        caller falls back to `acquire_claim`. A renewal changes no tenure, so it needs no fence
        lock: a concurrent transfer deletes the row first (None) or after (it moves the renewed
        claim). The default answers None: every renewal takes the full path."""
        return None

    @abc.abstractmethod
    async def claims_on(self, connector: str, resource: str, now: float) -> list[Claim]:
        """The live claims on one resource, oldest first."""

    @abc.abstractmethod
    async def list_claims(self, now: float, *, connector: str | None = None) -> list[Claim]:
        """Every live claim (of one connector), ordered by connector, resource, since."""

    @abc.abstractmethod
    async def release_claim(self, claim_id: str) -> Claim | None:
        """Delete one claim by id (an operator's force-release); the claim, or None if there was none."""

    @abc.abstractmethod
    async def transfer_claim(self, claim_id: str, *, to: str, groups: list[str], now: float,
                             ttl: float | None = None) -> tuple[Claim, Claim] | None:
        """Atomically (one transaction with the fence bump, exact across replicas) end the
        live claim `claim_id` and start `to`'s tenure on the same resource (store/claims.py
        `hand_over`): (old, new), or None if no such live claim."""

    @abc.abstractmethod
    async def expire_claims(self, now: float) -> list[Claim]:
        """Delete expired claims and return them (each one to exactly one caller, across
        replicas: the control API records them as `expired` claim events)."""

    @abc.abstractmethod
    async def sweep_claims(self, now: float) -> int:
        """Delete expired claims (readers ignore them already); how many. Fence rows stay,
        so a resource's fence never goes back."""

    # ---- idempotency keys and dedupe windows (proxy/coordination/) --------
    @abc.abstractmethod
    async def reserve_idempotency(self, e: IdempotencyEntry, now: float) -> IdempotencyEntry | None:
        """Atomically store `e` unless a live entry (expires_at > now) holds (e.scope, e.key):
        None when `e` now holds it, else the live entry that does (the caller decides:
        replay, in progress, or another request). An expired entry is replaced."""

    @abc.abstractmethod
    async def get_idempotency(self, scope: str, key: str, now: float) -> IdempotencyEntry | None:
        """The live entry for (scope, key), or None."""

    @abc.abstractmethod
    async def complete_idempotency(self, e: IdempotencyEntry) -> bool:
        """Record the response: state, status, headers, body, body_stored and expires_at of
        `e`, only while the in-progress entry is still held by `e.owner`; False otherwise."""

    @abc.abstractmethod
    async def release_idempotency(self, scope: str, key: str, owner: str) -> bool:
        """Delete the in-progress entry held by `owner` (its request was not completed)."""

    @abc.abstractmethod
    async def sweep_idempotency(self, now: float) -> int:
        """Delete entries that expired (expires_at <= now); returns how many."""

    @abc.abstractmethod
    async def list_idempotency(self, now: float, *, kind: str | None = None, agent: str | None = None,
                               limit: int = 1000) -> list[IdempotencyEntry]:
        """The live entries, newest first (at most `limit`), without their stored bodies (`body`
        is None; `body_stored` still says whether one is kept). `kind`: only `idempotency`
        (agents' keys) or `dedupe` (route windows) entries; `agent`: only those held by this
        agent's requests."""

    # ---- ETags agents saw (optimistic concurrency; proxy/coordination/concurrency.py) ----
    @abc.abstractmethod
    async def remember_etag(self, e: SeenETag) -> None:
        """Upsert by (connector, resource, agent_id): the latest ETag this agent saw wins."""

    @abc.abstractmethod
    async def etag_seen(self, connector: str, resource: str, agent_id: str, now: float) -> SeenETag | None:
        """The ETag this agent last saw for the resource, unless it expired (expires_at <= now)."""

    @abc.abstractmethod
    async def forget_etag(self, connector: str, resource: str, agent_id: str) -> bool:
        """Delete it (the agent's view is unknown now); False if there was none."""

    @abc.abstractmethod
    async def sweep_etags(self, now: float) -> int:
        """Delete expired rows (readers ignore them already); how many."""

    # ---- workflows (proxy/workflows/; store/workflows.py) ----
    @abc.abstractmethod
    async def workflow_instance(self, instance_id: str) -> Instance | None: ...

    @abc.abstractmethod
    async def workflow_instance_for(self, workflow: str, objects: Sequence[tuple[str, str]]) -> Instance | None:
        """The instance the first of `objects` (type, id) that belongs to one names, or None."""

    @abc.abstractmethod
    async def record_workflow_event(self, event: StepEvent, *, required: Sequence[str],
                                    links: Sequence[tuple[str, str]], create: bool) -> Instance | None:
        """Atomically (one transaction, the instance row locked): apply `event` to its instance
        (created, started at the event, when `create` and absent), store the event and link
        `links` to the instance (an object another instance has stays there). The instance
        after the event, or None when it does not exist and `create` is false."""

    @abc.abstractmethod
    async def update_workflow_attrs(self, instance_id: str, attrs: dict[str, Any], *, expect_version: int) -> bool:
        """Replace the instance's attrs if its version is still `expect_version` (bumping it)."""

    @abc.abstractmethod
    async def list_workflow_instances(self, *, workflow: str | None = None, state: str | None = None,
                                      since: float | None = None, limit: int = 100, before: float | None = None,
                                      flagged: str | None = None) -> list[Instance]:
        """Most recently moved first. `before`: last moved before then (stalled ones); `flagged`:
        only instances whose attrs have that top-level key (a lower-case word; a text match the
        caller confirms, workflows/exceptions.py)."""

    @abc.abstractmethod
    async def workflow_events(self, *, instance_id: str | None = None, workflow: str | None = None,
                              since: float | None = None, after_seq: int = 0, limit: int = 10000) -> list[StepEvent]:
        """In store order (seq), after `after_seq` (paging)."""

    @abc.abstractmethod
    async def workflow_objects(self, *, instance_id: str | None = None,
                               workflow: str | None = None) -> list[WorkflowObject]: ...

    @abc.abstractmethod
    async def count_workflow_instances(self) -> dict[tuple[str, str], int]:
        """Instances by (workflow, state), counted in the store (the metrics gauge)."""

    # ---- counters: rate limits and budget ledgers (proxy/limits/; store/counters.py) ----
    @abc.abstractmethod
    async def update_rate_limit(self, key: str, fn: Callable[[RateState | None], tuple[RateState | None, T]],
                                *, now: float) -> T:
        """Atomically (one transaction, the row locked, exact across replicas): read the rate-limit
        state of `key` (None when absent or expired at `now`), call `fn` with it, and store the state
        `fn` returns (None: leave the row as it is). `fn` is pure and quick (it may run in a worker
        thread); its second value is returned."""

    @abc.abstractmethod
    async def sweep_rate_limits(self, now: float) -> int:
        """Delete expired rate-limit rows (readers ignore them already); how many."""

    @abc.abstractmethod
    async def reserve_budget(self, *, budget_key: str, window_id: str, reservation_id: str, amount: Decimal,
                             limit: Decimal, now: float, expires_at: float, purge_at: float,
                             force: bool = False) -> ReserveOutcome:
        """Atomically (the budget window's row locked): purge its reservation rows whose purge_at has
        passed, sum spent and the held reservations that have not expired, and hold `amount` under
        `reservation_id` when it fits the limit (or `force`). ValueError when the id is taken."""

    @abc.abstractmethod
    async def settle_budget(self, reservation_id: str, actual: Decimal, *, now: float) -> SettleOutcome | None:
        """Move a held reservation (expired or not, while its row is kept) to spent with the `actual`
        amount, once: a repeat answers `already-settled`, a released one `released`, both booking
        nothing; None when there is no such reservation (never made, or its purge_at has passed)."""

    @abc.abstractmethod
    async def release_budget(self, reservation_id: str) -> bool:
        """Drop a held reservation without spending; False when it is not held (settled, released, unknown)."""

    @abc.abstractmethod
    async def charge_budget(self, *, budget_key: str, window_id: str, amount: Decimal, now: float) -> BudgetUsage:
        """Add `amount` to spent directly (a cost known only afterwards, or a reservation purged before
        its settle); the usage after."""

    @abc.abstractmethod
    async def budget_usage(self, budget_key: str, window_id: str, *, now: float) -> BudgetUsage:
        """Spent and held (unexpired) reservations of one budget window; zeros when none."""

    @abc.abstractmethod
    async def budget_windows(self, window_id: str, key_prefix: str, limit: int, *,
                             now: float) -> list[tuple[str, BudgetUsage]]:
        """The budget keys starting with `key_prefix` that have spend or held (unexpired)
        reservations in window `window_id`, with their usage, in key order (code points), at most
        `limit` (the first ones). Read only (the control API's budget listing)."""

    @abc.abstractmethod
    async def sweep_budgets(self, now: float, *, idle_before: float | None = None) -> int:
        """Delete reservation rows whose purge_at has passed and, with `idle_before`, usage rows that
        have not changed since then and hold no reservation; how many rows."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------
# Helpers shared by the backends (not part of the public API).

SCHEMA_VERSION = 9
SUSPENSIONS_VERSION_KEY = "suspensions_version"

# (column, kind) in table order; kind: text | float | json | bool | int
APPROVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "text"),
    ("state", "text"),
    ("created_at", "float"),
    ("expires_at", "float"),
    ("agent_id", "text"),
    ("action", "text"),
    ("resource_type", "text"),
    ("resource_id", "text"),
    ("connector", "text"),
    ("required_groups", "json"),  # Approval.groups ("groups" is an SQL keyword)
    ("fingerprint", "text"),
    ("idempotency_key", "text"),
    ("mode", "text"),
    ("decision_id", "text"),
    ("request", "json"),
    ("derived", "json"),
    ("escalate_at", "float"),
    ("escalated", "bool"),
    ("votes", "json"),
    ("decided_at", "float"),
    ("decided_by", "text"),
    ("reason", "text"),
    ("forwarded_at", "float"),
    ("version", "int"),
)
APPROVAL_COLUMN_NAMES = tuple(c for c, _ in APPROVAL_COLUMNS)
APPROVAL_SELECT = ", ".join(APPROVAL_COLUMN_NAMES)
AGENT_SELECT = "id, owner, team, description, registered, first_seen, last_seen, requests, allowed, denied"
SUSPENSION_SELECT = "kind, target, since, suspended_by, reason"
REVISION_SELECT = "revision, loaded_at, files, active"
REPLICA_SELECT = "replica_id, hostname, policy_source, revision, following, reload_ok, started_at, last_seen, control_url"


def replica_from_row(row: Sequence[Any]) -> ReplicaBeat:
    return ReplicaBeat(replica_id=str(row[0]), hostname=str(row[1]), policy_source=str(row[2]), revision=str(row[3]),
                       following=None if row[4] is None else str(row[4]), reload_ok=bool(row[5]),
                       started_at=float(row[6]), last_seen=float(row[7]),
                       control_url=None if row[8] is None else str(row[8]))


def dump_json(value: Any) -> str:
    # ASCII-only output: lone surrogates and NULs survive every engine's text type.
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def approval_params(a: Approval) -> list[Any]:
    """Values in APPROVAL_COLUMNS order."""
    for name in ("created_at", "expires_at", "escalate_at", "decided_at", "forwarded_at"):
        v = getattr(a, name)
        if v is not None and not math.isfinite(float(v)):
            raise ValueError(f"approval {name} must be finite")
    return [
        a.id,
        a.state,
        float(a.created_at),
        float(a.expires_at),
        a.agent_id,
        a.action,
        a.resource_type,
        a.resource_id,
        a.connector,
        dump_json({str(k): int(v) for k, v in a.groups.items()}),
        a.fingerprint,
        a.idempotency_key,
        a.mode,
        a.decision_id,
        dump_json(a.request),
        dump_json(a.derived),
        _opt_float(a.escalate_at),
        bool(a.escalated),
        dump_json([asdict(v) if isinstance(v, Vote) else dict(v) for v in a.votes]),
        _opt_float(a.decided_at),
        a.decided_by,
        a.reason,
        _opt_float(a.forwarded_at),
        int(a.version),
    ]


def approval_from_row(row: Sequence[Any]) -> Approval:
    (
        id_, state, created_at, expires_at, agent_id, action, resource_type, resource_id,
        connector, groups, fingerprint, idempotency_key, mode, decision_id, request, derived,
        escalate_at, escalated, votes, decided_at, decided_by, reason, forwarded_at, version,
    ) = tuple(row)
    return Approval(
        id=id_,
        state=state,
        created_at=float(created_at),
        expires_at=float(expires_at),
        agent_id=agent_id,
        action=action,
        resource_type=resource_type,
        resource_id=resource_id,
        connector=connector,
        groups=json.loads(groups),
        fingerprint=fingerprint,
        idempotency_key=idempotency_key,
        mode=mode,
        decision_id=decision_id,
        request=json.loads(request),
        derived=json.loads(derived),
        escalate_at=_opt_float(escalate_at),
        escalated=bool(escalated),
        votes=[Vote(**v) for v in json.loads(votes)],
        decided_at=_opt_float(decided_at),
        decided_by=decided_by,
        reason=reason,
        forwarded_at=_opt_float(forwarded_at),
        version=int(version),
    )


def agent_from_row(row: Sequence[Any]) -> AgentRecord:
    id_, owner, team, description, registered, first_seen, last_seen, requests, allowed, denied = tuple(row)
    return AgentRecord(
        id=id_,
        owner=owner,
        team=team,
        description=description,
        registered=bool(registered),
        first_seen=_opt_float(first_seen),
        last_seen=_opt_float(last_seen),
        requests=int(requests),
        allowed=int(allowed),
        denied=int(denied),
    )


def suspension_from_row(row: Sequence[Any]) -> Suspension:
    kind, target, since, by, reason = tuple(row)
    return Suspension(kind=kind, target=target, since=float(since), by=by, reason=reason)


def revision_from_row(row: Sequence[Any]) -> PolicyRevision:
    revision, loaded_at, files, active = tuple(row)
    return PolicyRevision(revision=revision, loaded_at=float(loaded_at), files=json.loads(files), active=bool(active))


Activity = tuple[float, float, int, int, int]


def activity_rows(batch: dict[str, Activity]) -> list[tuple[str, float, float, int, int, int]]:
    """Batch as rows sorted by agent id (a stable lock order for concurrent writers)."""
    rows = []
    for agent_id in sorted(batch):
        first, last, requests, allowed, denied = batch[agent_id]
        rows.append((agent_id, float(first), float(last), int(requests), int(allowed), int(denied)))
    return rows


def check_kind(kind: str) -> None:
    if kind not in SUSPENSION_KINDS:
        raise ValueError(f"suspension kind must be one of {', '.join(SUSPENSION_KINDS)}, not {kind!r}")


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")


def check_keep(keep: int) -> None:
    if keep < 0:
        raise ValueError("keep must be >= 0")


@contextlib.contextmanager
def backend_errors(op: str) -> Iterator[None]:
    """Turn any backend failure inside the block into StoreError (original chained)."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - fail closed: every backend failure is a StoreError
        raise StoreError(f"state store: {op} failed: {type(exc).__name__}: {exc}") from exc
