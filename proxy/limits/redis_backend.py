"""Counters in Redis: each decision is one Lua script, atomic on the server (docs/limits.md).

`RedisCounters(url, prefix="proctor:")` is a RateLimiter and a BudgetLedger.
Every replica that points at the same Redis (standalone or behind Sentinel; not
Redis Cluster: a settle touches keys named inside its reservation record)
shares the counters exactly: a script runs whole before any other command.

- Scripts are sent by SHA (EVALSHA) and, when the server does not know them
  (NOSCRIPT: restarted, flushed, failed over), by EVAL, which caches them again.
- The clock is the caller's `now` (epoch seconds) passed to the script, so
  tests inject it; expiries are relative TTLs (PEXPIRE), never absolute times.
- Keys (under `prefix`): `rl:<key>` a GCRA state (hash m, f, d: the TAT in ms +
  f/d ms; expires when the TAT passes), `bu:<budget>:<window>` spent (decimal
  text), the running total of held reservations and the budget key and window
  it counts (`k`, `w`: `budget_windows` lists them by SCAN; a key name too long
  for limit_key is a digest) (expires `usage_retention_seconds` after its last change), `br:<budget>:<window>` the
  held amounts (id -> amount) and `bz:<budget>:<window>` their expiries (a
  sorted set: the next operation on the window reclaims the expired ones, each
  once, so a reserve costs O(log n), not a pass over every reservation),
  `rs:<id>` one reservation's record (kept until expires + grace, for late and
  repeated settles).
- Amounts are decimal text added and compared digit by digit in Lua (Lua
  numbers are doubles: 0.1 + 0.2 is not 0.3 there); GCRA uses integers below 2**53.
- Commands are never retried by the client: a script whose reply was lost may
  have run, and running it again would count twice. A lost connection, a timeout
  or any server error raises CounterUnavailable (cause chained).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ..store.counters import (MAX_KEY_LENGTH, ZERO, BudgetUsage, ReserveOutcome, SettleOutcome, check_amount,
                              check_key, check_listing, dec_text, parse_dec)
from .budget_keys import unescape
from .errors import CounterUnavailable
from .keys import _escape, limit_key
from .ledger import (DEFAULT_GRACE_SECONDS, ReserveResult, Settlement, Usage, check_grace, check_now, check_reserve,
                     reserve_result)
from .rate import Gcra, RateDecision, now_ms

DEFAULT_RETENTION_SECONDS = 400 * 86400  # spent per window: longer than a year window

# -- Lua ------------------------------------------------------------------------
# Integer division that is exact for integers below 2**53 (the quotient of doubles may round).
_LUA_INT = """
local function idiv(a, b)
  local q = math.floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end
local function istr(n) return string.format('%.0f', n) end
"""

# GCRA: proxy/limits/rate.py gcra_step, line for line. KEYS[1] state; ARGV now_ms, cost, limit, period_ms, burst.
GCRA_LUA = _LUA_INT + """
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local L = tonumber(ARGV[3])
local P = tonumber(ARGV[4])
local B = tonumber(ARGV[5])
local tm, tf = now, 0
local s = redis.call('HMGET', KEYS[1], 'm', 'f', 'd')
if s[1] and s[2] and s[3] then
  local m, f, d = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  if d ~= L then f = idiv(f * L, d) end
  if m > now or (m == now and f > 0) then tm, tf = m, f end
end
local diff = (tm - now) * L + tf
local new = diff + cost * P
local tau = B * P
if new <= tau then
  if cost > 0 then
    local q = idiv(new, L)
    redis.call('HSET', KEYS[1], 'm', istr(now + q), 'f', istr(new - q * L), 'd', istr(L))
    redis.call('PEXPIRE', KEYS[1], istr(q + 1))
  end
  return {1, new, 0}
end
if cost > B then return {0, diff, -1} end
return {0, diff, new - tau}
"""

# Non-negative decimal text: a + b, a - b (a >= b) and a <= b, exactly (digit by digit).
_LUA_DEC = """
local function parts(s)
  local i, f = string.match(s, '^(%d+)%.?(%d*)$')
  if not i then error('not a decimal: ' .. tostring(s)) end
  return i, f
end
local function align(a, b)
  local ai, af = parts(a)
  local bi, bf = parts(b)
  local il = math.max(#ai, #bi)
  local fl = math.max(#af, #bf)
  local x = string.rep('0', il - #ai) .. ai .. af .. string.rep('0', fl - #af)
  local y = string.rep('0', il - #bi) .. bi .. bf .. string.rep('0', fl - #bf)
  return x, y, fl
end
local function norm(s, fl)
  local i = string.sub(s, 1, #s - fl)
  local f = string.sub(s, #s - fl + 1)
  i = string.gsub(i, '^0+', '')
  f = string.gsub(f, '0+$', '')
  if i == '' then i = '0' end
  if f == '' then return i end
  return i .. '.' .. f
end
local function dadd(a, b)
  local x, y, fl = align(a, b)
  local out, carry = {}, 0
  for k = #x, 1, -1 do
    local d = string.byte(x, k) + string.byte(y, k) - 96 + carry
    if d > 9 then d = d - 10; carry = 1 else carry = 0 end
    out[k] = string.char(48 + d)
  end
  local s = table.concat(out)
  if carry == 1 then s = '1' .. s end
  return norm(s, fl)
end
local function dsub(a, b)
  local x, y, fl = align(a, b)
  local out, borrow = {}, 0
  for k = #x, 1, -1 do
    local d = string.byte(x, k) - string.byte(y, k) - borrow
    if d < 0 then d = d + 10; borrow = 1 else borrow = 0 end
    out[k] = string.char(48 + d)
  end
  if borrow == 1 then error('proctor counters: reserved total below zero') end
  return norm(table.concat(out), fl)
end
local function dle(a, b)
  local x, y = align(a, b)
  for k = 1, #x do
    local p, q = string.byte(x, k), string.byte(y, k)
    if p ~= q then return p < q end
  end
  return true
end
-- The window's running total of held, unexpired reservations, after reclaiming those that expired
-- by `now` (each once: Z orders them by expiry). U: usage hash (spent, reserved), R: id -> amount,
-- Z: id -> expires_ms. With nothing in Z nothing is held (R and Z expire together).
local function reclaim(U, R, Z, now)
  if redis.call('ZCARD', Z) == 0 then
    if redis.call('HEXISTS', U, 'reserved') == 1 then redis.call('HDEL', U, 'reserved') end
    return '0'
  end
  local reserved = redis.call('HGET', U, 'reserved') or '0'
  local gone = redis.call('ZRANGEBYSCORE', Z, '-inf', now)
  if #gone > 0 then
    for _, id in ipairs(gone) do
      local amount = redis.call('HGET', R, id)
      if amount then
        reserved = dsub(reserved, amount)
        redis.call('HDEL', R, id)
      end
    end
    redis.call('ZREMRANGEBYSCORE', Z, '-inf', now)
    redis.call('HSET', U, 'reserved', reserved)
  end
  return reserved
end
-- Drop the held reservation `id` (settled or released): true when it was still held.
local function unhold(U, R, Z, id)
  local amount = redis.call('HGET', R, id)
  if not amount or not redis.call('ZSCORE', Z, id) then return false end
  redis.call('HDEL', R, id)
  redis.call('ZREM', Z, id)
  redis.call('HSET', U, 'reserved', dsub(redis.call('HGET', U, 'reserved') or '0', amount))
  return true
end
"""

# KEYS: usage, held amounts, held expiries, record.
# ARGV: amount, limit, id, now_ms, expires_ms, purge_ms, force, budget, window, retention_ms.
RESERVE_LUA = _LUA_INT + _LUA_DEC + """
local now = tonumber(ARGV[4])
local spent = redis.call('HGET', KEYS[1], 'spent') or '0'
local reserved = reclaim(KEYS[1], KEYS[2], KEYS[3], now)
local fits = dle(dadd(dadd(spent, reserved), ARGV[1]), ARGV[2])
local placed = fits or ARGV[7] == '1'
if placed then
  if redis.call('EXISTS', KEYS[4]) == 1 then return {'dup'} end
  local keep = math.max(1, tonumber(ARGV[6]) - now)
  reserved = dadd(reserved, ARGV[1])
  redis.call('HSET', KEYS[1], 'reserved', reserved, 'k', ARGV[8], 'w', ARGV[9])
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
  for k = 2, 3 do
    if redis.call('PTTL', KEYS[k]) < keep then redis.call('PEXPIRE', KEYS[k], istr(keep)) end
  end
  redis.call('HSET', KEYS[4], 'u', KEYS[1], 'r', KEYS[2], 'z', KEYS[3], 'b', ARGV[8], 'w', ARGV[9],
             'amount', ARGV[1], 'state', 'held', 'exp', ARGV[5], 'purge', ARGV[6])
  redis.call('PEXPIRE', KEYS[4], istr(keep))
end
return {fits and 1 or 0, placed and 1 or 0, spent, reserved}
"""

# KEYS: record. ARGV: actual, now_ms, retention_ms, id.
SETTLE_LUA = _LUA_INT + _LUA_DEC + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local r = redis.call('HMGET', KEYS[1], 'u', 'r', 'z', 'state', 'amount', 'actual', 'exp', 'b', 'w', 'purge')
local now = tonumber(ARGV[2])
if tonumber(r[10]) <= now then return false end  -- past its grace by the caller's clock: as if purged
local U, R, Z = r[1], r[2], r[3]
reclaim(U, R, Z, now)
local status, booked, late = 'released', '0', 0
if r[4] == 'held' then
  unhold(U, R, Z, ARGV[4])  -- (false when it had expired: it no longer counted)
  redis.call('HSET', U, 'spent', dadd(redis.call('HGET', U, 'spent') or '0', ARGV[1]), 'k', r[8], 'w', r[9])
  redis.call('PEXPIRE', U, ARGV[3])
  redis.call('HSET', KEYS[1], 'state', 'settled', 'actual', ARGV[1])
  status, booked = 'settled', ARGV[1]
  if tonumber(r[7]) <= now then late = 1 end
elseif r[4] == 'settled' then
  status, booked = 'already-settled', r[6]
end
local u = redis.call('HMGET', U, 'spent', 'reserved')
return {status, booked, late, u[1] or '0', u[2] or '0', r[5], r[8], r[9]}
"""

# KEYS: record. ARGV: id.
RELEASE_LUA = _LUA_INT + _LUA_DEC + """
local r = redis.call('HMGET', KEYS[1], 'u', 'r', 'z', 'state')
if r[4] ~= 'held' then return 0 end
unhold(r[1], r[2], r[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'released')
return 1
"""

# KEYS: usage, held amounts, held expiries. ARGV: amount ('' to only read), now_ms, retention_ms, budget, window.
USAGE_LUA = _LUA_INT + _LUA_DEC + """
local reserved = reclaim(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[2]))
local spent = redis.call('HGET', KEYS[1], 'spent') or '0'
if ARGV[1] ~= '' then
  spent = dadd(spent, ARGV[1])
  redis.call('HSET', KEYS[1], 'spent', spent, 'k', ARGV[4], 'w', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {spent, reserved}
"""


# The usage of several budget windows (the listing): KEYS are (usage, held amounts, held expiries)
# triples, ARGV[1] now_ms. Per triple: the budget key and window the usage hash names ('' when it
# does not: written before they were kept), spent and the held total (expired ones reclaimed).
LIST_LUA = _LUA_INT + _LUA_DEC + """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 3 do
  local k, w, spent, reserved = '', '', '0', '0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    reserved = reclaim(KEYS[i], KEYS[i + 1], KEYS[i + 2], now)
    local u = redis.call('HMGET', KEYS[i], 'spent', 'k', 'w')
    spent, k, w = u[1] or '0', u[2] or '', u[3] or ''
  end
  out[#out + 1] = k
  out[#out + 1] = w
  out[#out + 1] = spent
  out[#out + 1] = reserved
end
return out
"""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


_GCRA, _RESERVE, _SETTLE, _RELEASE, _USAGE, _LIST = (_Script(s) for s in (GCRA_LUA, RESERVE_LUA, SETTLE_LUA,
                                                                            RELEASE_LUA, USAGE_LUA, LIST_LUA))
_SCAN_COUNT = 1000  # keys SCAN looks at per call
_GLOB_SPECIAL = frozenset("*?[]\\")


def _glob(text: str) -> str:
    """`text` matched literally in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _window_tail(tail: str) -> tuple[str, str] | None:
    """(budget key, window id) from the part of a usage key after `bu:`; None when it was too long
    and is a prefix plus a digest (limit_key): then only the hash's own `k` and `w` say."""
    if len(tail) == MAX_KEY_LENGTH and tail[-65] == "#":
        return None
    parts = tail.split(":")
    if len(parts) != 2:
        return None
    return unescape(parts[0]), unescape(parts[1])


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or len(prefix) > 64 or any(not 0x21 <= ord(c) <= 0x7E for c in prefix):
        raise ValueError("a Redis key prefix is at most 64 printable ASCII characters without spaces")
    return prefix


class RedisCounters:
    """Rate limits and budget ledgers in Redis (see the module docstring)."""

    backend = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "proctor:",
                 timeout: float = 2.0, grace_seconds: float = DEFAULT_GRACE_SECONDS,
                 usage_retention_seconds: float = DEFAULT_RETENTION_SECONDS, client: Any = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = _check_prefix(prefix)
        self.grace_seconds = check_grace(grace_seconds)
        if not 1 <= usage_retention_seconds <= 10 * 366 * 86400:
            raise ValueError("usage_retention_seconds is 1 s to 10 years")
        self.retention_ms = int(usage_retention_seconds * 1000)
        if client is None:
            # No retries: a script whose reply was lost may have run (see the module docstring).
            client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                             retry=Retry(NoBackoff(), 0), decode_responses=False)
        self.client = client

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection is not worth an error
            pass

    async def ping(self) -> None:
        """CounterUnavailable unless the server answers."""
        from redis.exceptions import RedisError

        try:
            await self.client.ping()
        except (RedisError, OSError) as e:
            raise CounterUnavailable(f"redis counters: ping failed: {type(e).__name__}: {e}", backend="redis") from e

    async def _run(self, op: str, script: _Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        from redis.exceptions import NoScriptError, RedisError

        try:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self.client.eval(script.source, len(keys), *keys, *args)
        except (RedisError, OSError) as e:
            raise CounterUnavailable(f"redis counters: {op} failed: {type(e).__name__}: {e}", backend="redis") from e

    def _k(self, kind: str, *parts: str) -> str:
        return f"{self.prefix}{kind}:{limit_key(*parts)}"

    # ---- rate limits ------------------------------------------------------------
    async def hit(self, key: str, limit: int, period_seconds: float, now: float, cost: int = 1,
                  burst: int | None = None) -> RateDecision:
        check_key("rate-limit key", key)
        gcra = Gcra.of(limit, period_seconds, burst)
        gcra.decide(None, now, cost)  # (validates now and cost)
        reply = await self._run("rate limit", _GCRA, [self._k("rl", key)],
                                [now_ms(now), cost, gcra.limit, gcra.period_ms, gcra.burst])
        allowed, diff_after, retry_scaled = (int(x) for x in reply)
        return gcra.decision(bool(allowed), diff_after, retry_scaled)

    async def sweep(self, now: float, *, idle_before: float | None = None) -> int:
        """Nothing to do: every key expires by itself."""
        check_now(now)
        return 0

    # ---- budget ledger ------------------------------------------------------------
    def _window_keys(self, budget_key: str, window_id: str) -> list[str]:
        return [self._k("bu", budget_key, window_id), self._k("br", budget_key, window_id),
                self._k("bz", budget_key, window_id)]

    async def reserve(self, budget_key: str, window_id: str, amount: Decimal, limit: Decimal, reservation_id: str,
                      ttl_seconds: float, now: float, *, force: bool = False) -> ReserveResult:
        amount, limit, expires_at, purge_at = check_reserve(budget_key, window_id, amount, limit, reservation_id,
                                                            ttl_seconds, now, self.grace_seconds)
        at = now_ms(now)
        reply = await self._run(
            "reserve", _RESERVE, [*self._window_keys(budget_key, window_id), self._k("rs", reservation_id)],
            [dec_text(amount), dec_text(limit), reservation_id, at, now_ms(expires_at), now_ms(purge_at),
             "1" if force else "0", budget_key, window_id, self.retention_ms])
        if len(reply) == 1:
            raise ValueError(f"reservation id {reservation_id!r} is already in use")
        fits, placed, spent, reserved = reply
        out = ReserveOutcome(fits=bool(int(fits)), placed=bool(int(placed)), spent=parse_dec(_text(spent)),
                             reserved=parse_dec(_text(reserved)))
        return reserve_result(out, amount, limit)

    async def settle(self, reservation_id: str, actual: Decimal, now: float) -> Settlement | None:
        check_key("reservation id", reservation_id)
        actual = check_amount("actual amount", actual)
        check_now(now)
        reply = await self._run("settle", _SETTLE, [self._k("rs", reservation_id)],
                                [dec_text(actual), now_ms(now), self.retention_ms, reservation_id])
        if reply is None:
            return None
        status, booked, late, spent, reserved, amount, budget_key, window_id = reply
        st = _text(status)
        if st not in ("settled", "already-settled", "released"):
            raise CounterUnavailable(f"redis counters: settle answered {st!r}", backend="redis")
        return SettleOutcome(status=st, budget_key=_text(budget_key), window_id=_text(window_id),  # type: ignore[arg-type]
                             amount=parse_dec(_text(amount)), actual=parse_dec(_text(booked)) if booked else ZERO,
                             late=bool(int(late)), spent=parse_dec(_text(spent)), reserved=parse_dec(_text(reserved)))

    async def release(self, reservation_id: str) -> bool:
        check_key("reservation id", reservation_id)
        reply = await self._run("release", _RELEASE, [self._k("rs", reservation_id)], [reservation_id])
        return bool(int(reply))

    async def charge(self, budget_key: str, window_id: str, amount: Decimal, now: float) -> Usage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        amount = check_amount("amount", amount)
        check_now(now)
        return await self._usage("charge", budget_key, window_id, dec_text(amount), now)

    async def usage(self, budget_key: str, window_id: str, now: float | None = None) -> Usage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        at = check_now(time.time() if now is None else now)
        return await self._usage("usage", budget_key, window_id, "", at)

    async def _usage(self, op: str, budget_key: str, window_id: str, amount: str, now: float) -> Usage:
        spent, reserved = await self._run(op, _USAGE, self._window_keys(budget_key, window_id),
                                          [amount, now_ms(now), self.retention_ms, budget_key, window_id])
        return BudgetUsage(spent=parse_dec(_text(spent)), reserved=parse_dec(_text(reserved)))

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int,
                             now: float | None = None) -> list[tuple[str, Usage]]:
        """Every budget key starting with `key_prefix` with spend or held reservations in the window,
        and its usage, in key order: at most `limit`. SCAN walks the keyspace (MATCH on the prefix
        of the usage keys, `_SCAN_COUNT` a call) until it has `limit` of them or has seen every key,
        so which ones come back when there are more is the server's order, not the first by key."""
        from redis.exceptions import RedisError

        check_listing(window_id, key_prefix, limit)
        at = now_ms(check_now(time.time() if now is None else now))
        head = f"{self.prefix}bu:"
        pattern = _glob(head + _escape(key_prefix)) + "*"
        found: dict[str, BudgetUsage] = {}
        seen: set[str] = set()
        cursor = 0
        try:
            while True:
                cursor, names = await self.client.scan(cursor=cursor, match=pattern, count=_SCAN_COUNT)
                keys: list[str] = []
                guess: list[tuple[str, str] | None] = []
                for raw in names:
                    name = _text(raw)
                    if name in seen:  # (SCAN may return a key twice)
                        continue
                    seen.add(name)
                    tail = name[len(head):]
                    parsed = _window_tail(tail)
                    if parsed is not None and (parsed[1] != window_id or not parsed[0].startswith(key_prefix)):
                        continue
                    keys += [name, f"{self.prefix}br:{tail}", f"{self.prefix}bz:{tail}"]
                    guess.append(parsed)
                if keys:
                    reply = await self._run("budget listing", _LIST, keys, [at])
                    for i, parsed in enumerate(guess):
                        k, w, spent, reserved = (_text(x) for x in reply[4 * i: 4 * i + 4])
                        if not k and parsed is not None:  # (written before the hash named its key)
                            k, w = parsed
                        usage = BudgetUsage(spent=parse_dec(spent), reserved=parse_dec(reserved))
                        if k and w == window_id and k.startswith(key_prefix) and (usage.spent or usage.reserved):
                            found[k] = usage
                if cursor == 0 or len(found) >= limit:
                    break
        except (RedisError, OSError) as e:
            raise CounterUnavailable(f"redis counters: budget listing failed: {type(e).__name__}: {e}",
                                     backend="redis") from e
        return sorted(found.items())[:limit]
