"""No secret a request carries appears in anything Proctor writes or answers.

The attacker's view: one Proctor at DEBUG log level (forward, CONNECT and
gateway mode, approvals on) gets requests with a unique random canary planted
in every place a request can carry a secret: query parameter values, URL
userinfo, the proxy credential, every credential header and a custom one,
secret-looking body fields, another request's Idempotency-Key flow, malformed
requests (a bad request line, an oversized head, chunked trailers, a client
that hangs up mid-headers) and every kind of refusal. Then every output is
scanned: the log, the decision record, the audit trail, the state store, every
answer (status line, headers, body) the client got, the approvals API, the
activity API and the metrics.

What is legitimately recorded, and therefore carries no canary here: the
method, host, port and path (the resource ids come from path segments), the
allow-listed `limits.context_headers` values (policies read them), and the
connector's declared typed values (`query_params`, `fields`).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import DATA, Proctor, start_proctor

pytestmark = pytest.mark.integration

HOLD_CEDAR = """
@id("big-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"test.order.create", resource)
when { context has fields && context.fields has total && context.fields.total.greaterThan(decimal("500.0")) }
unless { context has approval && context.approval.groups.contains("managers") };
"""
APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)


@dataclass
class Scan:
    """Canaries planted (canary -> where) and every output collected (label -> text)."""

    planted: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    statuses: dict[str, int | None] = field(default_factory=dict)  # label -> the status the client got
    upstream_received: list[dict] = field(default_factory=list)  # what the upstreams got (not scanned)

    def canary(self, where: str) -> str:
        value = "cnry" + secrets.token_hex(10)
        self.planted[value] = where
        return value

    def saw(self, label: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        self.outputs.append((label, text))

    def answer(self, label: str, r: httpx.Response) -> httpx.Response:
        """What the client got. A forwarded answer's body is the upstream's (the echo
        server repeats the request), so only Proctor's answers are scanned whole."""
        forwarded = r.status_code < 300 and "json" in r.headers.get("content-type", "") and r.json().get("echo") is True
        self.statuses[label] = r.status_code
        self.saw(f"answer {label}", f"{r.status_code} {r.reason_phrase}\n{r.headers!r}\n" + ("" if forwarded else r.text))
        return r

    def raw_answer(self, label: str, data: bytes) -> None:
        """A raw socket's answer (None: the connection was closed without one)."""
        status = data.split(b" ", 2)[1] if data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else None
        self.statuses[label] = int(status) if status else None
        self.saw(f"answer {label}", data)

    def leaks(self, label_prefix: str = "") -> list[str]:
        found = []
        for label, text in self.outputs:
            if not label.startswith(label_prefix):
                continue
            for value, where in self.planted.items():
                if value in text:
                    found.append(f"{where} ({value}) in {label}: ...{_around(text, value)}...")
        return found


def _around(text: str, value: str, width: int = 120) -> str:
    i = text.find(value)
    return text[max(0, i - width) : i + len(value) + width].replace("\n", "\\n")


def _raw(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return _exchange(s, data, read)


def _in_tunnel(p: Proctor, port: int, cred: str, data: bytes, read: bool = True) -> bytes:
    """Send `data` inside an intercepted TLS tunnel to localhost:port."""
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: {cred}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(p.ca_pem))
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return _exchange(t, data, read)


def _exchange(s: socket.socket, data: bytes, read: bool) -> bytes:
    s.sendall(data)
    if not read:
        time.sleep(0.2)  # then hang up mid-request
        return b""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and _complete(out):
                break
    except (ConnectionResetError, socket.timeout, ssl.SSLError):
        pass
    return out


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return True


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def hold_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scan-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    schema = (d / "schema.cedarschema").read_text()
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace("params: { tenant: Long },", "params: { tenant: Long },\n  approval?: Approval,", 1)
    (d / "schema.cedarschema").write_text(schema)
    (d / "hold.cedar").write_text(HOLD_CEDAR)
    return d


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, idp, pki, upstream, upstream_tls, hold_policies, gateway_engine) -> tuple[Scan, Proctor]:
    """Run the whole attack once against one DEBUG-level Proctor; collect every output."""
    p = start_proctor(
        tmp_path_factory.mktemp("scan"), idp, pki, upstream, upstream_tls,
        overrides={
            "approvals": {"mode": "async", "expire_after_seconds": 60},
            "limits": {"max_body_bytes": 4096, "max_request_head_bytes": 8192},
            "gateway": {"engine": gateway_engine},  # the gateway scanned on each engine
        },
        policies_src=hold_policies,
        log_level="debug",
    )
    try:
        scan = Scan()
        upstream.clear()
        upstream_tls.clear()
        _attack(scan, p, idp, upstream, upstream_tls)
        scan.upstream_received = upstream.received() + upstream_tls.received()
        time.sleep(0.5)  # let the record, the audit trail and the log catch up
        _collect(scan, p, idp)
        yield scan, p
    finally:
        p.stop()


def _attack(scan: Scan, p: Proctor, idp, upstream, upstream_tls) -> None:
    c = scan.canary
    reader = idp.token("reader-bot", groups=["readers"])
    writer = idp.token("writer-bot", groups=["writers"])
    scan.planted[reader.split(".")[2]] = "the reader's token signature"
    scan.planted[writer.split(".")[2]] = "the writer's token signature"
    up = f"http://127.0.0.1:{upstream.port}"
    tls = f"https://localhost:{upstream_tls.port}"

    def secret_headers(where: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {c(where + ' Authorization Bearer')}",
            "Cookie": f"session={c(where + ' Cookie')}; theme=dark",
            "X-Api-Key": c(where + " X-Api-Key"),
            "X-Whatever": c(where + " custom header"),
            "X-Forwarded-For": c(where + " X-Forwarded-For"),
            "Referer": f"https://app.example/?sso={c(where + ' Referer')}",
        }

    def query(where: str) -> str:
        return f"api_key={c(where + ' query api_key')}&token={c(where + ' query token')}&q={c(where + ' query q')}"

    # -- forward mode, plain HTTP: allowed, denied, unrouted, refused paths ----------------
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as h:
        scan.answer("forward allowed", h.get(f"{up}/items/1?{query('forward allowed')}", headers=secret_headers("forward allowed")))
        scan.answer("forward denied", h.delete(f"{up}/items/1?{query('forward denied')}", headers=secret_headers("forward denied")))
        scan.answer("forward no route", h.get(f"{up}/nothing/here?{query('forward no route')}", headers=secret_headers("forward no route")))
        scan.answer("forward bad path", h.get(f"{up}/items/a%2fb?{query('forward bad path')}", headers=secret_headers("forward bad path")))
        scan.answer("forward unmapped host", h.get(f"http://127.0.0.2:9/x?{query('forward unmapped host')}", headers=secret_headers("forward unmapped host")))
    # 407: a proxy credential that is not a valid token, and none at all
    with httpx.Client(proxy=f"http://reader-bot:{c('proxy userinfo password')}@127.0.0.1:{p.port}", timeout=10) as h:
        scan.answer("forward 407 bad password", h.get(f"{up}/items/1?{query('forward 407')}", headers=secret_headers("forward 407")))
    with httpx.Client(proxy=f"http://{c('proxy userinfo username')}:{reader}@127.0.0.1:{p.port}", timeout=10) as h:
        scan.answer("forward 407 username", h.get(f"{up}/items/1"))
    forged = reader.rsplit(".", 1)[0] + "." + base64.urlsafe_b64encode(c("forged signature").encode()).decode().rstrip("=")
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", forged), timeout=10) as h:
        scan.answer("forward 407 forged", h.get(f"{up}/items/1?{query('forward 407 forged')}"))
    with httpx.Client(proxy=p.proxy_url, timeout=10) as h:
        scan.answer("forward 407 none", h.get(f"{up}/items/1?{query('forward 407 none')}", headers=secret_headers("forward 407 none")))

    # bodies: JSON and form fields that look secret, too large, broken JSON
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as h:
        scan.answer("forward json body", h.post(
            f"{up}/items?{query('forward json body')}",
            json={"name": "widget", "password": c("json body password"), "api_key": c("json body api_key")},
            headers=secret_headers("forward json body"),
        ))
        scan.answer("forward form body", h.post(
            f"{up}/items", data={"password": c("form body password")}, headers=secret_headers("forward form body"),
        ))
        scan.answer("forward broken json", h.post(
            f"{up}/items", content=b'{"password": "' + c("broken json body").encode() + b'", ',
            headers={"Content-Type": "application/json"},
        ))
        scan.answer("forward content-encoding", h.post(
            f"{up}/items", content=b"{}", headers={"Content-Type": "application/json", "Content-Encoding": c("Content-Encoding")},
        ))
        scan.answer("forward 413", h.post(
            f"{up}/items?{query('forward 413')}", content=b"x" * 5000, headers=secret_headers("forward 413"),
        ))
        # a tool call: arguments are never recorded
        scan.answer("forward mcp", h.post(f"{up}/mcp?{query('forward mcp')}", json={
            "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "create_ticket", "arguments": {"priority": 2, "password": c("mcp argument")}},
        }))

    # URL userinfo of the upstream URL in an absolute-form request line
    cred = _basic("reader-bot", reader)
    scan.raw_answer("forward userinfo", _raw(p.port, (
        f"GET http://upuser:{c('upstream URL userinfo')}@127.0.0.1:{upstream.port}/items/1?{query('forward userinfo')} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: {cred}\r\n\r\n"
    ).encode()))
    # 421: the Host header names another target
    scan.raw_answer("forward 421", _raw(p.port, (
        f"GET {up}/items/1?{query('forward 421')} HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"
        f"Proxy-Authorization: {cred}\r\nX-Whatever: {c('forward 421 custom header')}\r\n\r\n"
    ).encode()))

    # -- CONNECT: intercepted TLS, a tunnel to an uncovered host -------------------------------
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), verify=str(p.ca_pem), timeout=10) as h:
        scan.answer("tunnel allowed", h.get(f"{tls}/items/1?{query('tunnel allowed')}", headers=secret_headers("tunnel allowed")))
        scan.answer("tunnel denied", h.delete(f"{tls}/items/1?{query('tunnel denied')}", headers=secret_headers("tunnel denied")))
        scan.answer("tunnel no route", h.get(f"{tls}/nothing?{query('tunnel no route')}", headers=secret_headers("tunnel no route")))
    scan.raw_answer("connect uncovered", _raw(p.port, (
        f"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.2:443\r\nProxy-Authorization: {cred}\r\n"
        f"X-Whatever: {c('CONNECT custom header')}\r\n\r\n"
    ).encode()))
    scan.raw_answer("connect 407", _raw(p.port, (
        f"CONNECT localhost:{upstream_tls.port} HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n"
        f"Proxy-Authorization: {_basic('reader-bot', c('CONNECT proxy password'))}\r\n\r\n"
    ).encode()))

    # -- gateway mode ------------------------------------------------------------------------
    gw = p.gateway_url
    scan.answer("gateway allowed", httpx.get(
        f"{gw}/svc/items/1?{query('gateway allowed')}", headers={"Authorization": f"Bearer {reader}",
        "Cookie": f"s={c('gateway Cookie')}", "X-Api-Key": c("gateway X-Api-Key"), "X-Whatever": c("gateway custom header")}, timeout=10,
    ))
    scan.answer("gateway denied", httpx.delete(
        f"{gw}/svc/items/1?{query('gateway denied')}", headers={"Authorization": f"Bearer {reader}",
        "X-Whatever": c("gateway denied custom header")}, timeout=10,
    ))
    scan.answer("gateway 404", httpx.get(
        f"{gw}/nowhere/x?{query('gateway 404')}", headers={"Authorization": f"Bearer {reader}"}, timeout=10,
    ))
    scan.answer("gateway 401", httpx.get(
        f"{gw}/svc/items/1?{query('gateway 401')}", headers={"Authorization": _basic(c("gateway Basic username"), c("gateway Basic password"))}, timeout=10,
    ))
    scan.answer("gateway 401 bearer", httpx.get(
        f"{gw}/svc/items/1", headers={"Authorization": f"Bearer {c('gateway garbage bearer')}"}, timeout=10,
    ))
    scan.answer("gateway bad path", httpx.get(
        f"{gw}/svc/items/%2e%2e/x?{query('gateway bad path')}", headers={"Authorization": f"Bearer {reader}"}, timeout=10,
    ))

    # -- approvals: a held request, then another request reusing its Idempotency-Key (422) --
    key = str(uuid.uuid4())
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as h:
        held = scan.answer("held", h.post(
            f"{up}/tenants/7/orders?dry_run=false&{query('held')}",
            json={"order": {"total": 750, "items": [{"sku": "A-1"}]}, "password": c("held body password")},
            headers={**secret_headers("held"), "Idempotency-Key": key},
        ))
        assert held.status_code == 202, held.text
        scan.answer("idempotency 422", h.post(
            f"{up}/tenants/7/orders?{query('idempotency 422')}",
            json={"order": {"total": 760, "items": [{"sku": "B-2"}]}},
            headers={**secret_headers("idempotency 422"), "Idempotency-Key": key},
        ))

    # -- the control API: a bad approver token, a query, a malformed request --------------------
    scan.answer("control 401", httpx.get(
        f"{p.control_url}/v1/approvals?agent={c('control query')}", headers={"Authorization": f"Bearer {c('control bearer')}"},
        timeout=10,
    ))
    scan.answer("control 404", httpx.get(f"{p.control_url}/nothing?{query('control 404')}", timeout=10))
    # aiohttp's own 400 echoes the bad line to its sender (only to it): the log must not have it
    scan.statuses["control bad request line"] = int(_raw(
        p.control_port, f"G\x01T /x?k={c('control bad request line')} HTTP/1.1\r\n\r\n".encode()
    ).split(b" ", 2)[1])

    # -- malformed requests --------------------------------------------------------------------
    scan.raw_answer("tunnel bad request line", _in_tunnel(p, upstream_tls.port, cred, (
        f"GET /items/1?{query('tunnel bad request line')} HTTP/1.1 extra\r\n\r\n".encode()
    )))
    _in_tunnel(p, upstream_tls.port, cred, (
        f"GET /items/1?{query('tunnel hang-up')} HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n"
        f"Authorization: Bearer {c('tunnel hang-up Authorization')}\r\nCookie: s={c('tunnel hang-up Cookie')}\r\n"
    ).encode(), read=False)
    scan.raw_answer("bad request line", _raw(p.port, f"GET /x?token={c('bad request line')} HTTP/1.1 extra\r\n\r\n".encode()))
    scan.raw_answer("garbage request line", _raw(p.port, f"{c('garbage line')}\r\n\r\n".encode()))
    scan.raw_answer("bad header line", _raw(p.port, (
        f"GET {up}/items/1 HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: {cred}\r\n"
        f"Broken header {c('bad header line')}\r\n\r\n"
    ).encode()))
    scan.raw_answer("head too large", _raw(p.port, (
        f"GET {up}/items/1?{query('head too large')} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Proxy-Authorization: {cred}\r\nX-Whatever: {c('head too large header')}\r\nX-Pad: {'p' * 9000}\r\n\r\n"
    ).encode()))
    scan.raw_answer("chunked trailers", _raw(p.port, (
        f"POST {up}/items?{query('chunked trailers')} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Proxy-Authorization: {_basic('writer-bot', writer)}\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"5\r\nhello\r\n0\r\nX-Trailer: {c('chunked trailer')}\r\n\r\n"
    ).encode()))
    _raw(p.port, (
        f"GET {up}/items/1?{query('hang-up')} HTTP/1.1\r\nProxy-Authorization: {cred}\r\n"
        f"Cookie: s={c('hang-up Cookie')}\r\nX-Whatever: {c('hang-up custom header')}\r\n"
    ).encode(), read=False)
    scan.raw_answer("bad header value", _raw(p.port, (
        f"GET {up}/items/1?{query('bad header value')} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Proxy-Authorization: {cred}\r\nX-Whatever: a\r\n folded {c('folded header')}\r\n\r\n"
    ).encode()))


def _collect(scan: Scan, p: Proctor, idp) -> None:
    state = p.dir / "state"
    approver = idp.token("alice", aud="proctor-approvers", approval_groups=["managers"], ttl=600)
    auth = {"Authorization": f"Bearer {approver}"}
    listing = scan.answer("approvals API list", httpx.get(f"{p.control_url}/v1/approvals", headers=auth, timeout=10))
    for a in listing.json()["approvals"]:
        scan.answer("approvals API show", httpx.get(f"{p.control_url}/v1/approvals/{a['id']}", headers=auth, timeout=10))
    scan.answer("activity API", httpx.get(f"{p.control_url}/v1/activity", params={"limit": 500}, headers=auth, timeout=10))
    scan.answer("metrics", httpx.get(f"{p.control_url}/metrics", timeout=10))
    scan.answer("stats", httpx.get(f"{p.control_url}/v1/stats", timeout=10))
    p.stop()  # flush everything: the store, the trail, the log
    scan.saw("log", p.log())
    for f in sorted(state.rglob("*")):
        if f.is_file():
            scan.saw(f"state file {f.relative_to(state)}", f.read_bytes())


# What each attack must have got: proof that it reached the code it was aimed at.
EXPECTED_STATUSES = {
    "forward allowed": 200, "forward denied": 403, "forward no route": 403, "forward bad path": 400,
    "forward unmapped host": 403, "forward 407 bad password": 407, "forward 407 username": 407,
    "forward 407 forged": 407, "forward 407 none": 407, "forward json body": 200, "forward broken json": 400,
    "forward content-encoding": 415, "forward 413": 413, "forward mcp": 200, "forward userinfo": 400,
    "forward 421": 421, "tunnel allowed": 200, "tunnel denied": 403, "tunnel no route": 403,
    "connect uncovered": 403, "connect 407": 407, "gateway allowed": 200, "gateway denied": 403,
    "gateway 404": 404, "gateway 401": 401, "gateway 401 bearer": 401, "gateway bad path": 400, "held": 202,
    "idempotency 422": 422, "bad request line": 400, "garbage request line": 400, "bad header line": 400,
    "head too large": 431, "bad header value": 400, "control 401": 401, "control 404": 404,
    "control bad request line": 400, "tunnel bad request line": 400, "approvals API list": 200, "approvals API show": 200,
    "activity API": 200, "metrics": 200, "stats": 200,
}


def test_every_attack_reached_its_target(scanned):
    scan, p = scanned
    got = {label: scan.statuses.get(label) for label in EXPECTED_STATUSES}
    assert got == EXPECTED_STATUSES
    assert scan.statuses["chunked trailers"] in (None, 400)
    log = dict(scan.outputs)["log"]
    assert " DEBUG " in log  # the log level really was debug
    # the engine did quote the raw requests it could not parse (redacted)
    for message in ("Bad HTTP request line: b'", "Invalid header line: b'", "before completing request headers: b'"):
        assert message in log
    assert log.count("before completing request headers: b'") >= 2  # in plain HTTP and inside the tunnel
    # the forwarded requests carried their secrets to the upstream: Proctor saw them
    planted = {where: value for value, where in scan.planted.items()}
    reached = json.dumps(scan.upstream_received)
    for where in ("forward allowed query api_key", "tunnel allowed query token", "gateway allowed query q",
                  "forward allowed custom header", "json body password"):
        assert planted[where] in reached, where


OUTPUTS = {
    "log": "log",
    "decision record": "state file decisions",
    "audit trail": "state file audit",
    "state store and other state files": "state file",
    "answers to the agents": "answer ",
}


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_no_canary_in(scanned, output):
    scan, _ = scanned
    prefix = OUTPUTS[output]
    assert any(label.startswith(prefix) for label, _ in scan.outputs), f"nothing collected for {output}"
    leaks = scan.leaks(prefix)
    assert not leaks, "\n".join(leaks)
