"""Network audit sinks (proxy/audit/netsinks.py) against real loopback servers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import ssl
import threading
import time

import pytest
import trustme
from aiohttp import web
from pydantic import ValidationError

from proxy.audit.netsinks import (
    HttpSink,
    StdoutSink,
    StdoutSinkConfig,
    SyslogSink,
    SyslogSinkConfig,
    build_sink,
    syslog_severity,
)

TOKEN = "hec-s3cr3t-token-0123456789"
FAST = {"min_backoff": 0.02, "max_backoff": 0.1}


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def event(i: int, **kw) -> tuple[bytes, dict]:
    ev = {
        "class_uid": 6003,
        "class_name": "API Activity",
        "time": 1_700_000_000_123 + i,
        "severity_id": 1,
        "status_id": 1,
        "seq": i,
        "msg": "héllo",
        **kw,
    }
    return json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode() + b"\n", ev


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------- syslog receiver
class SyslogReceiver:
    """Octet-counted frames (RFC 6587) over TCP or TLS; bound at once, listening on start()."""

    def __init__(self, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        self.port = self.sock.getsockname()[1]
        self.ssl_ctx = ssl_ctx
        self.frames: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, sock=self.sock, ssl=self.ssl_ctx)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b" ")
                assert head[:-1].isdigit(), head
                self.frames.append(await reader.readexactly(int(head[:-1])))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    def drop_connections(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def stop(self) -> None:
        self.drop_connections()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        else:
            self.sock.close()


_RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) - (?P<msg>.*)$", re.S
)


def parse_frame(frame: bytes) -> dict:
    m = _RFC5424.match(frame)
    assert m, frame
    return {k: m.group(k).decode() if k != "msg" else m.group(k) for k in ("pri", "ts", "host", "app", "procid", "msgid", "msg")}


def syslog_cfg(port: int, **kw) -> dict:
    return {"type": "syslog", "host": "127.0.0.1", "port": port, "transport": "tcp", **FAST, **kw}


# ----------------------------------------------------------------------- config
def test_config_validation():
    with pytest.raises(ValueError, match="unknown audit sink type"):
        build_sink({"type": "file", "path": "/tmp/x"})
    with pytest.raises(ValidationError, match="inline `token`"):
        build_sink({"type": "http", "url": "https://splunk:8088/services/collector/event", "token": "abc"})
    with pytest.raises(ValidationError):
        build_sink({"type": "http", "url": "https://splunk:8088/x", "bogus": 1})
    with pytest.raises(ValidationError, match="http or https"):
        build_sink({"type": "http", "url": "ftp://splunk/x"})
    with pytest.raises(ValidationError, match="credentials"):
        build_sink({"type": "http", "url": "https://user:pw@splunk/x"})
    with pytest.raises(ValidationError, match="transport: tls"):
        build_sink({"type": "syslog", "host": "h", "port": 514, "transport": "tcp", "ca_file": "/x"})
    with pytest.raises(ValidationError):
        build_sink({"type": "syslog", "host": "h", "port": 514, "facility": 24})
    with pytest.raises(ValidationError):
        build_sink({"type": "syslog", "host": "h", "port": 514, "app_name": "has space"})
    with pytest.raises(ValueError, match="ca_file"):
        build_sink({"type": "syslog", "host": "h", "port": 514, "ca_file": "/nonexistent/ca.pem"})
    with pytest.raises(ValidationError, match="max_backoff"):
        build_sink({"type": "stdout", "min_backoff": 5, "max_backoff": 1})
    s = build_sink({"type": "syslog", "host": "h", "port": 6514})
    assert isinstance(s, SyslogSink) and s.config.transport == "tls" and s.config.facility == 13
    assert s.overflow == "fail_closed" and s.healthy and s.queue_depth == 0
    h = build_sink({"type": "http", "url": "https://splunk:8088/services/collector/event", "token_env": "X", "overflow": "block"})
    assert isinstance(h, HttpSink) and h.overflow == "block"
    assert isinstance(build_sink({"type": "stdout"}), StdoutSink)


def test_syslog_severity_mapping_and_message_format():
    assert syslog_severity({"severity_id": 1, "status_id": 1}) == 6
    assert syslog_severity({}) == 6
    assert syslog_severity({"severity_id": 2}) == 5
    assert syslog_severity({"severity_id": 3}) == 4
    assert syslog_severity({"severity_id": 4}) == 3
    assert syslog_severity({"severity_id": 5}) == 3
    assert syslog_severity({"severity_id": 1, "status_id": 2}) == 4
    assert syslog_severity({"severity_id": 4, "status_id": 2}) == 3
    assert syslog_severity({"severity_id": "junk"}) == 6
    sink = SyslogSink(SyslogSinkConfig(host="h", port=1, transport="tcp", hostname="gw-1", facility=10))
    line, ev = event(0, severity_id=3)
    frame = sink._prepare(line, ev)
    length, _, msg = frame.partition(b" ")
    assert int(length) == len(msg)
    f = parse_frame(msg)
    assert f["pri"] == str(10 * 8 + 4)
    assert f["ts"] == "2023-11-14T22:13:20.123Z"
    assert (f["host"], f["app"], f["msgid"]) == ("gw-1", "proctor", "ocsf")
    assert f["msg"] == line[:-1]
    bom = SyslogSink(SyslogSinkConfig(host="h", port=1, transport="tcp", utf8_bom=True))
    assert parse_frame(bom.format_message(line, ev))["msg"] == b"\xef\xbb\xbf" + line[:-1]


# ----------------------------------------------------------------------- syslog
def test_syslog_tcp_delivers_rfc5424_octet_counted_frames():
    async def main():
        rx = SyslogReceiver()
        await rx.start()
        sink = build_sink(syslog_cfg(rx.port, hostname="proctor-gw"))
        await sink.start()
        sent = [event(0), event(1, severity_id=4), event(2, status_id=2)]
        for line, ev in sent:
            assert sink.submit(line, ev) is True
        await until(lambda: len(rx.frames) == 3, what="3 frames")
        for (_line, ev), frame in zip(sent, rx.frames):
            f = parse_frame(frame)
            assert int(f["pri"]) == 13 * 8 + syslog_severity(ev)
            assert f["ts"].endswith("Z") and f["ts"].startswith("2023-11-14T22:13:20.")
            assert (f["host"], f["app"], f["msgid"]) == ("proctor-gw", "proctor", "ocsf")
            assert f["procid"].isdigit()
            assert json.loads(f["msg"].decode("utf-8")) == ev
        assert [int(parse_frame(f)["pri"]) % 8 for f in rx.frames] == [6, 3, 4]
        for i in range(3, 10):
            sink.submit(*event(i))
        await until(lambda: len(rx.frames) == 10 and sink.stats["sent"] == 10, what="10 frames")
        assert rx.connections == 1  # persistent connection
        assert sink.stats == {"submitted": 10, "sent": 10, "dropped": 0, "failed": 0, "retried": 0, "truncated": 0}
        await sink.close(1)
        await rx.stop()

    run(main())


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit-pki")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    return {"ca": str(d / "ca.pem"), "other_ca": str(d / "other-ca.pem"), "server_ctx": server_ctx}


def test_syslog_tls_verifies_server_and_sends_sni(tls_pki):
    async def main():
        names: list[str | None] = []
        tls_pki["server_ctx"].sni_callback = lambda sslobj, name, ctx: names.append(name)
        rx = SyslogReceiver(tls_pki["server_ctx"])
        await rx.start()
        sink = build_sink(syslog_cfg(rx.port, host="localhost", transport="tls", ca_file=tls_pki["ca"]))
        await sink.start()
        line, ev = event(0)
        sink.submit(line, ev)
        await until(lambda: sink.stats["sent"] == 1, what="a TLS frame")
        assert json.loads(parse_frame(rx.frames[0])["msg"]) == ev
        assert "localhost" in names
        assert sink.healthy and sink.stats["sent"] == 1
        await sink.close(1)
        await rx.stop()
        tls_pki["server_ctx"].sni_callback = None

    run(main())


def test_syslog_tls_untrusted_server_is_never_sent_to(tls_pki, caplog):
    async def main():
        rx = SyslogReceiver(tls_pki["server_ctx"])
        await rx.start()
        sink = build_sink(syslog_cfg(rx.port, transport="tls", ca_file=tls_pki["other_ca"]))
        await sink.start()
        for i in range(3):
            sink.submit(*event(i))
        await until(lambda: sink.stats["retried"] >= 3, what="retries")
        assert not sink.healthy
        assert rx.frames == [] and sink.stats["sent"] == 0 and sink.queue_depth == 3
        await sink.close(0.1)
        assert sink.stats["dropped"] == 3 and sink.queue_depth == 0
        await rx.stop()

    with caplog.at_level(logging.INFO, logger="proctor.audit.sinks"):
        run(main())
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "certificate verify failed" in caplog.text
    assert "3 undelivered event(s)" in caplog.text


@pytest.mark.parametrize("overflow", ["block", "fail_closed"])
def test_syslog_receiver_down_then_up_delivers_everything_in_order(overflow):
    async def main():
        rx = SyslogReceiver()  # refusing connections for now
        sink = build_sink(syslog_cfg(rx.port, queue_size=5, overflow=overflow))
        await sink.start()
        health: list[bool] = []

        async def producer():
            for i in range(30):
                assert await sink.wait_for_capacity(5)
                assert sink.submit(*event(i))
                health.append(sink.healthy)

        task = asyncio.create_task(producer())
        await until(lambda: sink.stats["retried"] >= 2 and sink.queue_depth == 5, what="full queue")
        await asyncio.sleep(0.05)
        assert not task.done() and not sink.healthy
        assert await sink.wait_for_capacity(0.02) is False
        await rx.start()
        await asyncio.wait_for(task, 5)
        await until(lambda: len(rx.frames) == 30, what="30 frames")
        assert [json.loads(parse_frame(f)["msg"])["seq"] for f in rx.frames] == list(range(30))
        await until(lambda: sink.healthy and sink.stats["sent"] == 30, what="healthy again")
        assert sink.stats["dropped"] == 0 and sink.stats["sent"] == 30 and sink.stats["submitted"] == 30
        assert False in health
        await sink.close(1)
        await rx.stop()

    run(main())


def test_syslog_reconnects_after_receiver_closes_connection():
    async def main():
        rx = SyslogReceiver()
        await rx.start()
        sink = build_sink(syslog_cfg(rx.port))
        await sink.start()
        sink.submit(*event(0))
        await until(lambda: len(rx.frames) == 1)
        rx.drop_connections()
        await until(lambda: not sink._connected(), what="EOF noticed")
        for i in range(1, 4):
            sink.submit(*event(i))
        await until(lambda: len(rx.frames) == 4, what="frames after reconnect")
        assert rx.connections == 2
        assert [json.loads(parse_frame(f)["msg"])["seq"] for f in rx.frames] == [0, 1, 2, 3]
        await sink.close(1)
        await rx.stop()

    run(main())


def test_syslog_overflow_drop_counts_and_never_blocks():
    async def main():
        rx = SyslogReceiver()  # down
        sink = build_sink(syslog_cfg(rx.port, queue_size=10, overflow="drop"))
        await sink.start()
        lines = [event(i) for i in range(5000)]
        t0 = time.perf_counter()
        results = [sink.submit(line, ev) for line, ev in lines]
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, elapsed
        assert results.count(True) == 10 and results.count(False) == 4990
        assert sink.stats["dropped"] == 4990 and sink.queue_depth == 10
        assert not sink.healthy
        await rx.start()
        await until(lambda: len(rx.frames) == 10, what="queued frames")
        await until(lambda: sink.healthy)
        assert [json.loads(parse_frame(f)["msg"])["seq"] for f in rx.frames] == list(range(10))
        await sink.close(1)
        await rx.stop()

    run(main())


# ------------------------------------------------------------------ HTTP (HEC mock)
class Collector:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.responses: list[tuple[int, dict, str]] = []  # consumed in order; then 200
        self.elsewhere = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/collector/event"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/collector/event", self._handle)
        app.router.add_route("*", "/elsewhere", self._elsewhere)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append({"headers": dict(request.headers), "body": body, "at": time.monotonic()})
        if self.responses:
            status, headers, text = self.responses.pop(0)
            text = text.replace("{auth}", request.headers.get("Authorization", ""))
            return web.Response(status=status, headers=headers, text=text)
        return web.json_response({"text": "Success", "code": 0})

    async def _elsewhere(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.json_response({"text": "Success", "code": 0})

    def events(self) -> list[dict]:
        out = []
        for r in self.requests:
            out.extend(json.loads(line) for line in r["body"].split(b"\n"))
        return out

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def http_cfg(url: str, **kw) -> dict:
    return {"type": "http", "url": url, "token_env": "AUDIT_TEST_HEC_TOKEN", **FAST, **kw}


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("AUDIT_TEST_HEC_TOKEN", TOKEN)


def test_hec_auth_body_shape_batch_by_count_and_close_flush():
    async def main():
        c = Collector()
        await c.start()
        sink = build_sink(http_cfg(c.url, batch_max_events=3, flush_interval_seconds=30, index="sec", hostname="gw-1"))
        await sink.start()
        sent = [event(i) for i in range(7)]
        for line, ev in sent:
            assert sink.submit(line, ev)
        await until(lambda: len(c.requests) == 2, what="two full batches")
        await asyncio.sleep(0.1)
        assert len(c.requests) == 2  # the 7th waits for the flush interval
        for r in c.requests:
            assert r["headers"]["Authorization"] == f"Splunk {TOKEN}"
            assert r["headers"]["Content-Type"] == "application/json"
            assert len(r["body"].split(b"\n")) == 3
        t0 = time.monotonic()
        await sink.close(2)  # flushes the partial batch at once
        assert time.monotonic() - t0 < 1
        events = c.events()
        assert len(events) == 7
        for obj, (_line, ev) in zip(events, sent):
            assert obj["time"] == pytest.approx(ev["time"] / 1000, abs=1e-3)
            assert isinstance(obj["time"], float)
            assert (obj["sourcetype"], obj["source"], obj["host"], obj["index"]) == ("ocsf:api_activity", "proctor", "gw-1", "sec")
            assert obj["event"] == ev
        assert sink.stats == {"submitted": 7, "sent": 7, "dropped": 0, "failed": 0, "retried": 0, "dead_lettered": 0}
        await c.stop()

    run(main())


def test_hec_batch_by_interval_and_by_bytes():
    async def main():
        c = Collector()
        await c.start()
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.3, batch_max_events=100))
        await sink.start()
        t0 = time.monotonic()
        sink.submit(*event(0))
        sink.submit(*event(1))
        await asyncio.sleep(0.1)
        assert c.requests == []
        await until(lambda: len(c.requests) == 1, what="interval flush")
        assert c.requests[0]["at"] - t0 >= 0.25
        assert [e["event"]["seq"] for e in c.events()] == [0, 1]
        await sink.close(1)

        c.requests.clear()
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=30, batch_max_events=100, batch_max_bytes=1024))
        await sink.start()
        for i in range(12):
            sink.submit(*event(i, pad="x" * 200))
        await until(lambda: len(c.events()) >= 9, what="byte-limited batches")
        assert all(len(r["body"]) <= 1024 for r in c.requests)
        assert len(c.requests) >= 3
        await sink.close(1)
        assert [e["event"]["seq"] for e in c.events()] == list(range(12))
        await c.stop()

    run(main())


def test_hec_retries_503_then_200_and_health_flips(caplog):
    async def main():
        c = Collector()
        c.responses = [(503, {"Retry-After": "0"}, "busy")] * 2 + [(500, {}, "oops")] * 10_000
        await c.start()
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.01))
        await sink.start()
        assert sink.healthy
        sink.submit(*event(0))
        await until(lambda: sink.stats["retried"] >= 3, what="retries")
        assert not sink.healthy and sink.stats["sent"] == 0
        c.responses.clear()
        await until(lambda: sink.stats["sent"] == 1, what="delivery")
        assert sink.healthy
        assert len(c.requests) == sink.stats["retried"] + 1 and sink.stats["failed"] == 0
        assert len({r["body"] for r in c.requests}) == 1  # the same batch each time
        await sink.close(1)
        await c.stop()

    with caplog.at_level(logging.DEBUG, logger="proctor.audit.sinks"):
        run(main())
    assert "delivery failing (HTTP 503" in caplog.text and "recovered" in caplog.text
    assert TOKEN not in caplog.text


def test_hec_4xx_is_failed_not_retried_and_token_never_logged(caplog):
    async def main():
        c = Collector()
        # the server echoes the Authorization header back: it must still not reach the logs
        c.responses = [(400, {}, '{"text":"Invalid data format","auth":"{auth}"}'), (401, {}, "bad token {auth}")]
        await c.start()
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.01))
        await sink.start()
        sink.submit(*event(0))
        await until(lambda: sink.stats["failed"] == 1, what="first rejection")
        # 401/403: a wrong or revoked token is held and retried (an operator fixes it), not lost
        sink.submit(*event(1))
        await until(lambda: sink.stats["sent"] == 1, what="the 401'd batch delivered on retry")
        assert sink.stats["failed"] == 1 and sink.stats["retried"] == 1
        sink.submit(*event(2))
        await until(lambda: sink.stats["sent"] == 2)
        assert len(c.requests) == 4
        assert sink.healthy
        await sink.close(1)
        await c.stop()
        # a network failure too
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.01))
        await sink.start()
        sink.submit(*event(3))
        await until(lambda: sink.stats["retried"] >= 2)
        await sink.close(0.05)

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert "HTTP 400" in caplog.text and "Invalid data format" in caplog.text and "HTTP 401" in caplog.text
    assert TOKEN not in caplog.text
    assert "[REDACTED]" in caplog.text


def test_hec_redirect_not_followed():
    async def main():
        c = Collector()
        await c.start()
        c.responses = [(302, {"Location": f"http://127.0.0.1:{c.port}/elsewhere"}, "")] * 100
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.01))
        await sink.start()
        sink.submit(*event(0))
        await until(lambda: sink.stats["retried"] >= 2, what="retries")
        assert c.elsewhere == 0 and sink.stats["sent"] == 0 and not sink.healthy
        assert sink.queue_depth == 1  # held, not lost
        await sink.close(0.05)
        assert c.elsewhere == 0
        await c.stop()

    run(main())


def test_json_format_is_an_array_with_bearer_token():
    async def main():
        c = Collector()
        await c.start()
        sink = build_sink(http_cfg(c.url, format="json", flush_interval_seconds=0.05))
        await sink.start()
        sent = [event(i) for i in range(4)]
        for line, ev in sent:
            sink.submit(line, ev)
        await until(lambda: c.requests, what="a request")
        r = c.requests[0]
        assert r["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert r["headers"]["Content-Type"] == "application/json"
        assert json.loads(r["body"]) == [ev for _, ev in sent]
        await sink.close(1)
        await c.stop()

    run(main())


def test_missing_token_variable_holds_events(monkeypatch):
    monkeypatch.delenv("AUDIT_TEST_HEC_TOKEN")

    async def main():
        c = Collector()
        await c.start()
        sink = build_sink(http_cfg(c.url, flush_interval_seconds=0.01))
        await sink.start()
        sink.submit(*event(0))
        await until(lambda: sink.stats["retried"] >= 2)
        assert c.requests == [] and not sink.healthy
        monkeypatch.setenv("AUDIT_TEST_HEC_TOKEN", TOKEN)
        await until(lambda: sink.stats["sent"] == 1)
        assert sink.healthy
        await sink.close(1)
        await c.stop()

    run(main())


def test_wait_for_capacity_returns_when_queue_drains():
    async def main():
        c = Collector()
        c.responses = [(503, {}, "")] * 10_000
        await c.start()
        sink = build_sink(http_cfg(c.url, queue_size=2, overflow="block", flush_interval_seconds=0.01))
        await sink.start()
        assert sink.submit(*event(0)) and sink.submit(*event(1))
        assert not sink.healthy and sink.queue_depth == 2
        assert sink.submit(*event(2)) is False and sink.stats["dropped"] == 1
        t0 = time.monotonic()
        assert await sink.wait_for_capacity(0.1) is False
        assert 0.08 <= time.monotonic() - t0 < 0.5
        waiter = asyncio.create_task(sink.wait_for_capacity(5))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        c.responses.clear()
        assert await asyncio.wait_for(waiter, 3) is True
        assert sink.submit(*event(3))
        await until(lambda: sink.stats["sent"] == 3)
        assert sink.healthy
        await sink.close(1)
        await c.stop()

    run(main())


def test_close_gives_up_at_its_deadline_and_reports(caplog):
    async def main():
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            sink = build_sink(http_cfg(f"http://127.0.0.1:{port}/x", flush_interval_seconds=0.01, max_backoff=5, min_backoff=2))
            await sink.start()
            for i in range(5):
                sink.submit(*event(i))
            await until(lambda: sink.stats["retried"] >= 1)
            t0 = time.monotonic()
            await sink.close(0.3)
            took = time.monotonic() - t0
        assert 0.25 <= took < 1.0, took
        assert sink.stats["dropped"] == 5 and sink.queue_depth == 0 and not sink.healthy
        assert sink.submit(*event(9)) is False

    with caplog.at_level(logging.WARNING, logger="proctor.audit.sinks"):
        run(main())
    assert "5 undelivered event(s)" in caplog.text


# ----------------------------------------------------------------------- stdout
def test_stdout_sink_writes_lines(capsysbinary):
    async def main():
        sink = build_sink({"type": "stdout"})
        await sink.start()
        for i in range(3):
            assert sink.submit(*event(i))
        await until(lambda: sink.stats["sent"] == 3)
        await sink.close(1)

    run(main())
    out = capsysbinary.readouterr().out
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [0, 1, 2]


def test_stdout_sink_slow_stream_never_blocks_submit():
    class SlowStream(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()

        def write(self, data):  # type: ignore[override]
            self.gate.wait(5)
            return super().write(data)

    stream = SlowStream()

    async def main():
        sink = StdoutSink(StdoutSinkConfig(queue_size=3, **FAST), stream=stream)
        await sink.start()
        t0 = time.perf_counter()
        results = [sink.submit(*event(i)) for i in range(100)]
        assert time.perf_counter() - t0 < 0.2
        assert results.count(True) == 3 and sink.stats["dropped"] == 97 and not sink.healthy
        stream.gate.set()
        await until(lambda: sink.stats["sent"] == 3)
        assert sink.healthy
        await sink.close(1)

    run(main())
    assert [json.loads(line)["seq"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
