"""The aiohttp gateway adapter in one process: a real listener and a real upstream on
loopback, fake stages for the chain (no IdP, no policies), raw sockets for the agent.

What is checked here is the adapter's own job (proxy/engine/aiohttp_gateway.py):
the forward plan is applied exactly (removals, settings, Host, target), nothing is
added by the HTTP client library, hop-by-hop headers go neither way, the decision
id and the plan's response headers are on every answer, a stage that wants the
response body gets it, upstream failures are 502/504 carrying the decision id, the
head phase runs before `100 Continue` and before the body is read, and an exception
in the adapter is a recorded 503 that never reaches the upstream. The same gateway
behaviour through whole `proctor run` processes, on both engines, is in
tests/test_gateway.py and tests/test_gateway_attacks.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.config import RequestLimits, Route, UpstreamConfig
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange
from proxy.core.model import Refusal
from proxy.core.stages import GatewayRoute, TargetCheck
from proxy.engine.aiohttp_gateway import AiohttpGateway, _addressed, _headers
from proxy.engine.gateway import GatewayRouter


# ------------------------------------------------------------------- fake stages
class Record(Stage):
    name = "record"

    def __init__(self) -> None:
        self.seen: list[Exchange] = []

    def on_response(self, ex: Exchange) -> None:
        self.seen.append(ex)


class Authenticate(Stage):
    """`Authorization: Bearer good` or 401, from the head when there is a body."""

    name = "authenticate"

    def __init__(self) -> None:
        self.heads = 0

    def _check(self, ex: Exchange) -> None:
        assert ex.request is not None
        if ex.request.headers.get("authorization") != "Bearer good":
            ex.refuse(Refusal(401, "Agent authentication required", "bad token", kind="authentication"))

    def on_head(self, ex: Exchange) -> None:
        self.heads += 1
        self._check(ex)

    def on_request(self, ex: Exchange) -> None:
        self._check(ex)
        ex.plan.remove("authorization")


class Plan(Stage):
    """What real stages put in the plan: a credential, a response header, a body to read."""

    name = "plan"

    def __init__(self, read_body: int = 0) -> None:
        self.read_body = read_body

    def on_request(self, ex: Exchange) -> None:
        ex.plan.remove("cookie")
        ex.plan.set("X-Api-Key", "injected")
        ex.plan.response_headers["RateLimit"] = "limit=10, remaining=9"
        ex.plan.read_response_body = self.read_body


def chain(*extra: Stage, read_body: int = 0) -> tuple[Chain, Record]:
    record = Record()
    return Chain([record, Authenticate(), GatewayRoute(), TargetCheck([]), Plan(read_body), *extra]), record


# ---------------------------------------------------------------------- upstream
class Upstream:
    """A loopback upstream recording what it received, with a few special paths."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append({"method": request.method, "path": request.raw_path,
                              "headers": [(k.decode(), v.decode()) for k, v in request.raw_headers], "body": body})
        path = request.path
        if path == "/big":
            return web.Response(body=b"b" * 1_000_000, content_type="application/octet-stream")
        if path == "/chunked":
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(30):
                await resp.write(b"c" * 10_000)
            await resp.write_eof()
            return resp
        if path == "/gzip":
            return web.Response(body=gzip.compress(b'{"id": "42"}'),
                                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if path == "/hop":
            return web.Response(text="hop", headers={"Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5",
                                                     "Set-Cookie": "s=1; Path=/"})
        if path == "/cut":  # announces 1 MB, sends 300 KB, then the connection breaks
            resp = web.StreamResponse(headers={"Content-Length": "1000000"})
            await resp.prepare(request)
            await resp.write(b"x" * 300_000)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if path == "/slow":
            await asyncio.sleep(2)
            return web.Response(text="late")
        return web.json_response({"ok": True, "path": request.raw_path})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, max_headers=4096)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Scenario = Callable[[AiohttpGateway, Upstream, Record], Awaitable[None]]


def run(scenario: Scenario, *, stages: tuple[Stage, ...] = (), read_body: int = 0,
        limits: RequestLimits | None = None, upstream_config: UpstreamConfig | None = None) -> None:
    async def main() -> None:
        up = Upstream()
        await up.start()
        c, record = chain(*stages, read_body=read_body)
        routes = [Route(prefix="/svc", upstream=f"http://127.0.0.1:{up.port}"),
                  Route(prefix="/dead", upstream=f"http://127.0.0.1:{free_port()}")]
        gw = AiohttpGateway(c, GatewayRouter(routes), limits or RequestLimits(),
                            upstream_config or UpstreamConfig(), "127.0.0.1", free_port())
        await gw.start()
        try:
            await scenario(gw, up, record)
        finally:
            await gw.close()
            await up.stop()

    asyncio.run(main())


async def exchange(gw: AiohttpGateway, raw: bytes, *, until_close: bool = False, timeout: float = 5) -> bytes:
    """Send raw bytes, read one answer (head + Content-Length body, or until the close)."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(raw)
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and not until_close and not head.startswith(b"HTTP/1.1 100"):
                    length = next((int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                                   if k.strip().lower() == b"content-length"), None)
                    if length is not None and len(body) >= length:
                        break
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    writer.close()
    return data


def head_of(reply: bytes) -> dict[str, str]:
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}


def get(path: str, *extra: str, token: str = "good") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gw.test", f"Authorization: Bearer {token}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------------- tests
def test_the_plan_is_applied_exactly_and_nothing_is_added():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/items/1?q=%41", "Cookie: agent=secret", "X-Trace: t",
                                       "Connection: keep-alive, TE", "Keep-Alive: timeout=5", "TE: trailers"))
        # (a Connection header naming an end-to-end header the request carries is refused: tests/test_review_chain.py)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        got = up.received[-1]
        assert got["path"] == "/items/1?q=%41"
        names = [k.lower() for k, _ in got["headers"]]
        headers = dict((k.lower(), v) for k, v in got["headers"])
        assert headers["host"] == f"127.0.0.1:{up.port}" and headers["x-api-key"] == "injected"
        assert headers["x-trace"] == "t"
        # removed by the plan, hop-by-hop, or never added by the client library
        for absent in ("authorization", "cookie", "connection", "x-private", "keep-alive", "te",
                       "user-agent", "accept", "accept-encoding", "content-type", "content-length"):
            assert absent not in names, absent
        h = head_of(reply)
        ex = record.seen[-1]
        assert h["x-proctor-decision-id"] == ex.decision_id and h["ratelimit"] == "limit=10, remaining=9"
        assert "server" in h  # the upstream's own Server header is relayed, none is added for refusals
        assert ex.response is not None and ex.response.status == 200 and ex.response.upstream_status == 200

    run(scenario)


def test_refusals_carry_the_decision_id_and_no_server_software():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/items/1", token="bad"))
        assert reply.startswith(b"HTTP/1.1 401"), reply
        h = head_of(reply)
        problem = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert problem["decision_id"] == h["x-proctor-decision-id"] == record.seen[-1].decision_id
        assert h["content-type"] == "application/problem+json" and "server" not in h
        reply = await exchange(gw, get("/nowhere/1"))
        assert reply.startswith(b"HTTP/1.1 404") and json.loads(reply.partition(b"\r\n\r\n")[2])["reasons"] == ["no-route"]
        assert record.seen[-1].request is not None and record.seen[-1].request.unrouted
        assert up.received == []

    run(scenario)


def test_hop_by_hop_response_headers_are_dropped_and_cookies_are_not_kept():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/hop"))
        h = head_of(reply)
        assert reply.startswith(b"HTTP/1.1 200") and "x-hop" not in h and "keep-alive" not in h
        assert h["set-cookie"] == "s=1; Path=/"  # the agent's, relayed ...
        await exchange(gw, get("/svc/items/2"))
        assert "cookie" not in dict((k.lower(), v) for k, v in up.received[-1]["headers"])  # ... never replayed

    run(scenario)


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked body (chunk sizes are hex: they may contain "c" themselves)."""
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def test_large_and_chunked_responses_stream_through_intact():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/big"))
        assert reply.startswith(b"HTTP/1.1 200") and reply.partition(b"\r\n\r\n")[2] == b"b" * 1_000_000
        assert record.seen[-1].response is not None and record.seen[-1].response.body is None
        reply = await exchange(gw, get("/svc/chunked", "Connection: close"), until_close=True)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert dechunk(body) == b"c" * 300_000

    run(scenario)


def test_a_stage_that_wants_the_response_body_gets_it_decoded():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/gzip"))
        assert reply.startswith(b"HTTP/1.1 200")
        assert gzip.decompress(reply.partition(b"\r\n\r\n")[2]) == b'{"id": "42"}'  # relayed as sent
        resp = record.seen[-1].response
        assert resp is not None and resp.body == b'{"id": "42"}' and resp.headers["content-encoding"] == "gzip"
        await exchange(gw, get("/svc/chunked", "Connection: close"), until_close=True)  # over what it wants
        assert record.seen[-1].response is not None and record.seen[-1].response.body is None

    run(scenario, read_body=64 * 1024)


def test_upstream_failures_are_502_and_504_with_the_decision_id():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/dead/x"))
        assert reply.startswith(b"HTTP/1.1 502"), reply
        problem = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert problem["title"] == "Upstream unavailable" and problem["decision_id"] == record.seen[-1].decision_id
        assert head_of(reply)["ratelimit"]  # the plan's response headers on every answer
        ex = record.seen[-1]
        assert ex.allowed and ex.response is not None and ex.response.status == 502 and ex.response.error
        reply = await exchange(gw, get("/svc/slow"))
        assert reply.startswith(b"HTTP/1.1 504"), reply
        problem = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert "read_timeout_seconds" in problem["detail"] and problem["decision_id"] == record.seen[-1].decision_id

    run(scenario, upstream_config=UpstreamConfig(read_timeout_seconds=0.5))


def test_an_upstream_that_breaks_mid_stream_cuts_the_agent_off_and_is_recorded():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/cut"), until_close=True)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1000000" in head.lower()
        assert len(body) < 1_000_000  # visibly incomplete: the connection was closed
        ex = record.seen[-1]
        assert ex.response is not None and ex.response.status == 200 and ex.response.error
        assert "upstream" in ex.response.error

    run(scenario)


def test_no_100_continue_and_no_body_before_authentication():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        head = (b"POST /svc/items HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer bad\r\n"
                b"Content-Type: application/json\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        reply = await exchange(gw, head)
        assert reply.startswith(b"HTTP/1.1 401"), reply
        assert b"100 Continue" not in reply and head_of(reply)["connection"] == "close"
        # authenticated: 100 Continue first, then the body, then the answer
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(head.replace(b"Bearer bad", b"Bearer good").replace(b"5000", b"2"))
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        async with asyncio.timeout(5):
            final = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert final.startswith(b"HTTP/1.1 200")
        assert up.received[-1]["body"] == b"{}"
        assert "expect" not in dict((k.lower(), v) for k, v in up.received[-1]["headers"])

    run(scenario)


def test_the_head_is_bounded_as_a_whole():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        # 300 headers of 100 bytes (30 KB): more than aiohttp's default count, within the bound
        many = [f"X-H{i}: {'v' * 90}" for i in range(300)]
        assert (await exchange(gw, get("/svc/items/1", *many))).startswith(b"HTTP/1.1 200")
        # 1000 such headers (100 KB) with no line over the bound: still 431
        many = [f"X-H{i}: {'v' * 90}" for i in range(1000)]
        reply = await exchange(gw, get("/svc/items/1", *many), until_close=True)
        assert reply.startswith(b"HTTP/1.1 431") or reply == b"", reply[:100]
        # one line over the bound
        reply = await exchange(gw, get("/svc/items/1", "X-Big: " + "x" * 70_000), until_close=True)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["title"] == "Request header fields too large"
        # a small request after a large body on one connection is not mistaken for a large head
        body = b'{"pad": "' + b"y" * 200_000 + b'"}'
        raw = (b"POST /svc/items HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer good\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert (await exchange(gw, raw)).startswith(b"HTTP/1.1 200")
        assert len(up.received) == 2

    run(scenario, limits=RequestLimits(max_request_head_bytes=64 * 1024))


def test_bodies_are_bounded_while_they_arrive():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        raw = (b"POST /svc/items HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer good\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        raw += b"".join(b"%x\r\n%s\r\n" % (8192, b"z" * 8192) for _ in range(10))
        reply = await exchange(gw, raw, until_close=True)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert record.seen[-1].refusal is not None and record.seen[-1].refusal.status == 413
        assert gw.body_budget.in_use == 0 and up.received == []
        # a declared length over the limit is refused unread, before 100 Continue
        reply = await exchange(gw, raw.replace(b"Transfer-Encoding: chunked", b"Content-Length: 70000\r\nExpect: 100-continue")
                               .partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413") and b"100 Continue" not in reply

    run(scenario, limits=RequestLimits(max_body_bytes=65536, max_inflight_body_bytes=3 * 65536))


def test_an_adapter_error_is_a_recorded_503_and_nothing_is_forwarded(monkeypatch):
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("adapter bug")

        monkeypatch.setattr(gw, "_upstream_headers", broken)
        reply = await exchange(gw, get("/svc/items/1"))
        assert reply.startswith(b"HTTP/1.1 503"), reply
        problem = json.loads(reply.partition(b"\r\n\r\n")[2])
        ex = record.seen[-1]
        assert problem["decision_id"] == ex.decision_id and ex.refusal is not None and ex.refusal.kind == "fail-closed"
        assert up.received == []

    run(scenario)


class Boom(Stage):
    name = "boom"

    def on_request(self, ex: Exchange) -> None:
        raise RuntimeError("stage bug")


def test_a_stage_error_is_a_recorded_503():
    async def scenario(gw: AiohttpGateway, up: Upstream, record: Record) -> None:
        reply = await exchange(gw, get("/svc/items/1"))
        assert reply.startswith(b"HTTP/1.1 503") and up.received == []
        assert record.seen[-1].refusal is not None and record.seen[-1].refusal.kind == "fail-closed"

    run(scenario, stages=(Boom(),))


@pytest.mark.parametrize("header, expected", [
    ("svc.internal", ("svc.internal", 8082)),
    ("svc.internal:9000", ("svc.internal", 9000)),
    ("[::1]:9000", ("::1", 9000)),
    ("[::1]", ("::1", 8082)),
    ("", ("", 8082)),
    ("a:b:c", ("a:b:c", 8082)),
])
def test_addressed_host_is_spelled_like_the_mitmproxy_adapter(header, expected):
    assert _addressed(header, 8082) == expected


def test_headers_are_joined_and_smuggling_shapes_flagged():
    headers, problem, repeated = _headers([(b"X-A", b"1"), (b"x-a", b"2"), (b"X-B", b"a\rb")])
    assert headers == {"x-a": "1, 2", "x-b": "a\rb"} and repeated == {"x-a"}
    assert problem is not None and "x-b" in problem
