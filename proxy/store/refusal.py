"""The refusal for a request that met a lost or unreachable state store.

Registered with the stage chain (proxy/request_path.py): any stage that raises
`StoreError` ends the request with this 503 instead of the generic fail-closed
answer. It is logged once a minute, not once per request: /readyz and /healthz
say why.
"""

from __future__ import annotations

import logging
import time

from ..core.exchange import Exchange
from ..core.model import Refusal
from .base import StoreError

log = logging.getLogger("proctor.store")

_LOG_EVERY_SECONDS = 60.0
_last_logged = [0.0]


def store_unavailable(e: BaseException, ex: Exchange) -> Refusal | None:
    if not isinstance(e, StoreError):
        return None
    ex.errors.append(f"{type(e).__name__}: {e}")
    now = time.monotonic()
    if now - _last_logged[0] >= _LOG_EVERY_SECONDS:
        _last_logged[0] = now
        log.error("refusing requests while the state store is unavailable (decision %s): %s", ex.decision_id, e)
    return Refusal(
        503,
        "State store unavailable",
        "Proctor cannot check its state (suspensions, approvals) right now, so this request was not forwarded "
        "(fail closed); retry later",
        reasons=["store-unavailable"],
        headers={"Retry-After": "5"},
        kind="fail-closed",
    )
