"""Network audit sinks that lose nothing silently (issue #10, item 7):

- Splunk HEC: a non-retryable 4xx (wrong index, 413, missing channel) keeps the
  refused events in a dead-letter file, counts them and marks the sink unhealthy
  (so fail_closed stops writes); HEC's `invalid-event-number` is honoured (events
  before it were accepted, those after it are sent again); an oversized batch is
  split; with indexer acknowledgement "delivered" means indexed;
- syslog: an event over `max_message_bytes` is reduced by a fixed rule to valid
  JSON with a marker, never split into several messages.

Against a fake HEC (aiohttp) and a raw TCP syslog receiver on loopback, both
directly and through a real proxy process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for
from proxy.audit.netsinks import SyslogSinkConfig, SyslogSink, build_sink, default_ack_url
from proxy.audit.truncate import fit_event

TOKEN = "hec-t0ken-" + "5" * 24
FAST = {"min_backoff": 0.02, "max_backoff": 0.1}


def run(coro, timeout: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def event(i: int, size: int = 0, **kw) -> tuple[bytes, dict]:
    ev = {"class_uid": 6003, "time": 1_700_000_000_000 + i, "severity_id": 1, "status_id": 1,
          "metadata": {"uid": str(uuid.uuid4()), "sequence": i}, "pad": "x" * size, **kw}
    return json.dumps(ev, separators=(",", ":")).encode() + b"\n", ev


async def until(predicate, timeout: float = 8.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------- fake HEC
class FakeHec:
    """Enough of Splunk's HTTP Event Collector: token, channel, index allow-list, size limit,
    `invalid-event-number`, and indexer acknowledgement (ackId per channel, /services/collector/ack)."""

    def __init__(self, *, ack: bool = False, require_channel: bool = False, indexes: set[str] | None = None,
                 max_content: int | None = None) -> None:
        self.ack = ack
        self.require_channel = require_channel
        self.indexes = indexes
        self.max_content = max_content
        self.indexing = True  # acks are reported true once asked
        self.forget: set[int] = set()  # ack ids this fake never confirms (an indexer lost them)
        self.indexed: list[dict] = []
        self.posts: list[dict] = []
        self.ack_queries: list[dict] = []
        self._pending: dict[tuple[str, int], list[dict]] = {}
        self._next: dict[str, int] = defaultdict(int)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/collector/event"

    def events(self) -> list[dict]:
        return [o["event"] for o in self.indexed]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/collector/event", self._event)
        app.router.add_post("/services/collector/ack", self._ack)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _answer(self, status: int, doc: dict) -> web.Response:
        return web.json_response(doc, status=status)

    async def _event(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Splunk {TOKEN}":
            return self._answer(401, {"text": "Invalid authorization", "code": 3})
        channel = request.headers.get("X-Splunk-Request-Channel")
        if (self.ack or self.require_channel) and not channel:
            return self._answer(400, {"text": "Data channel is missing", "code": 10})
        body = await request.read()
        self.posts.append({"channel": channel, "bytes": len(body)})
        if self.max_content is not None and len(body) > self.max_content:
            return self._answer(413, {"text": "Content too large", "code": 27})
        accepted: list[dict] = []
        for i, line in enumerate(body.splitlines()):
            obj = json.loads(line)
            why = None
            if self.indexes is not None and obj.get("index") not in self.indexes:
                why = {"text": "Incorrect index", "code": 7}
            elif obj["event"].get("bad"):
                why = {"text": "Invalid data format", "code": 6}
            if why is not None:
                self.indexed += accepted  # HEC stops at the first bad event; the ones before it are in
                return self._answer(400, {**why, "invalid-event-number": i})
            accepted.append(obj)
        self.posts[-1]["n"] = len(accepted)
        if self.ack:
            ack_id = self._next[channel]
            self._next[channel] += 1
            self._pending[(channel, ack_id)] = accepted
            return self._answer(200, {"text": "Success", "code": 0, "ackId": ack_id})
        self.indexed += accepted
        return self._answer(200, {"text": "Success", "code": 0})

    async def _ack(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Splunk {TOKEN}":
            return self._answer(401, {"text": "Invalid authorization", "code": 3})
        channel = request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel")
        if not channel:
            return self._answer(400, {"text": "Data channel is missing", "code": 10})
        ids = (await request.json())["acks"]
        self.ack_queries.append({"channel": channel, "acks": ids})
        out = {}
        for i in ids:
            done = self.indexing and i not in self.forget and (channel, i) in self._pending
            if done:
                self.indexed += self._pending.pop((channel, i))
            out[str(i)] = done
        return self._answer(200, {"acks": out})


class ThreadedHec:
    """A FakeHec on its own event loop in a thread, for tests that drive a proxy process."""

    def __init__(self, **kw) -> None:
        self.hec = FakeHec(**kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.hec.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.hec.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def hec_server():
    started: list[ThreadedHec] = []

    def make(**kw) -> FakeHec:
        t = ThreadedHec(**kw)
        started.append(t)
        return t.hec

    yield make
    for t in started:
        t.close()


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("HEC_TOKEN", TOKEN)


def hec_cfg(url: str, **kw) -> dict:
    return {"type": "http", "url": url, "token_env": "HEC_TOKEN", "flush_interval_seconds": 0.05, **FAST, **kw}


def dead_letters(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ HEC, direct
def test_ack_url_is_derived_from_the_event_url():
    assert default_ack_url("https://s.example:8088/services/collector/event") == "https://s.example:8088/services/collector/ack"
    assert default_ack_url("https://s.example/services/collector") == "https://s.example/services/collector/ack"
    assert default_ack_url("https://s.example/splunk/services/collector/event/1.0") == "https://s.example/splunk/services/collector/ack"


def test_config_checks_for_ack_and_dead_letters():
    with pytest.raises(ValueError, match="Splunk HEC settings"):
        build_sink({"type": "http", "url": "https://x.example/in", "format": "json", "ack": True})
    with pytest.raises(ValueError, match="GUID"):
        build_sink({"type": "http", "url": "https://x.example/services/collector", "channel": "not-a-guid"})
    with pytest.raises(ValueError, match="same host"):
        build_sink({"type": "http", "url": "https://x.example/services/collector", "ack": True,
                    "ack_url": "https://elsewhere.example/services/collector/ack"})
    with pytest.raises(ValueError):
        build_sink({"type": "syslog", "host": "h", "port": 514, "max_message_bytes": 1000})


def test_with_indexer_ack_delivered_means_indexed(tmp_path):
    async def main():
        hec = FakeHec(ack=True)
        hec.indexing = False
        await hec.start()
        sink = build_sink(hec_cfg(hec.url, ack=True, ack_poll_interval_seconds=0.05), state_dir=tmp_path)
        await sink.start()
        for i in range(3):
            sink.submit(*event(i))
        await until(lambda: len(hec.posts) == 1 and len(hec.ack_queries) >= 2, what="a batch accepted, acks asked")
        # accepted by HEC, not yet indexed: held, counted in the queue, not delivered
        assert sink.stats["sent"] == 0 and sink.queue_depth == 3 and sink.healthy and hec.events() == []
        hec.indexing = True
        await until(lambda: sink.stats["sent"] == 3, what="acks")
        assert sink.queue_depth == 0 and [e["metadata"]["sequence"] for e in hec.events()] == [0, 1, 2]
        channels = {p["channel"] for p in hec.posts} | {q["channel"] for q in hec.ack_queries}
        assert len(channels) == 1 and uuid.UUID(channels.pop())
        assert hec.ack_queries[-1]["acks"] == [0]
        await sink.close(1)
        await hec.stop()

    run(main())


def test_a_batch_never_acknowledged_is_sent_again_after_the_timeout(tmp_path):
    async def main():
        hec = FakeHec(ack=True)
        hec.forget = {0}  # the indexer lost the first batch
        await hec.start()
        sink = build_sink(hec_cfg(hec.url, ack=True, ack_poll_interval_seconds=0.05, ack_timeout_seconds=1),
                          state_dir=tmp_path)
        await sink.start()
        sink.submit(*event(0))
        await until(lambda: len(hec.posts) == 1, what="the first post")
        await asyncio.sleep(0.3)
        assert sink.stats["sent"] == 0 and sink.queue_depth == 1
        await until(lambda: sink.stats["sent"] == 1, timeout=5, what="the resent batch acknowledged")
        assert len(hec.posts) == 2 and sink.stats["retried"] >= 1
        assert [e["metadata"]["sequence"] for e in hec.events()] == [0]
        await sink.close(1)
        await hec.stop()

    run(main())


def test_a_resend_while_another_batch_is_in_flight_loses_nothing(tmp_path):
    """The ack poller finds a batch overdue while the writer is mid-POST with the next
    one: the writer must remove what it sent, not the requeued batch (which was lost
    and counted as delivered before)."""

    class SlowHec(FakeHec):
        async def _event(self, request):
            if len(self.posts) >= 1:
                await asyncio.sleep(1.5)  # the second POST is in flight when the first batch goes overdue
            return await super()._event(request)

    async def main():
        hec = SlowHec(ack=True)
        hec.forget = {0}  # the first batch is never reported indexed
        await hec.start()
        sink = build_sink(hec_cfg(hec.url, ack=True, ack_poll_interval_seconds=0.05, ack_timeout_seconds=1),
                          state_dir=tmp_path)
        await sink.start()
        sink.submit(*event(100))
        await until(lambda: len(hec.posts) == 1, what="the first post")
        await asyncio.sleep(0.5)
        sink.submit(*event(200))
        await until(lambda: sorted(e["metadata"]["sequence"] for e in hec.events()) == [100, 200], timeout=10,
                    what="both events indexed")
        await until(lambda: sink.stats["sent"] == 2 and sink.queue_depth == 0, what="both acknowledged")
        await sink.close(1)
        await hec.stop()

    run(main(), timeout=25)


def test_invalid_event_number_keeps_the_accepted_ones_dead_letters_one_and_resends_the_rest(tmp_path):
    async def main():
        hec = FakeHec()
        await hec.start()
        sink = build_sink(hec_cfg(hec.url, name="splunk", flush_interval_seconds=0.2), state_dir=tmp_path)
        await sink.start()
        for i in range(5):
            sink.submit(*event(i, bad=(i == 2)))
        await until(lambda: sink.stats["sent"] == 4, what="the good events")
        assert [e["metadata"]["sequence"] for e in hec.events()] == [0, 1, 3, 4]
        assert sink.stats["dead_lettered"] == 1 and sink.stats["failed"] == 0
        letters = dead_letters(tmp_path / "dead-letters" / "splunk.jsonl")
        assert len(letters) == 1 and letters[0]["payload"]["event"]["metadata"]["sequence"] == 2
        assert "Invalid data format" in letters[0]["reason"] and letters[0]["sink"] == "splunk"
        assert sink.healthy  # the later delivery succeeded
        await sink.close(1)
        await hec.stop()

    run(main())


def test_413_splits_the_batch_and_a_single_oversized_event_is_a_dead_letter(tmp_path):
    async def main():
        hec = FakeHec(max_content=4000)
        await hec.start()
        dl = tmp_path / "dl" / "hec.jsonl"
        sink = build_sink(hec_cfg(hec.url, flush_interval_seconds=0.2, dead_letter_file=str(dl)), state_dir=tmp_path)
        await sink.start()
        for i in range(8):
            sink.submit(*event(i, size=700))  # ~8 KB together: too large, 4 at a time fit
        await until(lambda: sink.stats["sent"] == 8, what="all 8 in smaller batches")
        assert sorted(e["metadata"]["sequence"] for e in hec.events()) == list(range(8))
        assert not dl.exists()
        sink.submit(*event(99, size=5000))  # larger than the limit on its own
        await until(lambda: sink.stats["dead_lettered"] == 1, what="the oversized event kept")
        assert not sink.healthy  # until something is delivered again
        assert dead_letters(dl)[0]["payload"]["event"]["metadata"]["sequence"] == 99
        assert "HTTP 413" in dead_letters(dl)[0]["reason"]
        sink.submit(*event(100))
        await until(lambda: sink.stats["sent"] == 9 and sink.healthy, what="recovery")
        await sink.close(1)
        await hec.stop()

    run(main())


def test_a_token_that_needs_a_channel_dead_letters_and_the_token_never_reaches_the_file(tmp_path):
    async def main():
        hec = FakeHec(require_channel=True)
        await hec.start()
        sink = build_sink(hec_cfg(hec.url, name="needs-channel", dead_letter_max_bytes=5000), state_dir=tmp_path)
        await sink.start()
        for i in range(6):
            sink.submit(*event(i, size=1000))
            await asyncio.sleep(0.08)  # one batch each
        await until(lambda: sink.stats["dead_lettered"] + sink.stats["failed"] == 6, what="6 refusals")
        # bounded: what does not fit in dead_letter_max_bytes is counted as failed (lost), never written
        assert sink.stats["failed"] >= 1 and sink.stats["dead_lettered"] >= 1
        path = tmp_path / "dead-letters" / "needs-channel.jsonl"
        assert path.stat().st_size <= 5000
        text = path.read_text()
        assert "Data channel is missing" in text and TOKEN not in text
        assert not sink.healthy
        await sink.close(0.2)
        await hec.stop()

    run(main())


# ----------------------------------------------------------------- syslog, direct
def test_fit_event_rule():
    line, ev = event(7, size=20000, message="m" * 4000, actor={"user": {"uid": "bot", "name": "bot"}},
                     api={"operation": "test.item.create", "request": {"uid": "d-7"}},
                     unmapped={"chain": {"alg": "hmac-sha256", "kid": "k", "prev": "p" * 64, "hash": "h" * 64},
                               "proctor": {"decision": "allow", "reasons": ["r"], "context": {"big": "y" * 9000}}})
    assert fit_event(line, ev, len(line)) == (line.rstrip(b"\n"), False)
    out, reduced = fit_event(line, ev, 4000)
    assert reduced and len(out) <= 4000
    doc = json.loads(out)
    assert doc["metadata"]["sequence"] == 7 and doc["unmapped"]["chain"]["hash"] == "h" * 64
    assert doc["actor"]["user"]["uid"] == "bot" and doc["api"]["operation"] == "test.item.create"
    marker = doc["unmapped"]["truncated"]
    assert marker["original_bytes"] == len(line) - 1 and "audit file" in marker["note"]
    assert "message" in marker["omitted"] and "unmapped.proctor.context" in marker["omitted"]
    assert doc["unmapped"]["proctor"] == {"decision": "allow", "reasons": ["r"]}


def test_syslog_sends_an_oversized_event_as_one_reduced_message():
    sink = SyslogSink(SyslogSinkConfig(host="127.0.0.1", port=514, transport="tcp", max_message_bytes=2048))
    line, ev = event(3, size=10000)
    msg = sink.format_message(line, ev)
    assert len(msg) <= 2048 and sink.stats["truncated"] == 1
    body = json.loads(msg.split(b" - ", 1)[1])
    assert body["metadata"]["sequence"] == 3 and body["unmapped"]["truncated"]["original_bytes"] == len(line) - 1
    small_line, small = event(4)
    assert sink.format_message(small_line, small).endswith(small_line.rstrip(b"\n"))


# ------------------------------------------------------------ through a real proxy
def scrape(p) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{p.control_url}/metrics", timeout=5).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(p, name: str, **labels) -> float:
    return scrape(p).get((name, tuple(sorted(labels.items()))), 0.0)


def audit_lines(p) -> list[dict]:
    path = p.dir / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_wrong_index_keeps_dead_letters_and_stops_writes_until_hec_accepts_again(
        proctor_factory, idp, upstream, hec_server):
    hec = hec_server(indexes={"main"})
    p = proctor_factory({"audit": {"sinks": [hec_cfg(hec.url, name="splunk", index="proctor")]}}, env={"HEC_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{upstream.port}"
    marker = uuid.uuid4().hex
    reader = idp.token("reader-bot", groups=["readers"])
    writer = idp.token("writer-bot", groups=["writers"])
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        assert c.get(f"{base}/items/1").status_code == 200
    wait_for(lambda: metric(p, "proctor_audit_dead_letter_events_total", sink="splunk#1") == 1, timeout=10,
             what="the refused event kept")
    assert metric(p, "proctor_audit_sink_healthy", sink="splunk#1") == 0
    letters = dead_letters(p.dir / "state" / "dead-letters" / "splunk.jsonl")
    assert letters[0]["payload"]["index"] == "proctor" and "Incorrect index" in letters[0]["reason"]
    assert letters[0]["payload"]["event"] == audit_lines(p)[0]  # the chained event, byte for byte the file's
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as c:
        r = c.post(f"{base}/items", json={"name": f"{marker}-refused"})
        assert r.status_code == 503 and r.json()["reasons"] == ["audit-unavailable"], r.text
        assert "splunk" in r.json()["detail"]
        assert not any(marker in (x.get("body") or "") for x in upstream.received())
        hec.indexes = {"main", "proctor"}  # the operator allows the index
        # the refusal's own event goes out, is accepted, and the sink is healthy again
        wait_for(lambda: metric(p, "proctor_audit_sink_healthy", sink="splunk#1") == 1, timeout=10, what="recovery")
        r = c.post(f"{base}/items", json={"name": f"{marker}-after"})
        assert r.status_code == 200, r.text
    assert any(f"{marker}-after" in (x.get("body") or "") for x in upstream.received())
    wait_for(lambda: len(hec.events()) == 2, timeout=10, what="events after the fix")
    assert metric(p, "proctor_audit_lost_events_total", sink="splunk#1", reason="failed") == 0


def test_hec_ack_through_the_proxy(proctor_factory, idp, upstream, hec_server):
    hec = hec_server(ack=True)
    hec.indexing = False
    p = proctor_factory({"audit": {"sinks": [hec_cfg(hec.url, name="splunk", ack=True, ack_poll_interval_seconds=0.1)]}},
                        env={"HEC_TOKEN": TOKEN})
    reader = idp.token("reader-bot", groups=["readers"])
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        for i in range(3):
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/{i}").status_code == 200
    wait_for(lambda: len(hec.ack_queries) >= 2, timeout=10, what="ack polling")
    assert metric(p, "proctor_audit_events_delivered_total", sink="splunk#1") == 0
    assert metric(p, "proctor_audit_queue_depth", sink="splunk#1") == 3
    hec.indexing = True
    wait_for(lambda: metric(p, "proctor_audit_events_delivered_total", sink="splunk#1") == 3, timeout=10, what="indexed")
    assert metric(p, "proctor_audit_queue_depth", sink="splunk#1") == 0
    assert [e["unmapped"]["chain"]["hash"] for e in hec.events()] == [e["unmapped"]["chain"]["hash"] for e in audit_lines(p)]


class SyslogReceiver:
    """Octet-counted frames (RFC 6587) over plain TCP, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.frames: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b" " in buf:
                n, _, rest = buf.partition(b" ")
                if len(rest) < int(n):
                    break
                self.frames.append(rest[: int(n)])
                buf = rest[int(n):]


def test_syslog_through_the_proxy_reduces_an_oversized_event_to_one_valid_message(proctor_factory, idp, upstream):
    rx = SyslogReceiver()
    p = proctor_factory({"audit": {"sinks": [{"type": "syslog", "name": "siem", "host": "127.0.0.1", "port": rx.port,
                                              "transport": "tcp", "max_message_bytes": 4096, **FAST}]}})
    reader = idp.token("reader-bot", groups=["readers"])
    long_id = "a" * 4000  # in the path, the resource, the message and the Cedar context: a large event
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/1").status_code == 200
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/{long_id}").status_code == 200
    wait_for(lambda: len(rx.frames) == 2, timeout=10, what="two syslog messages")
    time.sleep(0.3)
    assert len(rx.frames) == 2  # one message per event, never split
    file_events = audit_lines(p)
    small, big = (json.loads(f.split(b" - ", 1)[1]) for f in rx.frames)
    assert "truncated" not in small["unmapped"] and small == file_events[0]
    assert len(rx.frames[1]) <= 4096 and big["unmapped"]["truncated"]["original_bytes"] > 12000
    assert big["metadata"]["sequence"] == file_events[1]["metadata"]["sequence"]
    assert big["unmapped"]["chain"] == file_events[1]["unmapped"]["chain"]  # find and verify it in the file
    assert metric(p, "proctor_audit_truncated_events_total", sink="siem#1") == 1
