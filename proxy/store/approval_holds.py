"""One approval per request, enforced by the store (schema 8), shared by the backends.

A request of an agent is answered by at most one approval at a time, whichever replica
sees it: two replicas holding the same request at the same moment get the same approval.
A request is identified as `find_open_approval` identifies it: by its Idempotency-Key
when it has one, else by its fingerprint. An approval *answers* a request while it is

- pending, approved (not spent yet) or denied (a denial is final), and
- forwarded, for as long as the caller remembers forwarded approvals (`forwarded_since`:
  approvals forwarded at or after then answer; the proxy sets it from
  `approvals.forwarded_retry_seconds`), so a late retry is told it was already forwarded
  instead of being held anew.

Two partial unique indexes make the first rule hold whatever the interleaving (a process
lock cannot: replicas share no memory): one per (agent, fingerprint) among the holds made
without a key, one per (agent, key) among keyed holds. `hold` is insert-or-return-existing:
it inserts only when nothing answers the request, and an insert that loses a race to another
replica's commit inserts nothing (ON CONFLICT DO NOTHING) and reads the winner instead.
The forwarded window depends on the clock, which an index cannot express; it needs none:
an approval becomes forwarded only from approved, in one compare-and-set, so a hold never
sees a request answered by neither.

The migration first cancels older duplicates that replicas made before (the newest one of
each request stays: it is the one retries have been finding), so the indexes can be built.
"""

from __future__ import annotations

import math

from .base import APPROVAL_COLUMNS, APPROVAL_SELECT
from .models import OPEN_APPROVAL_STATES

# find_open_approval without a forwarded window: no forwarded_at is >= infinity.
NEVER = math.inf

_OPEN = "(" + ", ".join(f"'{s}'" for s in OPEN_APPROVAL_STATES) + ")"  # constant identifiers, not input
CANCEL_REASON = "duplicate of a newer approval of the same request (store schema 8)"


def _cancel_duplicates(match: str) -> str:
    """Cancel every answering approval that a newer answering one of the same request shadows."""
    return (
        "UPDATE proctor_approvals SET state = 'cancelled', "
        f"reason = coalesce(reason, '{CANCEL_REASON}'), version = version + 1 "
        f"WHERE {match.format(t='proctor_approvals')} AND state IN {_OPEN} AND EXISTS ("
        "SELECT 1 FROM proctor_approvals AS newer WHERE newer.agent_id = proctor_approvals.agent_id "
        f"AND {match.format(t='newer')} AND newer.state IN {_OPEN} "
        "AND (newer.created_at > proctor_approvals.created_at "
        "OR (newer.created_at = proctor_approvals.created_at AND newer.id > proctor_approvals.id)))"
    )


_SAME_FP = "{t}.idempotency_key IS NULL AND {t}.fingerprint = proctor_approvals.fingerprint"
_SAME_KEY = "{t}.idempotency_key IS NOT NULL AND {t}.idempotency_key = proctor_approvals.idempotency_key"

# The same statements on SQLite and PostgreSQL (standard SQL both accept).
MIGRATION_V8: tuple[str, ...] = (
    _cancel_duplicates(_SAME_FP),
    _cancel_duplicates(_SAME_KEY),
    "CREATE UNIQUE INDEX IF NOT EXISTS proctor_approvals_one_per_request ON proctor_approvals (agent_id, fingerprint) "
    f"WHERE idempotency_key IS NULL AND state IN {_OPEN}",
    "CREATE UNIQUE INDEX IF NOT EXISTS proctor_approvals_one_per_key ON proctor_approvals (agent_id, idempotency_key) "
    f"WHERE idempotency_key IS NOT NULL AND state IN {_OPEN}",
)


def _answering(since: str) -> str:
    return f"(state IN {_OPEN} OR (state = 'forwarded' AND forwarded_at >= {since}))"


def find_sql_sqlite(by_key: bool) -> str:
    """Params: agent_id, key or fingerprint, forwarded_since."""
    col = "idempotency_key" if by_key else "fingerprint"
    return (
        f"SELECT {APPROVAL_SELECT} FROM proctor_approvals WHERE agent_id = ? AND {col} = ? AND {_answering('?')} "
        "ORDER BY created_at DESC, id DESC LIMIT 1"
    )


def find_sql_postgres(by_key: bool) -> str:
    """Params: $1 agent_id, $2 key or fingerprint, $3 forwarded_since."""
    col = "idempotency_key" if by_key else "fingerprint"
    return (
        f"SELECT {APPROVAL_SELECT} FROM proctor_approvals WHERE agent_id = $1 AND {col} = $2 "
        f"AND {_answering('$3::float8')} ORDER BY created_at DESC, id DESC LIMIT 1"
    )


INSERT_SQLITE = (
    f"INSERT INTO proctor_approvals ({APPROVAL_SELECT}) VALUES ({', '.join('?' for _ in APPROVAL_COLUMNS)}) "
    "ON CONFLICT DO NOTHING"
)

_PG_TYPES = {"text": "text", "float": "float8", "json": "json", "bool": "boolean", "int": "integer"}
_PG_PARAM = {name: i for i, (name, _) in enumerate(APPROVAL_COLUMNS, start=1)}


def hold_sql_postgres(by_key: bool) -> str:
    """One statement: the approval answering this request, else the new one inserted.

    Params: the approval's values in APPROVAL_COLUMNS order, then forwarded_since. Rows:
    (created, *columns), none when the insert lost a race to a concurrent commit (read again)."""
    n = len(APPROVAL_COLUMNS)
    values = ", ".join(f"${i}::{_PG_TYPES[kind]}" for i, (_, kind) in enumerate(APPROVAL_COLUMNS, start=1))
    col = "idempotency_key" if by_key else "fingerprint"
    return (
        f"WITH found AS (SELECT {APPROVAL_SELECT} FROM proctor_approvals "
        f"WHERE agent_id = ${_PG_PARAM['agent_id']}::text AND {col} = ${_PG_PARAM[col]}::text "
        f"AND {_answering(f'${n + 1}::float8')} ORDER BY created_at DESC, id DESC LIMIT 1), "
        f"ins AS (INSERT INTO proctor_approvals ({APPROVAL_SELECT}) SELECT {values} "
        f"WHERE NOT EXISTS (SELECT 1 FROM found) ON CONFLICT DO NOTHING RETURNING {APPROVAL_SELECT}) "
        f"SELECT TRUE, {APPROVAL_SELECT} FROM ins UNION ALL SELECT FALSE, {APPROVAL_SELECT} FROM found"
    )
