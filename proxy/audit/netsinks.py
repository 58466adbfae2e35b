"""Audit sinks that ship events off the host: stdout, syslog (TCP/TLS) and HTTP (Splunk HEC / JSON).

Every sink follows `proxy.audit.sink.Sink`: `submit()` is synchronous and never
blocks (it appends to a bounded in-memory queue, or drops and counts when the
queue is full); one writer task per sink delivers from the head of the queue.
An event leaves the queue only once it was delivered (or, for HTTP, rejected
with a non-retryable 4xx: then it is kept in the sink's dead-letter file, see
proxy/audit/deadletter.py), so a failing destination holds events in order and
they are delivered after it recovers. With HEC indexer acknowledgement (`ack`)
"delivered" means indexed: a batch HEC accepted stays held (and counted in the
queue) until its ackId is reported indexed, and is sent again if it is not
within `ack_timeout_seconds`. Network failures are retried forever
with exponential backoff and full jitter (`min_backoff` .. `max_backoff`);
HTTP honours `Retry-After` on 429/503.

`healthy` is False while the queue is full, while the last delivery attempt
failed and the sink is retrying, or after a batch was refused for good (dead
letters); it becomes True again after the next successful delivery.

Delivery is at-least-once: a batch that failed half-way is sent again. Syslog
over TCP has no acknowledgements (RFC 6587/5425), so lines written into the
socket just before the receiver died can be lost; the sink watches the
connection for EOF to reconnect as early as possible. A syslog event larger
than `max_message_bytes` is reduced by a fixed rule (proxy/audit/truncate.py),
never split.

Secrets are referenced, never inline: the HTTP token is read from the
environment variable named by `token_env` and is never logged.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import itertools
import json
import logging
import os
import random
import socket
import ssl
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import certifi
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..logredact import redact
from .deadletter import DeadLetterFile
from .sink import Overflow, Sink
from .truncate import fit_event

log = logging.getLogger("proctor.audit.sinks")

USER_AGENT = "Proctor-Audit/1"
_DROP_LOG_INTERVAL = 60.0
_MiB = 1024 * 1024


# --------------------------------------------------------------------- configs
class _SinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=100)
    queue_size: int = Field(default=10000, ge=1, le=10_000_000)
    overflow: Overflow = "fail_closed"  # as the file sink: writes stop while the trail cannot be delivered
    min_backoff: float = Field(default=0.5, gt=0, le=60)
    max_backoff: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _check_backoff(self):
        if self.max_backoff < self.min_backoff:
            raise ValueError("max_backoff must be >= min_backoff")
        return self


class StdoutSinkConfig(_SinkConfig):
    type: Literal["stdout"] = "stdout"


class SyslogSinkConfig(_SinkConfig):
    type: Literal["syslog"] = "syslog"
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    transport: Literal["tcp", "tls"] = "tls"
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    app_name: str = Field(default="proctor", min_length=1, max_length=48)
    # RFC 5424 table 1: 13 = "log audit". 10 (authpriv) is the other usual choice.
    facility: int = Field(default=13, ge=0, le=23)
    hostname: str | None = Field(default=None, min_length=1, max_length=255)
    msgid: str = Field(default="ocsf", min_length=1, max_length=32)
    utf8_bom: bool = False
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    write_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Largest SYSLOG-MSG (header + event) sent; a larger event is reduced by the rule in
    # proxy/audit/truncate.py, never split. RFC 5425 receivers must accept 2048, should 8192.
    max_message_bytes: int = Field(default=8192, ge=2048, le=16 * _MiB)

    @field_validator("app_name", "msgid", "hostname")
    @classmethod
    def _printusascii(cls, v: str | None) -> str | None:
        if v is not None and not all(33 <= ord(c) <= 126 for c in v):
            raise ValueError("must be printable US-ASCII without spaces (RFC 5424)")
        return v

    @model_validator(mode="after")
    def _check_tls(self):
        if self.transport == "tcp" and (self.ca_file or self.insecure_skip_verify):
            raise ValueError("ca_file / insecure_skip_verify require transport: tls")
        return self


class HttpSinkConfig(_SinkConfig):
    type: Literal["http"] = "http"
    url: str
    format: Literal["splunk_hec", "json"] = "splunk_hec"
    token_env: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    batch_max_events: int = Field(default=500, ge=1, le=100_000)
    batch_max_bytes: int = Field(default=_MiB, ge=1024, le=100 * _MiB)
    flush_interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    sourcetype: str = "ocsf:api_activity"
    source: str = "proctor"
    index: str | None = None
    hostname: str | None = Field(default=None, min_length=1, max_length=255)
    # Events refused for good (a non-retryable 4xx) go here instead of being lost.
    # Default: <state_dir>/dead-letters/<sink name>.jsonl; relative paths are relative to state_dir.
    dead_letter_file: str | None = Field(default=None, min_length=1)
    dead_letter_max_bytes: int = Field(default=64 * _MiB, ge=0, le=1 << 40)  # 0: no dead letters (lost, counted)
    # Splunk HEC indexer acknowledgement: delivered = indexed (needs the token's "indexer acknowledgement").
    ack: bool = False
    channel: str | None = None  # X-Splunk-Request-Channel (a GUID); default: a new random one per start
    ack_url: str | None = None  # default: <scheme>://<host:port>/services/collector/ack
    ack_poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    ack_timeout_seconds: float = Field(default=300.0, ge=1, le=3600)  # then the batch is sent again

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("token", "password", "secret", "api_key"):
                if key in data:
                    raise ValueError(
                        f"inline `{key}` is not allowed in an audit sink: put the token in an "
                        "environment variable and name it with `token_env`"
                    )
        return data

    @field_validator("url", "ack_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError(f"invalid audit sink URL: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("audit sink URL must use http or https")
        if not parts.hostname:
            raise ValueError("audit sink URL must name a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("audit sink URL must not carry credentials; use token_env")
        if any(c.isspace() for c in v):
            raise ValueError("audit sink URL must not contain whitespace")
        return v

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("token_env must name an environment variable")
        return v

    @model_validator(mode="after")
    def _check_tls(self):
        if urlsplit(self.url).scheme != "https" and (self.ca_file or self.insecure_skip_verify):
            raise ValueError("ca_file / insecure_skip_verify require an https URL")
        return self

    @model_validator(mode="after")
    def _check_ack(self):
        if (self.ack or self.channel or self.ack_url) and self.format != "splunk_hec":
            raise ValueError("ack / channel / ack_url are Splunk HEC settings (format: splunk_hec)")
        if self.channel is not None:
            try:
                uuid.UUID(self.channel)
            except ValueError:
                raise ValueError("channel must be a GUID, e.g. 0b5a5f3e-7a63-4d1c-9d1e-3f2c8a1b6e70") from None
        if self.ack_url is not None:
            if urlsplit(self.ack_url).netloc != urlsplit(self.url).netloc:
                raise ValueError("ack_url must be on the same host and port as url (it carries the token)")
        return self


SinkConfig = StdoutSinkConfig | SyslogSinkConfig | HttpSinkConfig


# --------------------------------------------------------------------- helpers
def _label(url: str) -> str:
    """scheme://host[:port] — safe to log."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _event_seconds(event: dict[str, Any] | None) -> float:
    """The event's time in epoch seconds (OCSF `time` is epoch milliseconds)."""
    t = event.get("time") if isinstance(event, dict) else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t == t and t > 0:
        return t / 1000.0 if t > 1e11 else float(t)
    return time.time()


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def _ssl_context(ca_file: str | None, insecure: bool, what: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file or certifi.where())
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"{what}: cannot load ca_file {ca_file!r}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        log.warning("%s: insecure_skip_verify is set: the server certificate is NOT verified", what)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _strip_newline(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


@dataclass(slots=True)
class _Item:
    data: bytes  # what the writer sends for this event (frame, HEC object, JSON line)
    enqueued: float  # loop-independent monotonic time


# ------------------------------------------------------------------ base class
class _QueuedSink(Sink):
    """Bounded queue + one writer task; items leave the queue only once handled."""

    kind = "queued"

    def __init__(self, config: _SinkConfig, default_name: str) -> None:
        super().__init__()
        self.config = config
        self.name = config.name or default_name
        self.overflow = config.overflow
        self._maxsize = config.queue_size
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()  # writer: something to do
        self._space = asyncio.Event()  # wait_for_capacity: items left the queue
        self._empty = asyncio.Event()  # close: queue drained
        self._empty.set()
        self._failing = False
        self._rejected = False  # a batch was refused for good (dead letters) since the last delivery
        self._inflight_n = 0  # events sent but not yet confirmed (HEC ack), still held
        self._closed = False
        self._stop = False  # the writer must exit (set after the drain deadline)
        self._task: asyncio.Task | None = None
        self._last_drop_log = float("-inf")

    # -- Sink interface ---------------------------------------------------
    def submit(self, line: bytes, event: dict[str, Any]) -> bool:
        self.stats["submitted"] += 1
        if self._closed:
            self._drop("sink closed")
            return False
        if self._held() >= self._maxsize:
            self._drop("queue full")
            return False
        try:
            data = self._prepare(line, event)
        except Exception:  # noqa: BLE001 - submit never raises
            log.exception("audit sink %s: cannot encode an event; counting it as failed", self.name)
            self.stats["failed"] += 1
            return False
        was_empty = not self._queue
        self._queue.append(_Item(data, time.monotonic()))
        self._queued_bytes += len(data)
        self._empty.clear()
        if self._should_wake(was_empty):
            self._wake.set()
        return True

    def _held(self) -> int:
        return len(self._queue) + self._inflight_n

    @property
    def healthy(self) -> bool:
        return not self._closed and not self._failing and not self._rejected and self._held() < self._maxsize

    @property
    def queue_depth(self) -> int:
        return self._held()

    async def wait_for_capacity(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self._held() >= self._maxsize:
            if self._closed:
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except asyncio.TimeoutError:
                return self._held() < self._maxsize
        return not self._closed

    async def start(self) -> None:
        if self._task is not None or self._closed:
            return
        await self._open()
        self._task = asyncio.create_task(self._run_forever(), name=f"proctor-audit-{self.name}")
        if self._queue:
            self._wake.set()

    async def close(self, drain_seconds: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        started = time.monotonic()
        if self._task is not None and self._held() and drain_seconds > 0:
            try:
                await asyncio.wait_for(self._empty.wait(), drain_seconds)
            except asyncio.TimeoutError:
                pass
        self._stop = True
        task, self._task = self._task, None
        if task is not None:
            # asyncio.wait_for (3.11) can swallow a cancellation that races with the
            # inner operation completing; keep cancelling until the writer is gone.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if not task.cancelled() and task.exception() is not None:
                log.debug("audit sink %s: writer ended with %r", self.name, task.exception())
        try:
            await self._shutdown()
        except Exception:  # noqa: BLE001
            log.debug("audit sink %s: error while shutting down", self.name, exc_info=True)
        left = self._held()
        self._forget_inflight()
        self._queue.clear()
        self._queued_bytes = 0
        self._empty.set()
        self._space.set()  # release anyone waiting for capacity
        if left:
            self.stats["dropped"] += left
            log.warning(
                "audit sink %s closed after %.1fs with %d undelivered event(s) (lost)",
                self.name, time.monotonic() - started, left,
            )
        else:
            log.info("audit sink %s closed; all events delivered", self.name)

    # -- for subclasses ---------------------------------------------------
    def _prepare(self, line: bytes, event: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _should_wake(self, was_empty: bool) -> bool:
        return was_empty

    async def _open(self) -> None:
        """Create loop-bound resources (sessions)."""

    async def _shutdown(self) -> None:
        """Release connections and sessions."""

    def _forget_inflight(self) -> None:
        """At close: drop what was sent but never confirmed (counted as lost by the caller)."""
        self._inflight_n = 0

    async def _run(self) -> None:
        raise NotImplementedError

    def _check_stop(self) -> None:
        if self._stop:
            raise asyncio.CancelledError

    async def _run_forever(self) -> None:
        while True:
            self._check_stop()
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep delivering whatever happens
                log.exception("audit sink %s: writer crashed; restarting", self.name)
                await asyncio.sleep(self.config.min_backoff)

    async def _wait_items(self) -> None:
        self._check_stop()
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()

    def _batch(self, max_events: int, max_bytes: int, overhead: int = 0) -> tuple[int, list[bytes]]:
        """The head of the queue, up to max_events / max_bytes (at least one item)."""
        out: list[bytes] = []
        size = 0
        for item in itertools.islice(self._queue, max_events):
            n = len(item.data) + overhead
            if out and size + n > max_bytes:
                break
            out.append(item.data)
            size += n
        return len(out), out

    def _remove(self, n: int) -> list[_Item]:
        out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        for item in out:
            self._queued_bytes -= len(item.data)
        self._released()
        return out

    def _released(self) -> None:
        """Events left the held set: wake whoever waits for room or for the drain."""
        self._space.set()
        if not self._queue and not self._inflight_n:
            self._empty.set()

    def _delivered(self, n: int, remove: bool = True) -> None:
        if remove:
            self._remove(n)
        self.stats["sent"] += n
        if self._failing or self._rejected:
            self._failing = self._rejected = False
            log.info("audit sink %s: delivery recovered", self.name)

    def _retrying(self, why: str) -> None:
        self.stats["retried"] += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "audit sink %s: delivery failing (%s); holding %d event(s) and retrying with backoff",
                self.name, redact(why), len(self._queue),
            )
        else:
            log.debug("audit sink %s: still failing (%s)", self.name, redact(why))

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        ceiling = min(cfg.max_backoff, cfg.min_backoff * 2.0 ** max(0, attempt - 1))
        return random.uniform(0, ceiling)

    async def _pause(self, delay: float) -> None:
        """Back off; while closing, retry at the minimum pace to drain in time."""
        self._check_stop()
        if self._closed:
            delay = min(delay, self.config.min_backoff)
        await asyncio.sleep(delay)
        self._check_stop()

    def _drop(self, why: str) -> None:
        self.stats["dropped"] += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning(
                "audit sink %s: dropping events (%s); %d dropped so far",
                self.name, why, self.stats["dropped"],
            )


# ---------------------------------------------------------------------- stdout
class StdoutSink(_QueuedSink):
    """JSON lines on standard output, written from a worker thread."""

    kind = "stdout"

    def __init__(self, config: StdoutSinkConfig, stream: BinaryIO | None = None) -> None:
        super().__init__(config, "stdout")
        self._stream = stream

    def _prepare(self, line: bytes, event: dict[str, Any]) -> bytes:
        return line if line.endswith(b"\n") else line + b"\n"

    def _write(self, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            stream = getattr(sys.stdout, "buffer", None)
        if stream is None:  # a text-only stdout replacement
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
            return
        stream.write(data)
        stream.flush()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            await self._wait_items()
            n, chunks = self._batch(1000, _MiB)
            try:
                await loop.run_in_executor(None, self._write, b"".join(chunks))
            except (OSError, ValueError) as e:
                attempt += 1
                self._retrying(f"{type(e).__name__}: {e}")
                await self._pause(self._backoff(attempt))
                continue
            attempt = 0
            self._delivered(n)


# ---------------------------------------------------------------------- syslog
def syslog_severity(event: dict[str, Any] | None) -> int:
    """RFC 5424 severity for an OCSF event.

    severity_id 0/1 (unknown/informational) -> 6 informational, 2 (low) -> 5 notice,
    3 (medium) -> 4 warning, 4..6 (high/critical/fatal) -> 3 error, 99 (other) -> 5 notice;
    status_id 2 (failure) raises it to at least 4 warning.
    """
    event = event if isinstance(event, dict) else {}
    try:
        sid = int(event.get("severity_id") or 1)
    except (TypeError, ValueError):
        sid = 1
    if sid == 99:
        sev = 5
    elif sid >= 4:
        sev = 3
    elif sid == 3:
        sev = 4
    elif sid == 2:
        sev = 5
    else:
        sev = 6
    if event.get("status_id") == 2:
        sev = min(sev, 4)
    return sev


def _rfc3339(seconds: float) -> str:
    dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _header_field(value: str, limit: int) -> str:
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class SyslogSink(_QueuedSink):
    """RFC 5424 messages, RFC 6587 octet-counted, over TCP or TLS (RFC 5425)."""

    kind = "syslog"
    _BATCH_EVENTS = 500
    _BATCH_BYTES = 256 * 1024

    def __init__(self, config: SyslogSinkConfig) -> None:
        super().__init__(config, f"syslog:{config.host}:{config.port}")
        self.config: SyslogSinkConfig = config
        self.stats["truncated"] = 0  # events reduced to fit max_message_bytes
        self._hostname = _header_field(config.hostname or socket.gethostname(), 255)
        self._procid = str(os.getpid())
        self._ssl = (
            _ssl_context(config.ca_file, config.insecure_skip_verify, f"audit sink {self.name}")
            if config.transport == "tls"
            else None
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task | None = None

    def format_message(self, line: bytes, event: dict[str, Any]) -> bytes:
        """One RFC 5424 SYSLOG-MSG (without framing), at most `max_message_bytes`."""
        cfg = self.config
        pri = cfg.facility * 8 + syslog_severity(event)
        header = f"<{pri}>1 {_rfc3339(_event_seconds(event))} {self._hostname} {cfg.app_name} {self._procid} {cfg.msgid} - "
        head = header.encode("ascii") + (b"\xef\xbb\xbf" if cfg.utf8_bom else b"")
        msg, reduced = fit_event(line, event, cfg.max_message_bytes - len(head))
        if reduced:
            self.stats["truncated"] += 1
        return head + msg

    def _prepare(self, line: bytes, event: dict[str, Any]) -> bytes:
        msg = self.format_message(line, event)
        return str(len(msg)).encode("ascii") + b" " + msg

    def _connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> None:
        cfg = self.config
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                cfg.host,
                cfg.port,
                ssl=self._ssl,
                server_hostname=cfg.host if self._ssl is not None else None,
                ssl_handshake_timeout=cfg.connect_timeout if self._ssl is not None else None,
            ),
            cfg.connect_timeout,
        )
        self._reader, self._writer = reader, writer
        self._watch = asyncio.create_task(self._watch_eof(reader, writer), name=f"proctor-audit-{self.name}-eof")
        log.info("audit sink %s: connected (%s)", self.name, cfg.transport)

    async def _watch_eof(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The receiver never talks; EOF or an error means the connection is gone."""
        try:
            while await reader.read(4096):
                pass
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        if self._writer is writer:
            log.info("audit sink %s: receiver closed the connection", self.name)
            self._disconnect()

    def _disconnect(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _shutdown(self) -> None:
        writer = self._writer
        self._disconnect()
        if writer is not None:
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001
                pass

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wait_items()
            try:
                if not self._connected():
                    self._disconnect()
                    await self._connect()
                n, frames = self._batch(self._BATCH_EVENTS, self._BATCH_BYTES)
                assert self._writer is not None
                self._writer.write(b"".join(frames))
                await asyncio.wait_for(self._writer.drain(), self.config.write_timeout)
                if not self._connected():
                    raise ConnectionResetError("connection closed while writing")
            except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError) as e:
                self._disconnect()
                attempt += 1
                self._retrying(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                await self._pause(self._backoff(attempt))
                continue
            attempt = 0
            self._delivered(n)


# ------------------------------------------------------------------------ HTTP
@dataclass(slots=True)
class _Answer:
    """What one POST came to."""

    outcome: Literal["ok", "retry", "reject"]
    why: str = ""
    wait: float | None = None  # Retry-After
    status: int = 0
    ack_id: int | None = None  # HEC indexer acknowledgement id of an accepted batch
    invalid_event: int | None = None  # HEC: index of the first event it refused (those before were accepted)


@dataclass(slots=True)
class _Unacked:
    items: list[_Item]
    sent: float  # monotonic
    attempts: int = 1


def _hec_json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def default_ack_url(url: str) -> str:
    """`/services/collector/ack` on the event URL's host (whatever the event path was)."""
    parts = urlsplit(url)
    path = parts.path
    i = path.find("/services/collector")
    prefix = path[:i] if i >= 0 else ""
    return urlunsplit((parts.scheme, parts.netloc, prefix + "/services/collector/ack", "", ""))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "http"


class HttpSink(_QueuedSink):
    """Batches to Splunk HEC (`splunk_hec`) or a generic JSON-array endpoint (`json`)."""

    kind = "http"

    def __init__(self, config: HttpSinkConfig, state_dir: Path | None = None) -> None:
        super().__init__(config, f"http:{_label(config.url)}")
        self.config: HttpSinkConfig = config
        self.stats["dead_lettered"] = 0
        self._label = _label(config.url)
        self._hostname = config.hostname or socket.gethostname()
        self._ssl: ssl.SSLContext | bool | None = None
        if urlsplit(config.url).scheme == "https":
            self._ssl = (
                False
                if config.insecure_skip_verify
                else _ssl_context(config.ca_file, False, f"audit sink {self.name}")
            )
            if config.insecure_skip_verify:
                log.warning("audit sink %s: insecure_skip_verify is set: the server certificate is NOT verified", self.name)
        elif config.token_env and urlsplit(config.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("audit sink %s: the token is sent over plain http", self.name)
        if config.token_env and not os.environ.get(config.token_env):
            log.warning(
                "audit sink %s: token variable %s is not set; events are held until it is",
                self.name, config.token_env,
            )
        self._session: aiohttp.ClientSession | None = None
        # HEC: the static part of each event object; `event` is the line itself
        # (exactly the bytes that were chained), spliced in, not re-serialised.
        meta: dict[str, Any] = {"host": self._hostname, "source": config.source, "sourcetype": config.sourcetype}
        if config.index:
            meta["index"] = config.index
        self._hec_meta = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))[1:-1].encode()
        # dead letters: events refused for good are kept, not dropped
        # (a directory of their own: never mistaken for rotated audit files, never pruned with them)
        dl = Path(config.dead_letter_file) if config.dead_letter_file else Path("dead-letters") / f"{_slug(self.name)}.jsonl"
        limit = config.dead_letter_max_bytes
        if not dl.is_absolute():
            if state_dir is None:
                limit = 0  # built outside Proctor's runtime (no state dir): nowhere to keep them
            dl = (state_dir or Path(".")) / dl
        self.dead_letters = DeadLetterFile(dl, limit, self.name)
        self._batch_cap = config.batch_max_events  # halved on 413 until a batch fits
        # HEC indexer acknowledgement: batches accepted but not yet reported indexed
        self._channel = config.channel or (str(uuid.uuid4()) if config.ack else None)
        self._ack_url = config.ack_url or default_ack_url(config.url)
        self._unacked: dict[int, _Unacked] = {}
        # Overdue batches the ack poller hands back: only the writer task touches the queue
        # (it may be mid-POST, about to remove the head it sent), so they wait here.
        self._resend: list[_Unacked] = []
        self._ack_task: asyncio.Task | None = None
        self._ack_wake = asyncio.Event()
        self._warned_no_ack = False

    def _prepare(self, line: bytes, event: dict[str, Any]) -> bytes:
        body = _strip_newline(line)
        if self.config.format == "json":
            return body
        t = f"{_event_seconds(event):.3f}".encode()
        return b'{"time":' + t + b"," + self._hec_meta + b',"event":' + body + b"}"

    def _should_wake(self, was_empty: bool) -> bool:
        cfg = self.config
        return (
            was_empty
            or len(self._queue) == cfg.batch_max_events
            or self._queued_bytes - len(self._queue[-1].data) < cfg.batch_max_bytes <= self._queued_bytes
        )

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=2, ssl=self._ssl if self._ssl is not None else True),
        )

    async def start(self) -> None:
        await super().start()
        if self.config.ack and self._ack_task is None and self._session is not None:
            self._ack_task = asyncio.create_task(self._poll_acks_forever(), name=f"proctor-audit-{self.name}-ack")

    async def _shutdown(self) -> None:
        task, self._ack_task = self._ack_task, None
        if task is not None:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _forget_inflight(self) -> None:
        self._unacked.clear()
        self._resend.clear()
        self._inflight_n = 0

    def _take_resends(self) -> None:
        """Writer task only: put the batches the ack poller found overdue back at the head."""
        while self._resend:
            self._requeue(self._resend.pop())

    async def _wait_batch(self) -> None:
        cfg = self.config
        while True:
            self._take_resends()
            self._check_stop()
            if not self._queue:
                self._wake.clear()
                if not self._resend:
                    await self._wake.wait()
                continue
            if self._closed or len(self._queue) >= cfg.batch_max_events or self._queued_bytes >= cfg.batch_max_bytes:
                return
            remaining = self._queue[0].enqueued + cfg.flush_interval_seconds - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _body(self, chunks: list[bytes]) -> bytes:
        if self.config.format == "json":
            return b"[" + b",".join(chunks) + b"]"
        return b"\n".join(chunks)

    async def _run(self) -> None:
        cfg = self.config
        overhead = 1
        while True:
            await self._wait_batch()
            n, chunks = self._batch(min(self._batch_cap, cfg.batch_max_events), cfg.batch_max_bytes - 2, overhead)
            body = self._body(chunks)
            attempt = 0
            while True:
                self._check_stop()
                attempt += 1
                answer = await self._post(body)
                if answer.outcome == "ok":
                    self._accepted(n, answer)
                    break
                if answer.outcome == "reject":
                    self._refused(n, chunks, answer)
                    break
                self._retrying(answer.why)
                # Retry-After is honoured (capped at max_backoff), but never below min_backoff.
                await self._pause(max(answer.wait, cfg.min_backoff) if answer.wait is not None else self._backoff(attempt))

    # -- outcomes --------------------------------------------------------------
    def _accepted(self, n: int, answer: _Answer) -> None:
        self._batch_cap = self.config.batch_max_events
        if not self.config.ack:
            self._delivered(n)
            return
        if answer.ack_id is None:
            # the token has indexer acknowledgement off: HEC's 200 is all there is
            if not self._warned_no_ack:
                self._warned_no_ack = True
                log.warning("audit sink %s: ack is on but HEC returned no ackId (indexer acknowledgement is off for "
                            "this token): events count as delivered when HEC accepts them", self.name)
            self._delivered(n)
            return
        items = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        for item in items:
            self._queued_bytes -= len(item.data)
        old = self._unacked.pop(answer.ack_id, None)
        if old is not None:  # HEC reused an id it never confirmed (channel reset): send that batch again
            self._requeue(old)
        self._unacked[answer.ack_id] = _Unacked(items, time.monotonic())
        self._inflight_n += len(items)
        self._failing = False  # HEC is answering; health now follows the acks
        self._ack_wake.set()

    def _refused(self, n: int, chunks: list[bytes], answer: _Answer) -> None:
        """A non-retryable 4xx: split an oversized batch, else keep the refused events as dead letters."""
        if answer.status == 413 and n > 1:
            self._batch_cap = max(1, n // 2)
            log.warning("audit sink %s: batch of %d events too large (HTTP 413); sending %d at a time",
                        self.name, n, self._batch_cap)
            return
        k = answer.invalid_event
        if k is not None and 0 <= k < n:
            # HEC handles a batch in order and stops at the first bad event: the ones before it
            # were accepted (not acknowledged: HEC gives no ackId with an error), the ones after
            # it were never looked at and stay queued for the next batch.
            if k:
                self._delivered(k)
            chunks, n = [chunks[k]], 1
        self._remove(n)
        kept = self.dead_letters.keep(chunks, answer.why)
        self.stats["dead_lettered"] += kept
        self.stats["failed"] += n - kept
        self._rejected = True  # unhealthy (fail_closed stops writes) until a later delivery succeeds
        log.error(
            "audit sink %s refused %d event(s) (%s); not retrying: %s", self.name, n, answer.why,
            f"kept in {self.dead_letters.path}" if kept == n else f"{n - kept} lost (dead-letter file full or off)",
        )

    def _requeue(self, batch: _Unacked) -> None:
        """Put a batch back at the head of the queue (it goes out again before newer events)."""
        self._inflight_n -= len(batch.items)
        self._queue.extendleft(reversed(batch.items))
        self._queued_bytes += sum(len(i.data) for i in batch.items)
        self._empty.clear()
        self.stats["retried"] += 1
        self._wake.set()

    # -- HEC indexer acknowledgement ------------------------------------------
    async def _poll_acks_forever(self) -> None:
        cfg = self.config
        attempt = 0
        while True:
            if not self._unacked:
                self._ack_wake.clear()
                await self._ack_wake.wait()
            # Splunk answers for an ack a little after indexing; poll at the configured pace
            # (faster while draining at shutdown)
            await asyncio.sleep(min(cfg.ack_poll_interval_seconds, 0.2) if self._closed else cfg.ack_poll_interval_seconds)
            if not self._unacked:
                continue
            try:
                ok, why = await self._check_acks()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep polling whatever happens
                ok, why = False, f"{type(e).__name__}: {e}"
            if ok:
                attempt = 0
            else:
                attempt += 1
                self._retrying(f"ack query failed: {why}")
                await asyncio.sleep(self._backoff(attempt))
            self._resend_overdue()

    async def _check_acks(self) -> tuple[bool, str]:
        ids = sorted(self._unacked)[:1000]
        status, doc, why = await self._request(self._ack_url, json.dumps({"acks": ids}).encode())
        if status != 200:
            return False, why
        acks = doc.get("acks")
        if not isinstance(acks, dict):
            return False, "ack response without an `acks` object"
        done = 0
        for key, indexed in acks.items():
            try:
                ack_id = int(key)
            except ValueError:
                continue
            if indexed is True and ack_id in self._unacked:
                batch = self._unacked.pop(ack_id)
                self._inflight_n -= len(batch.items)
                done += len(batch.items)
        if done:
            self._delivered(done, remove=False)
            self._released()
        return True, ""

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for ack_id in [i for i, b in self._unacked.items() if now - b.sent >= self.config.ack_timeout_seconds]:
            batch = self._unacked.pop(ack_id)
            log.warning("audit sink %s: %d event(s) not reported indexed within %.0fs (ackId %d); sending them again",
                        self.name, len(batch.items), self.config.ack_timeout_seconds, ack_id)
            self._resend.append(batch)  # the writer requeues it between two POSTs
            self._wake.set()

    # -- HTTP ------------------------------------------------------------------
    def _scrub(self, text: str, token: str | None) -> str:
        text = text.replace(self.config.url, self._label)
        if token:
            text = text.replace(token, "[REDACTED]")
        return redact(text)

    def _headers(self) -> tuple[dict[str, str], str | None, str | None]:
        """(headers, token, why not) — why not: the token variable is unset."""
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        token: str | None = None
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                return headers, None, f"token variable {cfg.token_env} is not set"
            headers["Authorization"] = f"{'Splunk' if cfg.format == 'splunk_hec' else 'Bearer'} {token}"
        if self._channel:
            headers["X-Splunk-Request-Channel"] = self._channel
        return headers, token, None

    async def _request(self, url: str, body: bytes) -> tuple[int, dict[str, Any], str]:
        """POST to the ack endpoint: (status, JSON answer, reason)."""
        headers, token, why_not = self._headers()
        if why_not:
            return 0, {}, why_not
        assert self._session is not None
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                allow_redirects=False,
            ) as resp:
                text = (await resp.content.read(1 << 20)).decode("utf-8", "replace")
                return resp.status, _hec_json(text), self._scrub(f"HTTP {resp.status}: {text[:300]}".strip(), token)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError) as e:
            return 0, {}, self._scrub(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, token)

    async def _post(self, body: bytes) -> _Answer:
        cfg = self.config
        assert self._session is not None
        headers, token, why_not = self._headers()
        if why_not:
            return _Answer("retry", why_not)
        try:
            async with self._session.post(
                cfg.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=cfg.timeout_seconds),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    ack_id = None
                    if cfg.ack:
                        try:
                            ack_id = _int_or_none(_hec_json((await resp.content.read(4096)).decode("utf-8", "replace")).get("ackId"))
                        except Exception:  # noqa: BLE001 - accepted either way
                            ack_id = None
                    return _Answer("ok", status=status, ack_id=ack_id)
                try:
                    detail = (await resp.content.read(4096)).decode("utf-8", "replace").strip()
                except Exception:  # noqa: BLE001
                    detail = ""
                why = f"HTTP {status}" + (f": {detail[:300]}" if detail else "")
                if 300 <= status < 400:
                    # Redirects are never followed (they would carry the token elsewhere);
                    # the events are held so that fixing the URL loses nothing.
                    location = resp.headers.get("Location", "")
                    where = _label(location) if "://" in location else "a relative URL"
                    return _Answer("retry", self._scrub(f"HTTP {status} redirect to {where} (not followed)", token))
                if status in (401, 403, 408, 429) or status >= 500:
                    # 401/403: a wrong or revoked token is fixed by an operator; hold the events until then
                    wait = _retry_after(resp.headers.get("Retry-After"), cfg.max_backoff) if status in (429, 503) else None
                    return _Answer("retry", self._scrub(why, token), wait, status)
                invalid = _int_or_none(_hec_json(detail).get("invalid-event-number")) if cfg.format == "splunk_hec" else None
                return _Answer("reject", self._scrub(why, token), None, status, invalid_event=invalid)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError) as e:
            text = str(e)
            return _Answer("retry", self._scrub(f"{type(e).__name__}: {text}" if text else type(e).__name__, token))


# ----------------------------------------------------------------------- build
_TYPES: dict[str, tuple[type[_SinkConfig], type[_QueuedSink]]] = {
    "stdout": (StdoutSinkConfig, StdoutSink),
    "syslog": (SyslogSinkConfig, SyslogSink),
    "http": (HttpSinkConfig, HttpSink),
}


def build_sink(cfg: dict[str, Any], state_dir: Path | None = None) -> Sink:
    """A sink from its config mapping (`type`: stdout, syslog or http); `state_dir`
    anchors relative paths (the HTTP sink's dead-letter file).

    Raises ValueError for an unknown type and pydantic.ValidationError (a
    ValueError) for an invalid config.
    """
    if not isinstance(cfg, dict):
        raise ValueError("an audit sink config must be a mapping")
    kind = cfg.get("type")
    if kind not in _TYPES:
        raise ValueError(f"unknown audit sink type {kind!r}; expected one of: {', '.join(_TYPES)}")
    model, cls = _TYPES[kind]
    config = model.model_validate(cfg)
    if cls is HttpSink:
        return HttpSink(config, state_dir)  # type: ignore[arg-type]
    return cls(config)  # type: ignore[arg-type]
