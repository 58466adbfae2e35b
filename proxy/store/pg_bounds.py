"""Every PostgreSQL call bounded in time, even when the network drops packets silently.

A refused connection fails fast; a partition that drops packets does not: the
socket stays open and a query waits for an answer that never comes. asyncpg's
defaults then hang for a long time (no timeout on taking a pooled connection; a
cancelled query waits for its cancel request up to the command timeout). So:

- `BoundedPool` is what the store's methods use instead of the pool: taking a
  connection is bounded (`acquire_timeout`) and every query by the pool's
  command timeout. Calls in progress are tracked (`InFlight`): when a health
  check gets no answer, the connections in use are closed and calls still
  waiting for a connection (a new one being opened, or a full pool) give up,
  so every call already waiting on a silent network fails then, not a command
  timeout (plus asyncpg's wait for its cancel request, as long again) later. `gate` refuses every call while the store is known to be in
  trouble (`Store.problem`): it fails at once with StoreError instead of
  queueing behind connections that hang. The health check (Store.check)
  bypasses it: that is how the store is found again.
- `tune_socket` (the pool's `init`) turns on TCP keepalives and, on Linux,
  TCP_USER_TIMEOUT, so the kernel drops a connection whose data goes
  unacknowledged (a real packet drop) instead of retransmitting for ~15 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from .base import StoreError

# Keepalive probes on idle pooled connections: first after this many seconds idle,
# then every KEEPALIVE_INTERVAL, dropped after KEEPALIVE_COUNT unanswered ones.
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3


def socket_tuner(user_timeout_seconds: float, keepalive_idle_seconds: float) -> Callable[[Any], Any]:
    """The pool's `init` callback: TCP options on each new connection's socket."""

    async def tune_socket(conn: Any) -> None:
        transport = getattr(conn, "_transport", None)  # asyncpg keeps it private; absent: nothing to tune
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: no network in between
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for name, value in (("TCP_KEEPIDLE", max(1, int(keepalive_idle_seconds))),
                            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL), ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                            ("TCP_USER_TIMEOUT", max(1000, int(user_timeout_seconds * 1000)))):
            if hasattr(socket, name):  # Linux has all; macOS lacks TCP_USER_TIMEOUT
                options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
        for level, opt, value in options:
            with contextlib.suppress(OSError):  # best effort: the timeouts above bound every call anyway
                sock.setsockopt(level, opt, value)

    return tune_socket


def gate(problem: str | None) -> None:
    """StoreError at once while the store is down, stale or lost (see module doc)."""
    if problem is not None:
        raise StoreError(f"state store unavailable: {problem}")


class InFlight:
    """The store's calls in progress (to end them when the store stops answering)."""

    def __init__(self) -> None:
        self.conns: set[Any] = set()  # connections in use
        self._tripped: asyncio.Future[None] | None = None  # resolved by abort(): waiters give up

    def tripwire(self) -> "asyncio.Future[None]":
        if self._tripped is None or self._tripped.done():
            self._tripped = asyncio.get_running_loop().create_future()
        return self._tripped

    def abort(self) -> int:
        """Close every connection in use and stop every wait for one: those calls fail now
        (StoreError); the pool opens new connections for later calls."""
        if self._tripped is not None and not self._tripped.done():
            self._tripped.set_result(None)
        conns, self.conns = self.conns, set()
        for conn in conns:
            with contextlib.suppress(Exception):  # already closed: nothing to abort
                conn.terminate()
        return len(conns)


class BoundedPool:
    """The subset of asyncpg.Pool the store uses, each call bounded (see module doc)."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float, inflight: InFlight) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._inflight = inflight

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        conn = await self._take()
        self._inflight.conns.add(conn)
        try:
            yield conn
        finally:
            self._inflight.conns.discard(conn)
            await self._pool.release(conn)

    async def _take(self) -> Any:
        """A pooled connection within acquire_timeout, or StoreError as soon as a check gave up."""
        pool, timeout = self._pool, self._acquire_timeout

        async def take() -> Any:
            return await pool.acquire(timeout=timeout)

        got = asyncio.ensure_future(take())
        trip = self._inflight.tripwire()
        try:
            await asyncio.wait({got, trip}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: whatever the pool still hands over goes back to it
            got.add_done_callback(self._give_back)
            raise
        if got.done():
            return got.result()  # asyncpg's own errors (TimeoutError...): backend_errors says StoreError
        got.add_done_callback(self._give_back)
        raise StoreError("the state store stopped answering while this call waited for a connection")

    def _give_back(self, got: "asyncio.Future[Any]") -> None:
        if not got.cancelled() and got.exception() is None:
            asyncio.ensure_future(self._pool.release(got.result()))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any, timeout: float | None = None) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(sql, *args, timeout=timeout)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(sql, *args)
