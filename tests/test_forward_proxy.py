"""Forward-proxy mode through a real proxy process to a real upstream, with real clients."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import httpx
import pytest
import requests

pytestmark = pytest.mark.integration


def _client_env(proxy_url: str, ca: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    # curl honours only the lower-case http_proxy (httpoxy protection): set both, as agents must.
    env.update(
        HTTP_PROXY=proxy_url, HTTPS_PROXY=proxy_url, http_proxy=proxy_url, https_proxy=proxy_url,
        SSL_CERT_FILE=ca, REQUESTS_CA_BUNDLE=ca, CURL_CA_BUNDLE=ca,
    )
    return env


def curl(env: dict, *args: str) -> tuple[int, dict, str]:
    """Run curl with only environment configuration (like an unmodified agent)."""
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "15", *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    raw = out.stdout.replace("\r\n", "\n")
    # skip the "HTTP/1.1 200 Connection established" block of a CONNECT
    blocks = raw.split("\n\n")
    while blocks and blocks[0].startswith("HTTP/") and " Connection established" in blocks[0].split("\n")[0]:
        blocks = blocks[1:]
    head, body = blocks[0], "\n\n".join(blocks[1:])
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


# ------------------------------------------------------------------ plain HTTP
def test_curl_http_allowed_and_token_never_reaches_upstream(proctor, upstream, reader_token):
    upstream.clear()
    env = _client_env(proctor.proxy_url_with("reader-bot", reader_token), str(proctor.ca_pem))
    status, headers, body = curl(env, f"http://127.0.0.1:{upstream.port}/items/42")
    assert status == 200, body
    assert json.loads(body)["path"] == "/items/42"
    decision_id = headers["x-proctor-decision-id"]
    got = upstream.last()
    up_headers = upstream.headers_of(got)
    assert "proxy-authorization" not in up_headers
    assert reader_token not in json.dumps(got)
    rec = proctor.decision(decision_id)
    assert rec["decision"] == "allow"
    assert rec["agent"] == "reader-bot"
    assert rec["action"] == "test.item.read"
    assert rec["resource"] == 'Item::"42"'
    assert rec["reasons"] == ["agents-read-items"]
    assert rec["upstream_status"] == 200
    assert rec["latency_ms"] is not None


def test_requests_http_denied_names_policy(proctor, upstream, reader_token):
    upstream.clear()
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.delete(f"http://127.0.0.1:{upstream.port}/items/7", proxies=proxies, timeout=10)
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["reasons"] == ["no-item-deletes"]
    assert body["action"] == "test.item.delete"
    assert body["resource"] == 'Item::"7"'
    assert body["decision_id"] == r.headers["x-proctor-decision-id"]
    assert body["title"] and body["detail"]
    assert upstream.received() == [], "a denied request must not reach the upstream"
    assert proctor.decision(body["decision_id"])["decision"] == "deny"


def test_default_deny_when_no_policy_permits(proctor, upstream, reader_token):
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/secret/1", proxies=proxies, timeout=10)
    assert r.status_code == 403
    assert r.json()["reasons"] == []
    assert "default deny" in r.json()["detail"]


def test_json_body_reaches_policy_context(proctor, upstream, writer_token):
    upstream.clear()
    proxies = {"http": proctor.proxy_url_with("writer-bot", writer_token)}
    small = requests.post(f"http://127.0.0.1:{upstream.port}/items", json={"amount": 10}, proxies=proxies, timeout=10)
    assert small.status_code == 200
    assert json.loads(upstream.last()["body"]) == {"amount": 10}
    big = requests.post(f"http://127.0.0.1:{upstream.port}/items", json={"amount": 5000}, proxies=proxies, timeout=10)
    assert big.status_code == 403
    assert big.json()["reasons"] == ["no-big-orders"]


def test_malformed_json_body_refused(proctor, upstream, writer_token):
    proxies = {"http": proctor.proxy_url_with("writer-bot", writer_token)}
    r = requests.post(
        f"http://127.0.0.1:{upstream.port}/items",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        proxies=proxies,
        timeout=10,
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]


def test_body_over_limit_refused(proctor, upstream, writer_token):
    proxies = {"http": proctor.proxy_url_with("writer-bot", writer_token)}
    r = requests.post(
        f"http://127.0.0.1:{upstream.port}/items", data=b"x" * (1024 * 1024 + 1), proxies=proxies, timeout=10
    )
    assert r.status_code == 413
    assert r.json()["decision_id"]


def test_evaluation_error_denies(proctor, upstream, reader_token):
    """Cedar skips an erroring forbid and would allow; Proctor must deny and name it."""
    upstream.clear()
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/boom", proxies=proxies, timeout=10)
    assert r.status_code == 403
    body = r.json()
    assert body["reasons"] == ["boom-overflow"]
    assert "overflow" in body["detail"] and "@boom-overflow" in body["detail"]
    # Cedar quotes the operands it failed on (they may come from a body or a claim): elided
    assert "9223372036854775807" not in body["detail"]
    assert "9223372036854775807" not in json.dumps(proctor.decision(body["decision_id"]))
    assert upstream.received() == []


def test_unmapped_host_refused(proctor, reader_token):
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get("http://127.0.0.1:9/anything", proxies=proxies, timeout=10)
    assert r.status_code == 403
    assert r.json()["reasons"] == ["egress-default-deny"]


def test_unmapped_route_on_known_host_refused(proctor, upstream, reader_token):
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/admin/users", proxies=proxies, timeout=10)
    assert r.status_code == 403
    assert r.json()["reasons"] == ["egress-default-deny"]


def test_bearer_proxy_authorization(proctor, upstream, reader_token):
    r = httpx.Client(proxy=proctor.proxy_url, timeout=10).get(
        f"http://127.0.0.1:{upstream.port}/items/1", headers={"Proxy-Authorization": f"Bearer {reader_token}"}
    )
    assert r.status_code == 200


def test_username_must_match_subject(proctor, upstream, reader_token):
    proxies = {"http": proctor.proxy_url_with("someone-else", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10)
    assert r.status_code == 407
    assert "username must equal" in r.json()["detail"]


def test_dev_issuer_token_works(proctor, upstream):
    tok = proctor.dev_token("dev-agent", groups=["readers"])
    proxies = {"http": proctor.proxy_url_with("dev-agent", tok)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10)
    assert r.status_code == 200
    assert proctor.decision(r.headers["x-proctor-decision-id"])["issuer"] == "proctor-dev"


# ------------------------------------------------------------------ HTTPS (CONNECT + interception)
def test_curl_https_through_connect(proctor, upstream_tls, reader_token):
    upstream_tls.clear()
    env = _client_env(proctor.proxy_url_with("reader-bot", reader_token), str(proctor.ca_pem))
    status, headers, body = curl(env, f"https://localhost:{upstream_tls.port}/items/9")
    assert status == 200, body
    assert "x-proctor-decision-id" in headers
    got = upstream_tls.last()
    assert got["scheme"] == "https"
    assert "proxy-authorization" not in upstream_tls.headers_of(got)
    assert reader_token not in json.dumps(got)


def test_requests_https_denied(proctor, upstream_tls, reader_token):
    upstream_tls.clear()
    proxies = {"https": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.delete(
        f"https://localhost:{upstream_tls.port}/items/9", proxies=proxies, verify=str(proctor.ca_pem), timeout=10
    )
    assert r.status_code == 403
    assert r.json()["reasons"] == ["no-item-deletes"]
    assert upstream_tls.received() == []


def test_httpx_https_allowed(proctor, upstream_tls, reader_token):
    with httpx.Client(proxy=proctor.proxy_url_with("reader-bot", reader_token), verify=ssl.create_default_context(cafile=str(proctor.ca_pem)), timeout=10) as c:
        r1 = c.get(f"https://localhost:{upstream_tls.port}/items/1")
        r2 = c.get(f"https://localhost:{upstream_tls.port}/items/2")  # same tunnel, bound identity
    assert r1.status_code == 200 and r2.status_code == 200
    rec = proctor.decision(r2.headers["x-proctor-decision-id"])
    assert rec["agent"] == "reader-bot" and rec["resource"] == 'Item::"2"'


def test_https_without_token_refused_at_connect(proctor, upstream_tls):
    env = _client_env(proctor.proxy_url, str(proctor.ca_pem))
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "10", f"https://localhost:{upstream_tls.port}/items/1"],
        env=env, capture_output=True, text=True,
    )
    assert out.stdout.strip() == "407"


def test_connect_to_unclassified_host_refused(proctor, reader_token):
    env = _client_env(proctor.proxy_url_with("reader-bot", reader_token), str(proctor.ca_pem))
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "10", "https://127.0.0.1:1/x"],
        env=env, capture_output=True, text=True,
    )
    assert out.stdout.strip() == "403"




def test_message_over_engine_ceiling_is_refused_and_recorded(proctor_factory, upstream, writer_token):
    p = proctor_factory({"limits": {"engine_max_message_bytes": 2 * 1024 * 1024}})
    before = len(p.decisions())
    r = requests.post(
        f"http://127.0.0.1:{upstream.port}/items",
        data=b"x" * (3 * 1024 * 1024),
        proxies={"http": p.proxy_url_with("writer-bot", writer_token)},
        timeout=15,
    )
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["decision_id"] == r.headers["x-proctor-decision-id"]
    recs = p.decisions()[before:]
    assert any(rec["status"] == 413 and rec["decision"] == "deny" for rec in recs)


def test_tunnel_token_sent_as_authorization_is_stripped(proctor, upstream_tls, reader_token):
    """Inside a CONNECT tunnel the agent's JWT must not reach the upstream, whatever header carries it."""
    upstream_tls.clear()
    with httpx.Client(proxy=proctor.proxy_url_with("reader-bot", reader_token), verify=ssl.create_default_context(cafile=str(proctor.ca_pem)), timeout=10) as c:
        r = c.get(f"https://localhost:{upstream_tls.port}/items/1", headers={"Authorization": f"Bearer {reader_token}"})
        other = c.get(f"https://localhost:{upstream_tls.port}/items/2", headers={"Authorization": "Bearer upstream-api-key"})
    assert r.status_code == 200 and other.status_code == 200
    first, second = upstream_tls.received()[-2:]
    assert "authorization" not in upstream_tls.headers_of(first)
    assert reader_token not in json.dumps(first)
    # an unrelated upstream credential is the agent's business (until credential injection): kept
    assert upstream_tls.headers_of(second)["authorization"] == "Bearer upstream-api-key"


def test_plain_http_token_sent_as_authorization_is_stripped(proctor, upstream, reader_token):
    upstream.clear()
    r = requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1",
        headers={"Authorization": f"Bearer {reader_token}"},
        proxies={"http": proctor.proxy_url_with("reader-bot", reader_token)},
        timeout=10,
    )
    assert r.status_code == 200
    assert reader_token not in json.dumps(upstream.last())


def test_no_credential_in_debug_logs(proctor_factory, upstream, idp):
    """Even at debug level, and even when mitmproxy logs a raw partial request, no credential is logged."""
    import socket
    import time

    p = proctor_factory(log_level="debug")
    tok = idp.token("log-bot", groups=["readers"])
    cred = __import__("base64").b64encode(f"log-bot:{tok}".encode()).decode()
    # a client that hangs up mid-headers makes mitmproxy log the partial buffer
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(f"GET http://127.0.0.1:{upstream.port}/items/1 HTTP/1.1\r\nProxy-Authorization: Basic {cred}\r\nCookie: sess=cookie-secret\r\n".encode())
        time.sleep(0.3)
    # plus ordinary traffic, allowed and refused
    requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url_with("log-bot", tok)}, timeout=10)
    requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url_with("log-bot", tok[:-4] + "AAAA")}, timeout=10)
    time.sleep(0.5)
    text = p.log() + json.dumps(p.decisions())
    assert "DEBUG" in p.log()  # the log level really was debug
    for secret in (tok, tok.split(".")[2], cred, "cookie-secret"):
        assert secret not in text


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/plain"}, {}, {"Content-Type": "text/json"}, {"Content-Type": "application/x-www-form-urlencoded"}],
    ids=["text-plain", "no-content-type", "text-json", "form-label"],
)
def test_mislabelled_json_body_is_still_seen_by_policy(proctor, upstream, writer_token, headers):
    upstream.clear()
    r = requests.post(
        f"http://127.0.0.1:{upstream.port}/items",
        data=b'{"amount": 5000}',
        headers=headers,
        proxies={"http": proctor.proxy_url_with("writer-bot", writer_token)},
        timeout=10,
    )
    assert r.status_code == 403 and r.json()["reasons"] == ["no-big-orders"]
    assert upstream.received() == []


def test_repeated_content_type_refused(proctor, upstream, writer_token):
    import base64
    import socket

    upstream.clear()
    cred = base64.b64encode(f"writer-bot:{writer_token}".encode()).decode()
    body = b'{"amount": 5000}'
    raw = (
        f"POST http://127.0.0.1:{upstream.port}/items HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Content-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.sendall(raw)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert upstream.received() == []


def test_compressed_body_refused(proctor, upstream, writer_token):
    import gzip

    r = requests.post(
        f"http://127.0.0.1:{upstream.port}/items",
        data=gzip.compress(b'{"amount": 5000}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        proxies={"http": proctor.proxy_url_with("writer-bot", writer_token)},
        timeout=10,
    )
    assert r.status_code == 415


def test_other_agent_tokens_in_authorization_are_stripped(proctor, upstream_tls, idp, reader_token):
    """A refreshed or second agent token in Authorization (even among repeated fields) never goes upstream."""
    upstream_tls.clear()
    refreshed = idp.token("reader-bot", groups=["readers"])
    other = idp.token("someone-else")
    with httpx.Client(proxy=proctor.proxy_url_with("reader-bot", reader_token), verify=ssl.create_default_context(cafile=str(proctor.ca_pem)), timeout=10) as c:
        r1 = c.get(f"https://localhost:{upstream_tls.port}/items/1", headers={"Authorization": f"Bearer {refreshed}"})
        r2 = c.get(
            f"https://localhost:{upstream_tls.port}/items/2",
            headers=[("Authorization", "Bearer upstream-key"), ("Authorization", f"Bearer {other}")],
        )
    assert r1.status_code == 200 and r2.status_code == 200
    dumped = json.dumps(upstream_tls.received())
    for tok in (reader_token, refreshed, other):
        assert tok not in dumped


# ------------------------------------------------------------------ the Cedar context, end to end
def test_context_method_source_ip_time_port_mode(proctor, upstream, reader_token):
    """The permit only holds if method, source_ip, time.{epoch,hour,weekday,now}, port and mode are right."""
    r = requests.get(f"http://127.0.0.1:{upstream.port}/ctx/1", proxies={"http": proctor.proxy_url_with("reader-bot", reader_token)}, timeout=10)
    assert r.status_code == 200, r.text
    assert proctor.decision(r.headers["x-proctor-decision-id"])["reasons"] == ["ctx-permit-when-context-is-complete"]


def test_context_query(proctor, upstream, reader_token):
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/ctx/1?a=b&forbidden=1", proxies=proxies, timeout=10)
    assert r.status_code == 403 and r.json()["reasons"] == ["ctx-forbid-query"]


def test_context_allowlisted_headers_only(proctor, upstream, reader_token):
    proxies = {"http": proctor.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(f"http://127.0.0.1:{upstream.port}/ctx/1", headers={"X-Request-Id": "block-me"}, proxies=proxies, timeout=10)
    assert r.status_code == 403 and r.json()["reasons"] == ["ctx-forbid-request-id"]
    # Authorization (and the proxy credential) never enter the context
    r = requests.get(f"http://127.0.0.1:{upstream.port}/ctx/1", headers={"Authorization": "Bearer upstream-key"}, proxies=proxies, timeout=10)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ unmodified clients, environment only
CLIENT_SCRIPT = r"""
import json, sys
lib, url = sys.argv[1], sys.argv[2]
if lib == "requests":
    import requests
    r = requests.get(url, timeout=10)          # proxies and CA from the environment only
    print(json.dumps({"status": r.status_code, "decision": r.headers.get("x-proctor-decision-id")}))
else:
    import httpx
    r = httpx.get(url, timeout=10)             # trust_env: HTTP(S)_PROXY and SSL_CERT_FILE
    print(json.dumps({"status": r.status_code, "decision": r.headers.get("x-proctor-decision-id")}))
"""


@pytest.mark.parametrize("lib", ["requests", "httpx"])
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_unmodified_clients_routed_by_environment(proctor, upstream, upstream_tls, reader_token, tmp_path, lib, tls):
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ca", "export", str(tmp_path / "ca.pem"), "-c", str(proctor.config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    env = _client_env(proctor.proxy_url_with("reader-bot", reader_token), str(tmp_path / "ca.pem"))
    url = f"https://localhost:{upstream_tls.port}/items/5" if tls else f"http://127.0.0.1:{upstream.port}/items/5"
    (upstream_tls if tls else upstream).clear()
    run = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, lib, url], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["status"] == 200 and result["decision"]
    assert proctor.decision(result["decision"])["agent"] == "reader-bot"
    received = (upstream_tls if tls else upstream).last()
    assert reader_token not in json.dumps(received)


# ------------------------------------------------------------------ typed connector values, end to end
def _order(proctor, upstream, token, tenant, body, query=""):
    return requests.post(
        f"http://127.0.0.1:{upstream.port}/tenants/{tenant}/orders{query}",
        json=body,
        proxies={"http": proctor.proxy_url_with("writer-bot", token)},
        timeout=10,
    )


def test_typed_values_reach_policy(proctor, upstream, writer_token):
    ok = _order(proctor, upstream, writer_token, 7, {"order": {"total": "250.00", "items": [{"sku": "A"}, {"sku": "B"}]}})
    assert ok.status_code == 200, ok.text
    big = _order(proctor, upstream, writer_token, 7, {"order": {"total": 1000.01}})
    assert big.status_code == 403 and big.json()["reasons"] == ["orders-over-1000-forbidden"]
    widget = _order(proctor, upstream, writer_token, 666, {"order": {"total": 10, "items": [{"sku": "WIDGET"}]}})
    assert widget.status_code == 403 and widget.json()["reasons"] == ["tenant-666-no-widgets"]
    dry = _order(proctor, upstream, writer_token, 7, {"order": {"total": 600}}, "?dry_run=true")
    assert dry.status_code == 403 and dry.json()["reasons"] == ["dry-runs-over-500-forbidden"]
    assert _order(proctor, upstream, writer_token, 7, {"order": {"total": 600}}, "?dry_run=false").status_code == 200


@pytest.mark.parametrize(
    "tenant, body, query, message",
    [
        ("seven", {"order": {"total": 1}}, "", "path parameter 'tenant' must be an integer"),
        (7, {"order": {}}, "", "body field 'total'"),
        (7, {"order": {"total": "1.23456"}}, "", "more than 4 decimal places"),
        (7, {"order": {"total": 1}}, "?dry_run=maybe", "query parameter 'dry_run' must be true or false"),
    ],
    ids=["path-type", "missing-required", "decimal-precision", "query-type"],
)
def test_values_of_the_wrong_type_are_refused_before_policy(proctor, upstream, writer_token, tenant, body, query, message):
    upstream.clear()
    r = _order(proctor, upstream, writer_token, tenant, body, query)
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]
    assert upstream.received() == []
