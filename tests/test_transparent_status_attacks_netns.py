"""The status address attacked from inside the pod (docs/transparent.md, "Held requests and the status URL").

The transparent sidecar of tests/support/transparent_netns.py with the hold policy of
tests/test_transparent_holds_netns.py. The agent (its uid, no token) speaks raw bytes to
the control port on a local address, which `proctor netsetup` redirects to the transparent
listener. Whatever it sends, it gets at most the control API's status body for its own
approvals: smuggling (CL+TE, pipelining an approve, keep-alive), HTTP/1.0, absolute form,
Host naming the ERP, Expect with a body, path tricks, other methods, upgrades, TLS, a head
that never ends, another agent's ids; the approval stays pending and nothing reaches the
control API or the ERP.

Needs root (namespaces): skipped with the reason otherwise; CI runs as root.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from support.transparent_netns import AGENT_UID, CONTROL_PORT, ERP_IP, FORWARD_PORT, PROXY_UID, Netns, python_for, why_no_netns
from test_transparent_holds_netns import (  # noqa: F401 - hold_policies is a fixture
    ERP, HTTP_PORT, WORKLOAD, approver_token, create, hold_policies, held, operator_view,
)

pytestmark = pytest.mark.integration

IDLE = 4  # limits.client_idle_timeout_seconds of this module's Proctor

NO_NETNS = why_no_netns()
if NO_NETNS is not None:
    pytest.skip(NO_NETNS, allow_module_level=True)

# The agent's raw client: connects, sends each chunk (pausing between), reads until the peer
# closes or `idle` seconds pass without a byte; prints what it read (base64) and how it ended.
RAW_CLIENT = r"""
import base64, json, socket, sys, time
a = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in a["host"] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(a.get("idle", 3))
s.connect((a["host"], a["port"]))
got, ended = b"", "idle"
try:
    for chunk in a["chunks"]:
        s.sendall(base64.b64decode(chunk))
        time.sleep(a.get("pause", 0.2))
    while True:
        b = s.recv(65536)
        if not b:
            ended = "closed"
            break
        got += b
except socket.timeout:
    pass
except OSError as e:
    ended = f"error {e}"
print(json.dumps({"data": base64.b64encode(got).decode(), "ended": ended}))
"""


@pytest.fixture(scope="module")
def env(request, idp, hold_policies) -> Iterator[Netns]:  # noqa: F811
    ns = Netns("nftables")
    try:
        ns.build(idp, idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600), policies=hold_policies,
                 config={"approvals": {"mode": "async", "retry_after_seconds": 1, "expire_after_seconds": 600},
                         "limits": {"client_idle_timeout_seconds": IDLE}})
        (ns.agent_dir / "raw.py").write_text(RAW_CLIENT)
        yield ns
    finally:
        ns.close()


@pytest.fixture
def fresh(env: Netns) -> Netns:
    env.clear_logs()
    return env


def raw(env: Netns, *chunks: bytes, host: str = "127.0.0.1", port: int = CONTROL_PORT, idle: float = 3,
        pause: float = 0.2) -> tuple[bytes, str]:
    args = json.dumps({"host": host, "port": port, "chunks": [base64.b64encode(c).decode() for c in chunks],
                       "idle": idle, "pause": pause})
    done = env.as_agent([*python_for(AGENT_UID), str(env.agent_dir / "raw.py"), args], timeout=60)
    assert done.returncode == 0, done
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return base64.b64decode(out["data"]), out["ended"]


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1 responses in `data`, in order (Content-Length framed)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status == 100:
            out.append((status, headers, b""))
            data = rest
            continue
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def hold(env: Netns) -> str:
    return held(env, create(env, ERP, f"m-{uuid.uuid4().hex}"))["approval_id"]


def untouched(env: Netns, idp, aid: str) -> None:
    """The approval is still pending with no vote, and nothing reached the ERP."""
    view = operator_view(env, idp, aid)
    assert view["state"] == "pending" and view["votes"] == [], view
    assert env.received("erp-http") == []


def status_ok(answer: tuple[int, dict[str, str], bytes], aid: str) -> None:
    status, headers, body = answer
    assert status == 200, answer
    doc = json.loads(body)
    assert set(doc) <= {"id", "state", "action", "resource", "expires_at", "decided_by", "reason"}, doc
    assert doc["id"] == aid and doc["state"] == "pending", doc


def refused(answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert status == 508, answer
    assert json.loads(body)["reasons"] == ["transparent-loop"], answer


def approve_request(aid: str, token: str) -> bytes:
    body = b'{"reason": "self-approved"}'
    return (f"POST /v1/approvals/{aid}/approve HTTP/1.1\r\nHost: 127.0.0.1:{CONTROL_PORT}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get(path: str, *headers: str, version: str = "HTTP/1.1", method: str = "GET") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    if not any(h.lower().startswith("host:") for h in headers) and version != "HTTP/1.0":
        head = f"Host: 127.0.0.1:{CONTROL_PORT}\r\n" + head
    return f"{method} {path} {version}\r\n{head}\r\n".encode()


# ------------------------------------------------------------------ smuggling
def test_a_pipelined_approve_after_a_status_request_is_refused(fresh: Netns, idp):
    aid = hold(fresh)
    data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status") + approve_request(aid, approver_token(idp)))
    answers = responses(data)
    status_ok(answers[0], aid)
    for later in answers[1:]:
        refused(later)
    untouched(fresh, idp, aid)


def test_a_keep_alive_second_request_is_refused(fresh: Netns, idp):
    aid = hold(fresh)
    data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status"), approve_request(aid, approver_token(idp)),
                  get(f"/v1/approvals/{aid}/status"), pause=0.5)
    answers = responses(data)
    status_ok(answers[0], aid)
    assert [a[0] for a in answers[1:]] in ([], [508], [508, 200]), answers
    for later in answers[1:2]:
        refused(later)
    untouched(fresh, idp, aid)


@pytest.mark.parametrize("framing", ["cl-te", "te-cl", "te-obfuscated"])
def test_content_length_and_transfer_encoding_smuggling(fresh: Netns, idp, framing: str):
    aid = hold(fresh)
    inner = approve_request(aid, approver_token(idp))
    chunk = f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n"
    te = "Transfer-Encoding: chunked" if framing != "te-obfuscated" else "Transfer-Encoding : chunked"
    head = (f"GET /v1/approvals/{aid}/status HTTP/1.1\r\nHost: 127.0.0.1:{CONTROL_PORT}\r\n"
            + (f"Content-Length: 0\r\n{te}\r\n" if framing == "cl-te" else f"{te}\r\nContent-Length: 0\r\n")
            + "\r\n").encode()
    data, _ = raw(fresh, head + chunk + inner)
    # both framings, or a malformed one: refused 400 and closed before anything is read as a request
    assert [a[0] for a in responses(data)] == [400], data
    untouched(fresh, idp, aid)


def test_http_1_0_and_absolute_form_and_a_foreign_host_get_only_the_status(fresh: Netns, idp):
    aid = hold(fresh)
    path = f"/v1/approvals/{aid}/status"
    for request in (
        get(path, version="HTTP/1.0"),
        get(f"http://erp.test:{HTTP_PORT}{path}"),  # absolute form naming the ERP: still only the status
        get(f"http://127.0.0.1:{FORWARD_PORT}{path}"),
        get(path, f"Host: erp.test:{HTTP_PORT}"),
        get(path, "Connection: keep-alive", version="HTTP/1.0"),
    ):
        data, _ = raw(fresh, request)
        (answer,) = responses(data)
        status_ok(answer, aid)
    # the ERP's own paths through the status address, whatever the request names: refused
    for request in (get(f"http://erp.test:{HTTP_PORT}/items/1"), get("/items/1", f"Host: erp.test:{HTTP_PORT}")):
        data, _ = raw(fresh, request)
        (answer,) = responses(data)
        refused(answer)
    untouched(fresh, idp, aid)


def test_expect_100_continue_with_a_body_is_refused_unread(fresh: Netns, idp):
    aid = hold(fresh)
    head = (f"GET /v1/approvals/{aid}/status HTTP/1.1\r\nHost: 127.0.0.1:{CONTROL_PORT}\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n").encode()
    data, _ = raw(fresh, head, b"xxxxx")
    answers = [a for a in responses(data) if a[0] != 100]
    assert answers and answers[0][0] == 508, data
    refused(answers[0])
    untouched(fresh, idp, aid)


# ------------------------------------------------------------------ paths and methods
def test_path_tricks_are_refused_or_answer_the_same_status(fresh: Netns, idp):
    aid = hold(fresh)
    same = [f"/v1/approvals/{aid}/status?approve=1", f"/v1/approvals/{aid}/status?/approve",
            "/v1/approvals/" + "".join(f"%{ord(c):02X}" for c in aid) + "/status"]
    for path in same:
        data, _ = raw(fresh, get(path))
        (answer,) = responses(data)
        status_ok(answer, aid)
    others = [f"/v1/approvals/{aid}/approve", f"/v1/approvals/{aid}/status/../approve",
              f"/v1/approvals/{aid}/status/%2e%2e/approve", f"/v1/approvals/{aid}%2Fapprove%3F/status",
              f"/v1/approvals/{aid};/status", f"/v1/approvals/{aid}/status;approve", f"//v1/approvals/{aid}/status",
              f"/v1//approvals/{aid}/status", f"/v1/approvals/{aid}/./status", f"/v1/approvals/../approvals/{aid}/status",
              "/v1/approvals/" + "a" * 5000 + "/status", f"/v1/approvals/{aid}\u00e9/status".encode().decode("latin-1"),
              f"/v1/approvals/{aid}%00/status", f"/V1/approvals/{aid}/status", "/v1/approvals/%2e%2e/status",
              "*"]
    for path in others:
        data, _ = raw(fresh, get(path))
        got = responses(data)
        assert len(got) == 1 and got[0][0] in (400, 404, 414, 431, 508), (path, data[:300])
        if got[0][0] == 404:
            assert json.loads(got[0][2])["title"] == "No such approval", path
    untouched(fresh, idp, aid)


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "get", "Get", "TRACE", "PUT", "PATCH", "CONNECT"])
def test_other_methods_are_refused(fresh: Netns, idp, method: str):
    aid = hold(fresh)
    target = f"erp.test:{HTTP_PORT}" if method == "CONNECT" else f"/v1/approvals/{aid}/status"
    data, _ = raw(fresh, get(target, method=method) + get("/items/1", f"Host: erp.test:{HTTP_PORT}"))
    got = responses(data) if data else []
    assert got, (method, data)
    assert got[0][0] in (400, 508), (method, data[:400])
    assert all(a[0] in (400, 508) for a in got), (method, data[:400])
    untouched(fresh, idp, aid)


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_an_upgrade_is_not_taken(fresh: Netns, idp, upgrade: str):
    aid = hold(fresh)
    extra = ["Connection: Upgrade", f"Upgrade: {upgrade}"]
    extra += (["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"] if upgrade == "websocket"
              else ["HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", "Connection: Upgrade, HTTP2-Settings"])
    data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status", *extra) + approve_request(aid, approver_token(idp)))
    got = responses(data)
    assert got and got[0][0] != 101, data
    status_ok(got[0], aid)
    for later in got[1:]:
        refused(later)
    untouched(fresh, idp, aid)


def test_http2_prior_knowledge_is_refused_once_as_a_loop(fresh: Netns, idp):
    """An HTTP/2 preface at the status address is Proctor's own port like anything else there:
    one 508 (it was a 403 'uninspectable', sent once per event: three times), recorded."""
    aid = hold(fresh)
    data, ended = raw(fresh, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert ended == "closed"
    (answer,) = responses(data)
    refused(answer)
    rec = fresh.decision(json.loads(answer[2])["decision_id"])
    assert (rec["agent"], rec["host"], rec["port"]) == (WORKLOAD, "127.0.0.1", CONTROL_PORT), rec
    # elsewhere a preface is still refused as uninspectable, once
    data, ended = raw(fresh, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", host=ERP_IP, port=HTTP_PORT)
    (answer,) = responses(data)
    assert answer[0] == 403 and json.loads(answer[2])["reasons"] == ["tls-interception-required"], answer
    untouched(fresh, idp, aid)


def test_a_tls_client_hello_is_closed(fresh: Netns, idp):
    aid = hold(fresh)
    reply = fresh.curl(f"https://127.0.0.1:{CONTROL_PORT}/v1/approvals/{aid}/status", "-k")
    assert reply.status is None, reply
    untouched(fresh, idp, aid)


# ------------------------------------------------------------------ slowloris, enumeration, leaks
def test_a_head_that_never_ends_ties_up_nothing(fresh: Netns, idp):
    """Many connections each holding half a head: the status address and the agent's other
    traffic are still answered meanwhile, and each half head is closed, unanswered, after the
    client idle timeout (limits.client_idle_timeout_seconds)."""
    aid = hold(fresh)
    script = (
        "import socket, sys, time\n"
        "socks = []\n"
        "for i in range(200):\n"
        f"    s = socket.create_connection(('127.0.0.1', {CONTROL_PORT}))\n"
        "    s.sendall(b'GET /v1/approvals/x/status HTTP/1.1\\r\\nX-Slow: ')\n"
        "    socks.append(s)\n"
        "print('open', flush=True)\n"
        "t = time.monotonic()\n"
        "for s in socks:\n"
        "    s.settimeout(30)\n"
        "    assert s.recv(100) == b'', 'answered'\n"
        "print('closed', round(time.monotonic() - t), flush=True)\n"
    )
    (fresh.agent_dir / "slow.py").write_text(script)
    slow = subprocess.Popen(["ip", "netns", "exec", fresh.agent_ns, "setpriv", f"--reuid={AGENT_UID}",
                             f"--regid={AGENT_UID}", "--clear-groups", *python_for(AGENT_UID),
                             str(fresh.agent_dir / "slow.py")], stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout is not None and slow.stdout.readline().strip() == "open"
        data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status"))
        status_ok(responses(data)[0], aid)
        assert create(fresh, ERP, f"m-{uuid.uuid4().hex}", amount=10).status == 200
        word, seconds = slow.stdout.readline().split()
        assert word == "closed" and int(seconds) <= IDLE + 5, (word, seconds)
        assert slow.wait(10) == 0
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.wait(5)
    assert operator_view(fresh, idp, aid)["state"] == "pending"


def test_another_agents_id_and_an_unknown_id_answer_alike(fresh: Netns, idp):
    other = idp.token("other-agent", groups=["writers"], ttl=600)
    mark = f"m-{uuid.uuid4().hex}"
    via_forward = fresh.curl(f"{ERP}/items", "-x", f"http://other-agent:{other}@127.0.0.1:{FORWARD_PORT}",
                             "-H", "Content-Type: application/json",
                             "--data-binary", json.dumps({"amount": 600, "note": mark}), method="POST", uid=PROXY_UID)
    assert via_forward.status == 202, via_forward
    theirs = via_forward.json()["approval_id"]
    unknown = "apr_" + "0" * (len(theirs) - 4) if theirs.startswith("apr_") else "x" * len(theirs)
    answers = {}
    for aid in (theirs, unknown):
        data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status"))
        (answers[aid],) = responses(data)
    (s1, h1, b1), (s2, h2, b2) = answers[theirs], answers[unknown]
    assert s1 == s2 == 404 and b1 == b2, answers
    assert {k: v for k, v in h1.items() if k not in ("date", "x-proctor-decision-id")} == {
        k: v for k, v in h2.items() if k not in ("date", "x-proctor-decision-id")}
    assert mark.encode() not in b1


def test_the_status_answer_carries_nothing_of_the_held_request(fresh: Netns, idp):
    secret = f"s-{uuid.uuid4().hex}"
    reply = fresh.curl(f"{ERP}/items", "-H", "Content-Type: application/json", "-H", f"X-Agent-Secret: {secret}",
                       "--data-binary", json.dumps({"amount": 700, "note": secret}), method="POST")
    aid = held(fresh, reply)["approval_id"]
    data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status"))
    (answer,) = responses(data)
    status_ok(answer, aid)
    assert secret.encode() not in data and b"erp-secret" not in data and b"token" not in answer[2].lower()
    assert set(answer[1]) <= {"content-type", "cache-control", "retry-after", "content-length", "date", "server",
                              "connection", "x-proctor-decision-id"}, answer[1]


def test_ipv6_loopback_gets_the_same_rules(fresh: Netns, idp):
    aid = hold(fresh)
    data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status", f"Host: [::1]:{CONTROL_PORT}")
                  + approve_request(aid, approver_token(idp)), host="::1")
    answers = responses(data)
    status_ok(answers[0], aid)
    for later in answers[1:]:
        refused(later)
    untouched(fresh, idp, aid)



def test_protect_port_none_still_redirects_the_status_port(fresh: Netns, idp):
    """`--protect-port none` with the default `--status-port`: Proctor's other listeners become
    reachable (the documented warning), but the control port on a local address is still the
    status address: the agent still never reaches the control API itself."""
    aid = hold(fresh)
    fresh.netsetup("--protect-port", "none")
    try:
        for host in ("127.0.0.1", "::1"):
            data, _ = raw(fresh, get(f"/v1/approvals/{aid}/status") + approve_request(aid, approver_token(idp)),
                          host=host)
            answers = responses(data)
            status_ok(answers[0], aid)
            for later in answers[1:]:
                refused(later)
            data, _ = raw(fresh, get("/healthz"), host=host)
            refused(responses(data)[0])
        # what --protect-port none opens, as documented: the forward listener answers the agent
        assert fresh.curl(f"http://127.0.0.1:{FORWARD_PORT}/healthz").status is not None
    finally:
        fresh.netsetup()
    untouched(fresh, idp, aid)
    assert fresh.curl(f"http://127.0.0.1:{FORWARD_PORT}/healthz").status is None

