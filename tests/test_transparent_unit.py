"""Transparent mode's logic called directly (fast, no processes, no namespaces).

- where a redirected request goes (core/target.py): what it names, never the
  address its connection was redirected from, and the checks around that;
- the workload identity's token file (proxy/identity/workload.py): reads,
  rotations (rename, the kubelet's ..data symlink swap, a rewrite with the same
  token), every failure fails closed with the file named and the token never
  shown, recovery, the check interval, metrics;
- the authenticator: identities never mix;
- the engine adapter (engine/mitm.py) on a transparent flow: the request is sent
  to the name, the connection rules (engine/transparent.py);
- the config section.

tests/test_transparent_netns.py proves the whole thing with real redirects.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from mitmproxy.proxy import mode_specs
from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry

from proxy.config import IdentityConfig, IssuerConfig, ProctorConfig, RequestLimits
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange
from proxy.core.model import AgentRequest
from proxy.core.stages import TargetCheck
from proxy.core.target import transparent_target
from proxy.engine.mitm import ProctorAddon
from proxy.engine.transparent import TransparentGuard
from proxy.identity.stage import Authenticate, Authenticator
from proxy.identity.verifier import TokenVerifier
from proxy.identity.workload import WorkloadIdentity, WorkloadUnavailable
from proxy.record.stage import RecordDecision

WORKLOAD = "support-agent"


# ------------------------------------------------------------------ where a request goes
@pytest.mark.parametrize("host_header, authority, sni, scheme, original, want", [
    ("erp.example", "", None, "http", ("203.0.113.9", 80), ("erp.example", 80)),
    ("erp.example", "", "erp.example", "https", ("203.0.113.9", 443), ("erp.example", 443)),
    ("erp.example:8443", "", None, "https", ("203.0.113.9", 8443), ("erp.example", 8443)),
    ("[2001:db8::1]:8080", "", None, "http", ("2001:db8::1", 8080), ("2001:db8::1", 8080)),
    ("10.0.0.7:8080", "", None, "http", ("10.0.0.7", 8080), ("10.0.0.7", 8080)),
    (None, "erp.example:81", None, "http", ("203.0.113.9", 81), ("erp.example", 81)),  # HTTP/1.0 absolute-form
    (None, "", "erp.example", "https", ("203.0.113.9", 8443), ("erp.example", 8443)),  # SNI on the connection's port
    (None, "", None, "http", ("203.0.113.9", 80), ("203.0.113.9", 80)),  # names nothing (refused below)
    ("erp.example:x", "", None, "http", ("203.0.113.9", 80), ("erp.example", -1)),  # refused below
])
def test_the_target_is_what_the_request_names(host_header, authority, sni, scheme, original, want):
    assert transparent_target(host_header, authority, sni, scheme, original) == want


def _redirected(host_header: str | None = "erp.example", original=("203.0.113.9", 80), scheme: str = "http",
                sni: str | None = None, authority: str = "", version: str = "HTTP/1.1") -> AgentRequest:
    host, port = transparent_target(host_header, authority, sni, scheme, original)
    headers = {"host": host_header} if host_header is not None else {}
    return AgentRequest(method="GET", scheme=scheme, host=host, port=port, path="/items/1", query="",
                        headers=headers, body=b"", client_ip="10.0.0.2", mode="transparent",
                        host_header=host_header, request_authority=authority, tls_sni=sni, http_version=version,
                        original_destination=original)


def _check(req: AgentRequest):
    ex = Exchange(req)
    TargetCheck(()).on_request(ex)
    return ex.refusal


def test_an_attackers_address_naming_the_erp_is_sent_to_the_erp():
    """The original destination (the attacker's IP) plays no part in where the request goes."""
    req = _redirected("erp.example", original=("198.51.100.66", 80))
    assert _check(req) is None
    assert (req.host, req.port) == ("erp.example", 80)
    tls = _redirected("ERP.example.:443", original=("198.51.100.66", 443), scheme="https", sni="erp.example")
    assert _check(tls) is None and (tls.host, tls.port) == ("erp.example", 443)  # canonicalised


@pytest.mark.parametrize("req, status, says", [
    (lambda: _redirected(None), 400, "Host header"),
    (lambda: _redirected(None, version="HTTP/1.0"), 400, "names no host"),
    (lambda: _redirected("erp.example:8443", original=("203.0.113.9", 80)), 421, "port 80"),
    (lambda: _redirected("erp.example", original=("203.0.113.9", 8080)), 421, "port 8080"),
    (lambda: _redirected("erp.example:443", original=("203.0.113.9", 443), scheme="https", sni="evil.example"),
     421, "SNI"),
    (lambda: _redirected("erp.example", authority="evil.example"), 421, "request-line authority"),
    (lambda: _redirected("erp.example:x"), 400, "invalid port"),
    (lambda: _redirected("erp .example"), 400, "Invalid host"),
    (lambda: _redirected(""), 400, "empty"),
])
def test_a_redirected_request_that_disagrees_with_itself_is_refused(req, status, says):
    refusal = _check(req())
    assert refusal is not None and refusal.status == status
    assert says.lower() in (refusal.title + " " + refusal.detail).lower(), refusal


def test_http10_without_host_but_with_sni_or_authority_is_accepted():
    assert _check(_redirected(None, version="HTTP/1.0", scheme="https", sni="erp.example",
                              original=("203.0.113.9", 443))) is None
    assert _check(_redirected(None, version="HTTP/1.0", authority="erp.example:80")) is None


# ------------------------------------------------------------------ the token file
@pytest.fixture
def verifier(idp) -> TokenVerifier:
    settings = IdentityConfig(issuers=[IssuerConfig(issuer=idp.issuer, audience=idp.audience,
                                                    jwks_file=idp.jwks_path, algorithms=["RS256", "ES256"])])
    return TokenVerifier(settings.issuers, settings)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _workload(path: Path, verifier: TokenVerifier, clock: Clock | None = None,
              registry: CollectorRegistry | None = None) -> WorkloadIdentity:
    return WorkloadIdentity(path, verifier, check_seconds=5, clock=clock or Clock(), registry=registry)


def _agent(w: WorkloadIdentity) -> str:
    return asyncio.run(w.current())[0].agent_id


def _refused(w: WorkloadIdentity) -> str:
    with pytest.raises(WorkloadUnavailable) as e:
        asyncio.run(w.current())
    return str(e.value)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.rename(path)


def test_reads_verifies_and_follows_a_rotation_at_most_every_interval(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD) + "\n")
    clock = Clock()
    w = _workload(f, verifier, clock)
    assert _agent(w) == WORKLOAD and w.problem() is None and w.rotations == 0
    _replace(f, idp.token("rotated"))
    assert _agent(w) == WORKLOAD  # not looked at again before the interval
    clock.now += 5
    assert _agent(w) == "rotated" and w.rotations == 1
    # rewritten with the same token (a touch, a re-mount): not a rotation
    token = f.read_text()
    f.write_text(token)
    os.utime(f, (time.time() + 7, time.time() + 7))
    clock.now += 5
    assert _agent(w) == "rotated" and w.rotations == 1


def test_follows_the_kubelets_data_symlink_swap(tmp_path, verifier, idp):
    d = tmp_path / "identity"
    d.mkdir()

    def publish(token: str, stamp: str) -> None:
        (d / stamp).mkdir()
        (d / stamp / "token").write_text(token)
        (d / "..data_tmp").symlink_to(stamp)
        (d / "..data_tmp").rename(d / "..data")

    publish(idp.token("first"), "..2026_01_01_00_00_00.1")
    (d / "token").symlink_to("..data/token")
    clock = Clock()
    w = _workload(d / "token", verifier, clock)
    assert _agent(w) == "first"
    publish(idp.token("second"), "..2026_01_01_01_00_00.2")
    (d / "..2026_01_01_00_00_00.1" / "token").unlink()  # the old directory goes away after the swap
    (d / "..2026_01_01_00_00_00.1").rmdir()
    clock.now += 5
    assert _agent(w) == "second" and w.rotations == 1


@pytest.mark.parametrize("make, says", [
    (lambda f, idp: None, "does not exist"),
    (lambda f, idp: f.write_text(""), "is empty"),
    (lambda f, idp: f.write_text("  \n"), "is empty"),
    (lambda f, idp: f.write_text("x" * 9000), "larger than 8192 bytes"),
    (lambda f, idp: f.write_bytes("jwt-ü".encode()), "not ASCII"),
    (lambda f, idp: f.write_text(idp.token("a") + "\n" + idp.token("b")), "contains whitespace"),
    (lambda f, idp: f.mkdir(), "not a regular file"),
    (lambda f, idp: f.write_text("not-a-jwt"), "not a well-formed JWT"),
    (lambda f, idp: f.write_text(idp.token("late", ttl=-300)), "expired"),
    (lambda f, idp: f.write_text(idp.token("aud", aud="someone-else")), "audience"),
    (lambda f, idp: f.write_text(idp.token("iss", iss="https://evil.example")), "issuer is not trusted"),
    (lambda f, idp: f.write_text(idp.token("nosig", kid="rsa-1", key=__import__(
        "cryptography.hazmat.primitives.asymmetric.rsa", fromlist=["x"]).generate_private_key(65537, 2048))),
     "signature"),
])
def test_every_bad_file_fails_closed_naming_the_file_never_the_token(tmp_path, verifier, idp, caplog, make, says):
    f = tmp_path / "token"
    make(f, idp)
    text = f.read_text() if f.is_file() else ""
    w = _workload(f, verifier)
    msg = _refused(w)
    assert says in msg and str(f) in msg
    assert w.usable_identity() is None and says in (w.status()["error"] or "")
    status = json.dumps(w.status())
    for secret in filter(None, [text.strip()] + text.split()):
        if len(secret) > 20:
            assert secret not in msg and secret not in status and secret not in caplog.text


def test_a_bad_rotation_refuses_and_a_good_one_restores(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD))
    clock = Clock()
    registry = CollectorRegistry()
    w = _workload(f, verifier, clock, registry)
    assert _agent(w) == WORKLOAD
    _replace(f, "garbage")
    clock.now += 5
    assert "not a well-formed JWT" in _refused(w)
    f.unlink()
    clock.now += 5
    assert "does not exist" in _refused(w)
    f.write_text(idp.token(WORKLOAD))
    clock.now += 5
    assert _agent(w) == WORKLOAD and w.problem() is None
    # good, garbage (read, then refused by the verifier), missing, good
    assert registry.get_sample_value("proctor_workload_identity_reloads_total", {"outcome": "ok"}) == 2
    assert registry.get_sample_value("proctor_workload_identity_reloads_total", {"outcome": "error"}) == 2
    assert registry.get_sample_value("proctor_workload_identity_valid") == 1.0


def test_a_token_that_expires_while_loaded_is_refused(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD, ttl=2))
    w = _workload(f, verifier)
    assert _agent(w) == WORKLOAD
    w._wall = lambda: time.time() + 3600  # (the status' clock)
    assert "expired" in (w.status()["error"] or "")
    verifier.settings = verifier.settings.model_copy(update={"leeway_seconds": 0})
    time.sleep(2.1)
    assert "expired" in _refused(w)


def test_the_watcher_verifies_without_traffic(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text("garbage")
    w = WorkloadIdentity(f, verifier, check_seconds=0.1)

    async def run() -> None:
        task = asyncio.create_task(w.run())
        try:
            await asyncio.sleep(0.3)
            assert w.problem() is not None and w.identity is None
            f.write_text(idp.token(WORKLOAD))
            for _ in range(50):
                await asyncio.sleep(0.05)
                if w.identity is not None:
                    break
        finally:
            task.cancel()

    asyncio.run(run())
    assert w.identity is not None and w.identity.agent_id == WORKLOAD and w.problem() is None
    assert w.status()["agent_id"] == WORKLOAD and w.status()["expires_at"] > time.time()


# ------------------------------------------------------------------ identities never mix
def _request(mode: str, headers: dict[str, str]) -> AgentRequest:
    return AgentRequest(method="GET", scheme="http", host="erp.example", port=80, path="/", query="",
                        headers=headers, body=b"", client_ip="10.0.0.2", mode=mode)  # type: ignore[arg-type]


def _auth(verifier: TokenVerifier, workload: WorkloadIdentity | None, req: AgentRequest):
    return asyncio.run(Authenticator(verifier, verifier.settings, workload).authenticate(req))


def test_a_transparent_request_is_the_workloads_whatever_it_carries(tmp_path, verifier, idp):
    f = tmp_path / "token"
    token = idp.token(WORKLOAD)
    f.write_text(token)
    w = _workload(f, verifier)
    other = idp.token("other-agent", groups=["admins"])
    plain = _auth(verifier, w, _request("transparent", {}))
    assert plain.identity is not None and plain.identity.agent_id == WORKLOAD
    assert "authorization" not in plain.strip_headers
    for carried in (token, other):
        auth = _auth(verifier, w, _request("transparent", {"authorization": f"Bearer {carried}"}))
        assert auth.identity is not None and auth.identity.agent_id == WORKLOAD  # never the other one
        assert "authorization" in auth.strip_headers  # an agent token never reaches the upstream
    # an upstream's own credential (not an agent token) is left to the connector
    own = _auth(verifier, w, _request("transparent", {"authorization": "Bearer upstream-api-key"}))
    assert own.identity is not None and "authorization" not in own.strip_headers


def test_proxy_authorization_on_a_transparent_request_is_refused(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD))
    other = idp.token("other-agent")
    auth = _auth(verifier, _workload(f, verifier), _request("transparent", {"proxy-authorization": f"Bearer {other}"}))
    assert auth.identity is None and auth.refusal is not None
    assert auth.refusal.status == 400 and auth.refusal.reasons == ["transparent-proxy-credentials"]
    assert other not in auth.refusal.detail


def test_other_listeners_never_fall_back_to_the_workload_identity(tmp_path, verifier, idp):
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD))
    w = _workload(f, verifier)
    forward = _auth(verifier, w, _request("forward", {}))
    assert forward.identity is None and forward.refusal is not None and forward.refusal.status == 407
    reverse = _auth(verifier, w, _request("reverse", {}))
    assert reverse.identity is None and reverse.refusal is not None and reverse.refusal.status == 401


def test_no_usable_workload_identity_refuses_503(tmp_path, verifier, idp):
    missing = _auth(verifier, None, _request("transparent", {}))
    assert missing.refusal is not None and missing.refusal.status == 503
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD, ttl=-300))
    expired = _auth(verifier, _workload(f, verifier), _request("transparent", {}))
    assert expired.refusal is not None and expired.refusal.status == 503
    assert expired.refusal.reasons == ["workload-identity-unavailable"]
    assert expired.refusal.headers["Retry-After"] == "5" and str(f) in expired.refusal.detail


# ------------------------------------------------------------------ the engine adapter
class _Recorder:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, rec) -> None:
        self.records.append(rec.to_dict())


class _Allow(Stage):
    name = "allow"

    def on_request(self, ex: Exchange) -> None:
        pass


def _transparent_flow(original: tuple[str, int], host_header: str, path: str = "/items/1"):
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse("transparent")
    flow.client_conn.sockname = original  # what mitmproxy recovered with SO_ORIGINAL_DST
    flow.client_conn.tls = False
    r = flow.request
    r.scheme, r.host, r.port, r.path, r.authority = "http", original[0], original[1], path, ""
    r.headers.clear()
    r.headers["Host"] = host_header
    return flow


def _engine(tmp_path: Path, verifier: TokenVerifier, idp) -> tuple[ProctorAddon, _Recorder]:
    f = tmp_path / "token"
    f.write_text(idp.token(WORKLOAD))
    recorder = _Recorder()
    record = RecordDecision(recorder)
    auth = Authenticate(Authenticator(verifier, verifier.settings, _workload(f, verifier)))
    addon = ProctorAddon(Chain([record, auth, TargetCheck(()), _Allow()]), Chain([record]), router=None,
                         limits=RequestLimits(), transparent=TransparentGuard(frozenset({15001}), frozenset({443})))
    return addon, recorder


def test_the_adapter_sends_a_redirected_request_to_the_name_it_names(tmp_path, verifier, idp):
    addon, recorder = _engine(tmp_path, verifier, idp)
    flow = _transparent_flow(("198.51.100.66", 8080), "ERP.Example:8080")
    asyncio.run(addon.request(flow))
    assert flow.response is None  # allowed: forwarded...
    assert (flow.request.host, flow.request.port) == ("erp.example", 8080)  # ...to the name, not the IP
    assert flow.request.host_header == "erp.example:8080"
    ex = flow.metadata["proctor"]
    assert ex.request.mode == "transparent" and ex.request.original_destination == ("198.51.100.66", 8080)
    assert ex.identity.agent_id == WORKLOAD


def test_the_adapter_refuses_a_redirected_request_naming_another_port(tmp_path, verifier, idp):
    addon, recorder = _engine(tmp_path, verifier, idp)
    flow = _transparent_flow(("198.51.100.66", 80), "erp.example:8443")
    asyncio.run(addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 421
    assert flow.request.host == "198.51.100.66"  # nothing re-targeted: nothing will be dialled
    (rec,) = recorder.records
    assert (rec["agent"], rec["mode"], rec["status"]) == (WORKLOAD, "transparent", 421)


def test_the_guard_knows_proctors_own_addresses():
    guard = TransparentGuard(frozenset({15001, 8080, 8081}), frozenset({443}))
    assert guard.loops(("127.0.0.1", 15001)) and guard.loops(("::1", 8081)) and guard.loops(("127.0.0.9", 8080))
    assert guard.loops(None)  # no original destination: nothing to send it to
    assert not guard.loops(("127.0.0.1", 9000))
    assert not guard.loops(("192.0.2.10", 15001))  # not an address of this host: the agent's own business
    assert guard.needs_tls(("192.0.2.10", 443)) and not guard.needs_tls(("192.0.2.10", 80))


# ------------------------------------------------------------------ config
def test_config_section():
    cfg = ProctorConfig.model_validate({"transparent": {"enabled": True, "token_file": "/run/token"}})
    t = cfg.transparent
    assert (t.hosts, t.port, t.tls_ports, t.token_check_seconds) == (["127.0.0.1", "::1"], 15001, [443], 5.0)
    assert ProctorConfig().transparent.enabled is False
    for bad, says in (
        ({"enabled": True}, "token_file"),
        ({"hosts": ["0.0.0.0"]}, "loopback"),
        ({"hosts": ["10.0.0.1"]}, "loopback"),
        ({"hosts": ["localhost"]}, "not an IP address"),
        ({"hosts": ["127.0.0.1", "127.0.0.1"]}, "twice"),
        ({"tls_ports": [70000]}, "1..65535"),
        ({"port": 0}, "greater than or equal to 1"),
        ({"token_check_seconds": 0}, "greater than or equal to 0.1"),
    ):
        with pytest.raises(ValueError, match=says):
            ProctorConfig.model_validate({"transparent": bad})
    with pytest.raises(ValueError, match="also listen's port"):
        ProctorConfig.model_validate({"listen": {"port": 15001},
                                      "transparent": {"enabled": True, "token_file": "/t"}})
