"""Second attacker round (issue 16): monitor mode and the workload identity file, on a real proxy.

- Monitor mode is the operator's choice: an agent cannot opt itself into it (and so out of
  enforcement) with headers or with token claims other than the signed groups claim the
  operator's `monitor.groups` names.
- The workload identity's token file pointed (by a symlink) at another file Proctor can read,
  its CA private key or a one-line secret: transparent requests are refused, and no message,
  health report, metric or log line echoes a byte of that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import requests

from conftest import free_port, wait_for

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ monitor mode
def test_an_agent_cannot_opt_itself_into_monitor_mode(proctor_factory, idp, upstream):
    p = proctor_factory({"monitor": {"groups": ["trial"]}})
    url = f"http://127.0.0.1:{upstream.port}/items/41"

    def delete(token: str, **headers: str) -> requests.Response:
        return requests.delete(url, headers=headers, timeout=10,
                               proxies={"http": p.proxy_url_with("writer-bot", token)})

    upstream.clear()
    # claims that look like a monitor switch, a group-ish claim under another name, a team named
    # like the monitored group; headers naming monitor mode: all still enforced (no-item-deletes)
    sneaky = idp.token("writer-bot", groups=["writers"], monitor=True, monitored=True, proctor_monitor="global",
                       group="trial", roles=["trial"], team="trial", agent_groups=["trial"])
    for headers in ({}, {"Proctor-Monitor": "allow"}, {"X-Proctor-Monitor": "true"},
                    {"Proctor-Monitor": "deny; kind=policy; status=403", "X-Monitor": "1"}):
        r = delete(sneaky, **headers)
        assert r.status_code == 403, (headers, r.text)
        assert r.json()["reasons"] == ["no-item-deletes"]
        rec = p.decision(r.json()["decision_id"])
        assert rec["decision"] == "deny" and not rec.get("monitor"), rec
    # an agent id that is the name of the monitored group is not in the group
    named = idp.token("trial", groups=["writers"])
    r = requests.delete(url, proxies={"http": p.proxy_url_with("trial", named)}, timeout=10)
    assert r.status_code == 403, r.text
    assert [x for x in upstream.received() if x["method"] == "DELETE"] == []
    # the control: the signed groups claim naming the monitored group is monitored (forwarded)
    member = idp.token("writer-bot", groups=["writers", "trial"])
    r = delete(member)
    assert r.status_code == 200, r.text
    assert r.headers["Proctor-Monitor"].startswith("deny; kind=policy")
    assert [x["method"] for x in upstream.received()] == ["DELETE"]


# ------------------------------------------------------------------ the workload identity file
def _transparent(token_file) -> dict:
    return {"transparent": {"enabled": True, "hosts": ["127.0.0.1"], "port": free_port(),
                            "token_file": str(token_file), "token_check_seconds": 0.1}}


def test_a_token_file_pointing_at_another_secret_echoes_none_of_it(proctor_factory, idp, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(idp.token("support-agent", ttl=600))
    p = proctor_factory(_transparent(token_file))
    control = f"http://127.0.0.1:{p.control_port}"
    ca_key = p.dir / "state" / "ca" / "mitmproxy-ca.pem"  # Proctor's CA: private key and certificate
    key_text = ca_key.read_text()
    assert "PRIVATE KEY" in key_text
    one_liner = tmp_path / "api-key"
    one_liner.write_text("sk-live-0123456789abcdefSECRETVALUE\n")  # no whitespace: read as a token
    jwt_like = tmp_path / "other-service-token"
    # JWT-shaped, naming the trusted issuer, its header and claims carrying text of their own
    jwt_like.write_text("eyJhbGciOiAiQUxHLVNFQ1JFVC1JTi1IRUFERVIiLCAia2lkIjogIktJRC1TRUNSRVQifQ."
                        "eyJpc3MiOiAiaHR0cHM6Ly9pZHAudGVzdCIsICJzZWNyZXQiOiAiUEFZTE9BRC1TRUNSRVQifQ.c2ln\n")
    secrets = [line for line in key_text.splitlines() if line and "-----" not in line][:5]
    secrets += ["sk-live-0123456789abcdefSECRETVALUE", "PAYLOAD-SECRET", "ALG-SECRET-IN-HEADER", "KID-SECRET",
                "eyJpc3MiOiAiaHR0cHM6Ly9pZHAudGVzdCIsICJzZWNyZXQiOiAiUEFZTE9BRC1TRUNSRVQifQ"]
    good = tmp_path / "good-token"
    good.write_text(idp.token("support-agent", ttl=600))
    def point_at(target: Path) -> None:
        # swapped atomically (a rename, as the kubelet swaps ..data): an unlink then a symlink
        # let Proctor read a missing file in between, and report that instead
        tmp = token_file.with_name("token.next")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, token_file)

    for target, why in ((ca_key, "whitespace"), (one_liner, "not a well-formed JWT"), (jwt_like, "is not accepted")):
        point_at(good)  # (a good token between two bad ones: each refusal is its own)
        wait_for(lambda: httpx.get(f"{control}/readyz").status_code == 200, what="ready")
        point_at(target)
        wait_for(lambda why=why: (r := httpx.get(f"{control}/readyz")).status_code == 503 and why in r.text,
                 what=f"not ready with {target.name}")
        ready = httpx.get(f"{control}/readyz").text
        health = httpx.get(f"{control}/healthz").text
        metrics = httpx.get(f"{control}/metrics").text
        assert str(token_file) in ready and (why in ready), ready
        for text in (ready, health, metrics, p.log()):
            for s in secrets:
                assert s not in text, (target.name, s)
    # back to a real token: ready again without a restart
    token_file.unlink()
    token_file.write_text(idp.token("support-agent", ttl=600))
    wait_for(lambda: httpx.get(f"{control}/readyz").status_code == 200, what="ready again")
    for s in secrets:
        assert s not in p.log()


def test_forged_workload_tokens_are_refused(proctor_factory, idp, tmp_path):
    """The token file is what the workload is: alg none, HS256 signed with the IdP's public key
    (key confusion), an RS256 signature under the EC key's kid, another issuer's key: each makes
    Proctor not ready (transparent requests refused), never attributed."""
    import base64
    import json as _json

    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(_json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"iss": idp.issuer, "aud": idp.audience, "sub": "support-agent", "exp": 4102444800}
    token_file = tmp_path / "token"
    token_file.write_text(idp.token("support-agent", ttl=600))
    p = proctor_factory(_transparent(token_file))
    control = f"http://127.0.0.1:{p.control_port}"
    hs = pyjwt.algorithms.HMACAlgorithm(pyjwt.algorithms.HMACAlgorithm.SHA256)
    signing_input = b64({"alg": "HS256", "kid": "rsa-1"}) + "." + b64(claims)
    hs256_pubkey = signing_input + "." + base64.urlsafe_b64encode(
        hs.sign(signing_input.encode(), idp.public_pem())).rstrip(b"=").decode()
    forged = {
        "alg none": b64({"alg": "none"}) + "." + b64(claims) + ".",
        "alg None, kid": b64({"alg": "None", "kid": "rsa-1"}) + "." + b64(claims) + ".",
        "HS256 with the public key": hs256_pubkey,
        "RS256 under the EC kid": idp.token("support-agent", kid="ec-1"),
        "an unknown key": idp.token("support-agent", key=rsa.generate_private_key(65537, 2048)),
        "an unknown kid": idp.token("support-agent", kid="rsa-2"),
    }
    for what, token in forged.items():
        token_file.write_text(idp.token("support-agent", ttl=600))
        wait_for(lambda: httpx.get(f"{control}/readyz").status_code == 200, what="ready")
        token_file.write_text(token)
        wait_for(lambda: httpx.get(f"{control}/readyz").status_code == 503, what=f"not ready: {what}")
        wl = p.health()["components"]["workload_identity"]
        assert wl["status"] == "down" and wl["error"] and str(token_file) in wl["error"], (what, wl)
        assert token not in httpx.get(f"{control}/readyz").text and token not in p.log()
